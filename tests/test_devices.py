"""What a GPU run would reject, caught on the CPU.

A tensor made without an explicit device is a CPU tensor on a GPU run: NCCL rejects it in a
collective, a CUDA kernel rejects it beside device tensors, or it costs a blocking copy. Here the
scripts run with torch's default device set to meta (tests/support/meta_default.py), so such a
tensor is a meta tensor and the run fails where it meets real data; under torchrun every
torch.distributed collective also asserts that its tensors are on the run's device
(tests/support/checked_collectives.py)."""
import json

import pytest
import torch

import checked_collectives
import common
import forward
import hf_io
from data import batching
from helpers import metrics, run_script, tiny_model_dir, write_pairs

LAUNCHER = "tests/support/meta_default.py"
STOPS = "@,},0,1,2,3,4,5,6,7,8,9,a,e,i,o,u"  # tests/test_agent.py's: a random model's turns end early


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("devices")
    rl = d / "rl.jsonl"
    rl.write_text("".join(json.dumps({"prompt": f"What is {i}+{i % 7}?", "answer": "0"}) + "\n" for i in range(16)))
    return {"model": tiny_model_dir(str(d / "model")), "pairs": write_pairs(d / "pairs.jsonl", 32, 0),
            "eval_pairs": write_pairs(d / "eval.jsonl", 8, 1), "rl": str(rl)}


def runs(d):
    """A few steps of each script path a GPU run takes first: SFT (with the built-in task's data and
    generation), DPO with a precomputed reference, GRPO, and multi-turn GRPO episodes."""
    model, rl = ["--model", d["model"]], ["--prompts-per-step", "2", "--group-size", "4"]
    return {
        "sft": ("train_sft.py", model + ["--max-steps", "2", "--batch-size", "4", "--eval-every", "0",
                                         "--eval-samples", "4", "--max-new-tokens", "4"]),
        "dpo_precompute_ref": ("train_dpo.py", model + ["--data", d["pairs"], "--eval-data", d["eval_pairs"],
                                                        "--precompute-ref", "--max-steps", "2", "--batch-size", "4",
                                                        "--eval-every", "0"]),
        "grpo": ("train_ppo.py", model + rl + ["--max-steps", "2", "--max-new-tokens", "6", "--eval-every", "0",
                                               "--eval-samples", "4"]),
        "grpo_multi_turn": ("train_ppo.py", model + rl + ["--data", d["rl"], "--env", "tests.support.envs:Countdown",
                                                          "--max-steps", "1", "--max-new-tokens", "8", "--beta", "0.1",
                                                          "--stop-tokens", STOPS]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sft", "dpo_precompute_ref", "grpo", "grpo_multi_turn"])
def test_runs_with_meta_as_the_default_device(data, tmp_path, name):
    script, args = runs(data)[name]
    run_script(LAUNCHER, [script, "--out", "o"] + args, tmp_path)
    assert any("loss" in m or "policy_loss" in m for m in metrics(tmp_path / "o"))
    assert (tmp_path / "o" / "model" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dpo_precompute_ref", "grpo"])
def test_two_processes_keep_collectives_on_the_device(data, tmp_path, name):
    script, args = runs(data)[name]
    run_script(LAUNCHER, ["--check-collectives", script, "--out", "o"] + args, tmp_path, nproc=2)
    assert any("loss" in m or "policy_loss" in m for m in metrics(tmp_path / "o"))


def test_the_launcher_fails_on_a_tensor_without_a_device(tmp_path):
    """meta_default.py hides nothing: a device-less tensor meeting a CPU one fails the run."""
    script = tmp_path / "bad.py"
    script.write_text("import torch\nprint((torch.zeros(3, device='cpu') + torch.ones(3, device='cpu')).sum().item())\n"
                      "torch.zeros(3) + torch.ones(3, device='cpu')\n")
    p = run_script(LAUNCHER, [script], tmp_path, check=False)
    assert p.returncode != 0 and "3.0" in p.stdout and "meta" in p.stderr


def test_checked_collectives_name_the_collective_and_the_device():
    ran = []
    check = checked_collectives._checked("all_gather", lambda *a, **k: ran.append(a), torch.device("cpu"))
    check([torch.zeros(2, device="cpu")] * 2, torch.ones(2, device="cpu"))
    assert len(ran) == 1
    with pytest.raises(AssertionError, match=r"torch.distributed.all_gather: .* on meta, the run's device is cpu"):
        check([torch.zeros(2, device="cpu")] * 2, torch.ones(2, device="meta"))
    with pytest.raises(AssertionError, match="on meta"):  # a tensor inside the output list too
        check([torch.zeros(2, device="meta")] * 2, torch.ones(2, device="cpu"))
    assert len(ran) == 1


def test_shared_prompt_mask_built_where_the_batch_is_used(tmp_path):
    """collate_preference_shared(segments=True) leaves the [B, 1, L, L] mask to forward.token_logps,
    which builds it on the run's device: the same mask, the same log-probs and gradients."""
    ex = [{"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]},
          {"prompt_ids": [1, 5], "chosen_ids": [11, 2], "rejected_ids": [12, 13, 14, 15, 2]}]
    host, lazy = batching.collate_preference_shared(ex, 0), batching.collate_preference_shared(ex, 0, segments=True)
    assert "attention_mask" not in lazy and torch.equal(batching.shared_prompt_mask(lazy["segments"]),
                                                         host["attention_mask"])
    m = hf_io.from_pretrained(tiny_model_dir(str(tmp_path / "model")))
    d = common.Dist(0, 1, torch.device("cpu"), None)
    out = []
    for b in (host, lazy):
        m.zero_grad()
        lp, mask = forward.token_logps(m, b, d, chunk_size=4)
        (lp * torch.arange(1.0, lp.numel() + 1).view(lp.shape)).sum().backward()
        out.append((lp.detach(), mask, [p.grad.clone() for p in m.parameters()]))
    (a, ma, ga), (b, mb, gb) = out
    assert torch.equal(a, b) and torch.equal(ma, mb) and all(torch.equal(x, y) for x, y in zip(ga, gb))
