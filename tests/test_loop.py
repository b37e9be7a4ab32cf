"""The one loop skeleton and its one normalisation rule (loop.accumulate), checked on every script:
one process with a batch of 2b, two processes with b each, and one process with two micro-batches
of b give the same loss and gradient norm at every step, and the same metrics.

Tolerance: the three layouts sum the same numbers in a different order (FSDP's reduce-scatter, the
micro-batch loop, rows padded to another length), so the first step agrees to ~1e-6 relative; 1e-5
catches a unit counted per micro-batch or per rank instead of per step (an error of 1/2 to 2x) or
a lost micro-batch. Steps 2 and 3 start from the updated weights, and Adam's first update is
nearly lr * sign(g) per coordinate, so coordinates whose gradient is ~0 turn summation noise into
whole steps (measured: 2e-5 relative on the reward model's step 2): 1e-3 there, still far below a
wrong step or a lost micro-batch.

PPO samples greedily here (--temperature 0), so that its rollouts do not depend on how prompts are
split over ranks, and the critic (GAE against its values) gives non-zero advantages from the start;
distillation uses the data's completions (--lmbda 0) for the same reason. Every other RL variant
shares the update path (forward.completion_logps, loop.accumulate) that this checks.
"""
import json
import random

import pytest

from helpers import run_script, series, tiny_model_dir

STEPS = ["--max-steps", "3", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loop")
    rng = random.Random(0)
    with open(d / "sft.jsonl", "w") as sft, open(d / "pairs.jsonl", "w") as pairs, open(d / "rl.jsonl", "w") as rl:
        for _ in range(64):
            a, b = rng.randrange(10, 99), rng.randrange(10, 99)
            prompt = f"What is {a}+{b}?"
            # answers of different lengths: a per-micro-batch token mean would weigh them differently
            sft.write(json.dumps({"prompt": prompt, "completion": str(a + b) * rng.randrange(1, 4)}) + "\n")
            pairs.write(json.dumps({"prompt": prompt, "chosen": str(a + b) * rng.randrange(1, 3),
                                    "rejected": str(a + b + 10) * rng.randrange(1, 4)}) + "\n")
            rl.write(json.dumps({"prompt": prompt, "answer": str(a + b)}) + "\n")
    return {"model": tiny_model_dir(str(d / "model")), "teacher": tiny_model_dir(str(d / "teacher"), seed=1, layers=1),
            **{k: str(d / f"{k}.jsonl") for k in ("sft", "pairs", "rl")}}


PPO = ["--algo", "ppo", "--temperature", "0", "--group-size", "2", "--minibatches", "1", "--max-new-tokens", "4",
       "--beta", "0.05"]
# script, its arguments, the batch flag (per process), and the metrics that must agree
CASES = {
    "sft": ("train_sft.py", lambda f: ["--data", f["sft"]], "--batch-size", ("loss", "grad_norm")),
    "rm": ("train_rm.py", lambda f: ["--data", f["pairs"]], "--batch-size", ("loss", "grad_norm", "accuracy", "margin")),
    "dpo": ("train_dpo.py", lambda f: ["--data", f["pairs"], "--rpo-alpha", "1"], "--batch-size",
            ("loss", "grad_norm", "rewards/margins", "logps/chosen")),
    "distill": ("train_distill.py", lambda f: ["--data", f["sft"], "--teacher", f["teacher"], "--lmbda", "0"],
                "--batch-size", ("loss", "grad_norm")),
    "ppo": ("train_ppo.py", lambda f: ["--data", f["rl"], "--reward-fn", "data.task:reward_fn", *PPO],
            "--prompts-per-step", ("grad_norm", "value_loss", "value_grad_norm", "kl", "clipfrac")),
    # multi-turn episodes of different lengths (agent.py), scored by the environment; the random
    # model's greedy turns end early on these stop tokens, so episodes take more than one turn
    "agent": ("train_ppo.py", lambda f: ["--data", f["rl"], "--env", "tests.support.envs:Countdown", *PPO,
                                         "--max-new-tokens", "6", "--stop-tokens", "@,},0,1,2,3,4,5,6,7,8,9,a,e,i,o,u"],
              "--prompts-per-step", ("grad_norm", "value_loss", "kl", "turns", "model_token_share")),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_one_vs_two_processes_vs_grad_accum(files, tmp_path, name):
    script, extra, batch_flag, keys = CASES[name]
    base = ["--model", files["model"], *extra(files), *STEPS]
    run_script(script, base + [batch_flag, "8", "--out", "one"], tmp_path)
    two = run_script(script, base + [batch_flag, "4", "--out", "two"], tmp_path, nproc=2)
    # FSDP2 warns when a sharded module returns a view (an in-place op on it would skip a hook): none does
    assert "returned a view tensor" not in two.stderr, two.stderr[-2000:]
    # --batch-size is a micro-batch; PPO's --prompts-per-step is the whole rollout, which
    # --grad-accum splits into micro-batches
    accum_batch = "8" if batch_flag == "--prompts-per-step" else "4"
    run_script(script, base + [batch_flag, accum_batch, "--grad-accum", "2", "--out", "accum"], tmp_path)
    for key in keys:
        one, two, accum = (series(tmp_path / out, key) for out in ("one", "two", "accum"))
        assert one.keys() == two.keys() == accum.keys() == {1, 2, 3}, key
        for step in one:
            for other in (two, accum):
                rtol = 1e-5 if step == 1 else 1e-3
                assert abs(other[step] - one[step]) <= rtol * abs(one[step]) + 1e-7, (key, step, one, two, accum)
    if name == "agent":
        assert max(series(tmp_path / "one", "turns").values()) > 1  # episodes of more than one turn
    assert series(tmp_path / "one", "grad_norm")[1] > 0.01  # a real gradient (PPO: advantages whitened to mean 0, so its policy loss is ~0)
