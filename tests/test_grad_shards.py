"""Gradient accumulation keeps gradients sharded: after a non-final micro-batch no FSDP parameter
holds an unsharded gradient (FSDP2 keeps an fp32 copy of the whole model's gradients when its
reduce-scatter is skipped: ~32 GB per GPU for an 8B full fine-tune). FSDP on 2 processes and HSDP
on 4 (where only the all-reduce across replica groups waits for the last micro-batch)."""
import json

import pytest

from helpers import run_script


@pytest.mark.slow
@pytest.mark.parametrize("world,hsdp", [(2, 0), (4, 2)])
def test_no_unsharded_gradient_between_micro_batches(tmp_path, world, hsdp):
    out = tmp_path / "grads.json"
    run_script("tests/support/grad_shards.py", [out, hsdp], tmp_path, nproc=world)
    got = json.load(open(out))
    assert got["unsharded_after_micro_batch"] == [[], []] and got["grads"] > 0
