"""bench/comm_model.py against the collectives FSDP2 really issues (tests/support/measure_comm.py,
gloo): every (collective, input bytes, output bytes, group size) and its number of calls in an
optimizer step must be equal, for FSDP and HSDP at 2 and 4 processes, with LoRA, QLoRA, gradient
accumulation and a frozen reference beside the trained model."""
import json
import os
import sys
from collections import Counter

import pytest

import common

import config
from helpers import ROOT, run_script, tiny_model_dir

sys.path.insert(0, os.path.join(ROOT, "bench"))
import comm_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # 3 layers: block 0 (whose NF4 q/k units run no backward) differs from the others
    return tiny_model_dir(str(tmp_path_factory.mktemp("comm") / "model"), layers=3)


def predicted(path, world, mode, hsdp, accum):
    cfg = config.TrainConfig(dtype="fp32", lora_r=4 if "lora" in mode else 0, quantize="nf4" if mode == "qlora" else "")
    d = common.Dist(0, 1, common.torch.device("cpu"), None)
    policy = common.load_model(path, cfg, d, adapt=True)
    frozen = [common.load_model(path, cfg, d, train=False)] if mode == "dpo" else []
    return comm_model.step_collectives(policy, world, max(hsdp, 1), accum, frozen=frozen)


@pytest.mark.slow
@pytest.mark.parametrize("world, mode, hsdp, accum", [
    (2, "full", 0, 1), (2, "full", 0, 2), (4, "full", 0, 1), (4, "full", 2, 2),
    (2, "lora", 0, 2), (4, "lora", 2, 1), (2, "qlora", 0, 2), (4, "qlora", 2, 1), (2, "dpo", 0, 2)])
def test_model_equals_measured_collectives(tiny, tmp_path, world, mode, hsdp, accum):
    out = tmp_path / "measured.json"
    run_script("tests/support/measure_comm.py", [tiny, out, mode, hsdp, accum], tmp_path, nproc=world)
    with open(out) as f:
        measured = Counter({tuple(c[:4]): c[4] for c in json.load(f)["collectives"]})
    assert measured == predicted(tiny, world, mode, hsdp, accum)
    ops = comm_model.summary(measured)
    assert ("all_reduce" in ops) == (hsdp > 1)  # HSDP's cross-replica reduction, and only there
