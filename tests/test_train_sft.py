"""train_sft.py end to end on the built-in task: the equivalences that make distributed training
trustworthy. Each run is a real subprocess (one plain process, or torchrun with 2 gloo processes).

Tolerances: runs that do the same fp32 arithmetic in the same order (resume vs uninterrupted) must
agree exactly; runs that sum the same numbers in a different order (FSDP reduce-scatter vs one
process, micro-batches vs one batch) agree to ~1e-6 relative per step in loss and gradient norm.
Weights are compared after 6 Adam steps at lr 3e-3 (each coordinate moves up to ~1.8e-2): Adam
divides by sqrt(v) + eps, so coordinates whose gradient is ~0 amplify summation-order noise to
~2e-5; 1e-4 (0.5% of the largest possible move) still catches a wrong step or a lost micro-batch.
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, metrics, run_script, series

SMALL = ["--max-steps", "6", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0",
         "--eval-samples", "16", "--batch-size", "8", "--lr", "3e-3"]


def run(args, cwd, nproc=1, check=True):
    return run_script("train_sft.py", args, cwd, nproc, check)


def losses(out):
    return series(out, "loss")


def weights(out):
    return load_file(os.path.join(out, "model", "model.safetensors"))


def assert_same_curves(a, b, rtol=1e-5):
    for key in ("loss", "grad_norm"):
        x, y = series(a, key), series(b, key)
        assert x.keys() == y.keys() and len(x) == 6
        for k in x:
            assert abs(x[k] - y[k]) <= rtol * abs(x[k]), (key, k, x[k], y[k])


def assert_weights_close(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, worst


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    run(SMALL + ["--out", "o"], d)
    return d


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    run(SMALL + ["--out", "o", "--batch-size", "4"], d, nproc=2)  # 2 ranks x 4 = 8
    return d


@pytest.mark.slow
def test_one_vs_two_processes(single, two):
    assert_same_curves(single / "o", two / "o")
    assert_weights_close(weights(single / "o"), weights(two / "o"), 1e-4)


@pytest.mark.slow
def test_two_nodes_equal_two_processes(two, tmp_path):
    """The multi-node launch of the README: two torchrun agents (one per "node", here both on this
    machine) meeting at a c10d rendezvous. Same ranks, same arithmetic as --standalone: identical."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
           os.path.join(ROOT, "train_sft.py")] + SMALL + ["--out", "o", "--batch-size", "4"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agents = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for _ in range(2)]
    logs = [a.communicate(timeout=600)[0] for a in agents]
    assert all(a.returncode == 0 for a in agents), "\n".join(log[-3000:] for log in logs)
    assert_same_curves(two / "o", tmp_path / "o", rtol=0)
    assert_weights_close(weights(two / "o"), weights(tmp_path / "o"), 0.0)


@pytest.mark.slow
def test_grad_accum_equals_bigger_batch(single, tmp_path):
    run(SMALL + ["--out", "o", "--batch-size", "2", "--grad-accum", "4"], tmp_path)
    assert_same_curves(single / "o", tmp_path / "o")
    assert_weights_close(weights(single / "o"), weights(tmp_path / "o"), 1e-4)


@pytest.mark.slow
def test_resume_equals_uninterrupted(single, tmp_path):
    run(SMALL + ["--out", "o", "--stop-after", "3"], tmp_path)
    assert max(losses(tmp_path / "o")) == 3
    resumed = run(SMALL + ["--out", "o", "--resume"], tmp_path)  # a new process continues at step 3
    assert "data cache: reusing" in resumed.stdout  # the first run tokenized the data; this one memory-maps it
    a, b = losses(single / "o"), losses(tmp_path / "o")
    assert [b[k] for k in sorted(b)] == [a[k] for k in sorted(a)]
    assert [m["step"] for m in metrics(tmp_path / "o") if "loss" in m] == [1, 2, 3, 4, 5, 6]  # one line per step
    assert_weights_close(weights(single / "o"), weights(tmp_path / "o"), 0.0)
    run(SMALL + ["--out", "o", "--max-steps", "2", "--overwrite"], tmp_path)  # a fresh run into the same directory starts afresh
    assert [m["step"] for m in metrics(tmp_path / "o") if "loss" in m] == [1, 2]


@pytest.mark.slow
def test_sigterm_leaves_resumable_checkpoint(single, tmp_path):
    script = os.path.join(ROOT, "train_sft.py")
    args = SMALL[:1] + ["100000"] + SMALL[2:] + ["--out", "o"]
    p = subprocess.Popen([sys.executable, script] + args, cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "o" / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    ckpts = os.listdir(tmp_path / "o" / "checkpoints")
    assert len(ckpts) == 1 and ckpts[0].startswith("step_") and not ckpts[0].endswith(".tmp"), ckpts
    step = int(ckpts[0][5:])
    run(args[:1] + [str(step + 2)] + args[2:] + ["--resume"], tmp_path)
    assert max(losses(tmp_path / "o")) == step + 2


@pytest.mark.slow
def test_malformed_jsonl_names_line_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    p = run(SMALL + ["--out", "o", "--data", str(bad)], tmp_path, check=False)
    assert p.returncode != 0
    assert f"{bad}:2" in p.stderr and "completion" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_saved_model_loads_in_transformers(single):
    transformers = pytest.importorskip("transformers")
    import hf_io

    d = str(single / "o" / "model")
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    ours = hf_io.from_pretrained(d)
    ids = torch.tensor([tok("What is 12+34?")["input_ids"]])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max() < 1e-4
    assert tok.decode(ids[0], skip_special_tokens=True).replace(" ", "") == "Whatis12+34?"
