"""HSDP (--hsdp 2: FSDP2 on a 2 x 2 mesh, 2 replica groups of 2 shards) on 4 gloo processes gives
the losses, gradient norms and final weights of FSDP on 4 processes and of one process, for SFT and
DPO, full fine-tuning and LoRA; a checkpoint written under HSDP resumes under FSDP.

Tolerances as in test_train_sft.py: the layouts sum the same numbers in different orders (an
all-reduce across the replicas after the reduce-scatter within them), so losses and gradient norms
agree to ~1e-6 relative (1e-5 asserted); weights after 3 Adam steps at lr 3e-3 to 1e-4 absolute
(Adam turns summation noise on ~0 gradients into up to ~2e-5; a wrong step moves weights by ~3e-3).
"""
import json
import os
import random

import pytest
from safetensors.torch import load_file

from helpers import run_script, series, tiny_model_dir

STEPS = ["--max-steps", "3", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hsdp")
    rng = random.Random(0)
    with open(d / "sft.jsonl", "w") as sft, open(d / "pairs.jsonl", "w") as pairs:
        for _ in range(64):
            a, b = rng.randrange(10, 99), rng.randrange(10, 99)
            sft.write(json.dumps({"prompt": f"What is {a}+{b}?", "completion": str(a + b)}) + "\n")
            pairs.write(json.dumps({"prompt": f"What is {a}+{b}?", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    return {"model": tiny_model_dir(str(d / "model")), "sft": str(d / "sft.jsonl"), "pairs": str(d / "pairs.jsonl")}


def weights(out):
    return load_file(os.path.join(out, "model", "model.safetensors"))


def assert_same(a, b, keys=("loss", "grad_norm")):
    for key in keys:
        x, y = series(a, key), series(b, key)
        assert x.keys() == y.keys() == {1, 2, 3}
        assert all(abs(x[s] - y[s]) <= 1e-5 * abs(x[s]) for s in x), (key, x, y)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("script, data, extra", [
    ("train_sft.py", "sft", []), ("train_dpo.py", "pairs", []), ("train_dpo.py", "pairs", ["--lora-r", "4"])])
def test_hsdp_equals_fsdp_and_one_process(files, tmp_path, script, data, extra):
    base = ["--model", files["model"], "--data", files[data], *STEPS, *extra]
    run_script(script, base + ["--batch-size", "8", "--out", "one"], tmp_path)
    run_script(script, base + ["--batch-size", "2", "--out", "fsdp"], tmp_path, nproc=4)
    run_script(script, base + ["--batch-size", "2", "--hsdp", "2", "--out", "hsdp"], tmp_path, nproc=4)
    assert_same(tmp_path / "hsdp", tmp_path / "fsdp")
    assert_same(tmp_path / "hsdp", tmp_path / "one")


@pytest.mark.slow
def test_hsdp_checkpoint_resumes_under_fsdp(files, tmp_path):
    base = ["--model", files["model"], "--data", files["sft"], *STEPS, "--batch-size", "2"]
    run_script("train_sft.py", base + ["--out", "whole"], tmp_path, nproc=4)
    run_script("train_sft.py", base + ["--out", "split", "--hsdp", "2", "--stop-after", "1"], tmp_path, nproc=4)
    p = run_script("train_sft.py", base + ["--out", "split", "--resume"], tmp_path, nproc=4)
    assert "with changed settings: --hsdp 2 -> 0" in p.stdout
    assert_same(tmp_path / "split", tmp_path / "whole")
