"""What users' own code and operators do (issue "Reliability, second pass", in part): a --reward-fn
that returns the wrong thing is one line naming it, and Ctrl-C checkpoints like SIGTERM (a second
one stops at once). See docs/reliability.md."""
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

import common
import train_ppo
from helpers import ROOT, run_script, series


@pytest.mark.parametrize("values,message", [
    (1.0, "returned float 1.0; expected a list of 3 finite numbers"),        # would broadcast, silently
    ([1.0, 0.0], "returned 2 values for 3 completions"),
    (["1", 0.0, 1.0], "returned str '1' for completion 0"),
    ([None, 0.0, 1.0], "returned NoneType None for completion 0"),
    ([1.0, math.nan, 0.0], "returned nan for completion 1"),
    ("abc", "returned str 'abc'"),
])
def test_wrong_rewards_are_one_line_naming_the_function(values, message):
    with pytest.raises(common.UsageError, match="^--reward-fn my:fn " + message.replace("(", r"\(").replace(")", r"\)")):
        train_ppo.checked_rewards(values, 3, "--reward-fn my:fn")
    assert train_ppo.checked_rewards(np.array([1, 0.5, True]), 3, "x") == [1.0, 0.5, 1.0]


@pytest.mark.slow
def test_a_scalar_reward_stops_the_run(tmp_path):
    """Before, `return 1.0` trained and saved a model, exit 0: torch.tensor broadcast it."""
    from helpers import tiny_model_dir
    model = tiny_model_dir(str(tmp_path / "model"))
    p = run_script("train_ppo.py", ["--model", model, "--reward-fn", "tests.support.envs:scalar_reward", "--out", "o",
                                    "--max-steps", "1", "--prompts-per-step", "2", "--group-size", "2",
                                    "--max-new-tokens", "4", "--eval-samples", "4"], tmp_path, check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1].startswith("error: --reward-fn tests.support.envs:scalar_reward returned float 1.0")
    assert not os.path.exists(tmp_path / "o" / "model")


SFT = ["--warmup-steps", "2", "--log-every", "1", "--eval-every", "0", "--eval-samples", "16", "--batch-size", "8",
       "--lr", "3e-3", "--max-steps", "300"]


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_resumes_bit_identically(tmp_path):
    """SIGINT mid-run: one line, a checkpoint at the next step, exit 0; --resume then finishes with
    the weights and losses of an uninterrupted run. A second SIGINT stops at once (exit 130)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "tests"))
    run_script("train_sft.py", SFT + ["--out", "whole"], tmp_path)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sft.py"), *SFT, "--out", "cut"], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(series(tmp_path / "cut", "loss") if (tmp_path / "cut" / "metrics.jsonl").exists()
                                         else {}) < 3:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0 and "Traceback" not in err and "interrupted: checkpointing" in err, err[-2000:]
    done = max(series(tmp_path / "cut", "loss"))
    assert done < 300 and os.listdir(tmp_path / "cut" / "checkpoints") == [f"step_{done:08d}"]
    run_script("train_sft.py", SFT + ["--out", "cut", "--resume"], tmp_path)
    a, b = series(tmp_path / "whole", "loss"), series(tmp_path / "cut", "loss")
    assert b == a
    wa, wb = (load_file(os.path.join(tmp_path, d, "model", "model.safetensors")) for d in ("whole", "cut"))
    assert all((wa[k] == wb[k]).all() for k in wa)

    # twice, during the first evaluation (greedy answers to 512 held-out prompts: seconds)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sft.py"), *SFT, "--eval-samples", "512",
                          "--out", "twice"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    while time.time() < deadline + 60 and not (tmp_path / "twice" / "metrics.jsonl").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err and "error: interrupted" in err, err[-2000:]
