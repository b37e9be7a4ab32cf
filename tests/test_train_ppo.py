"""train_ppo.py end to end: GRPO with a reward function, PPO with a reward model, the recorded
rollout against losses.py, KL = 0 at the first step, resume, and FSDP generation."""
import json
import math
import os

import pytest
import torch

import losses
import hf_io
from helpers import ROOT, run_script, series, tiny_model_dir

SMALL = ["--max-steps", "3", "--prompts-per-step", "4", "--group-size", "4", "--minibatches", "2",
         "--max-new-tokens", "6", "--eval-every", "0", "--eval-samples", "8", "--log-every", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    return tiny_model_dir(str(d / "policy")), d


@pytest.mark.slow
def test_grpo_with_reward_fn_matches_losses(tiny, tmp_path):
    policy, _ = tiny
    rec = tmp_path / "rollout.pt"
    run_script("train_ppo.py", ["--model", policy, "--out", "o", "--record-rollout", rec] + SMALL, tmp_path)
    kl = series(tmp_path / "o", "kl")
    assert kl[1] == 0.0  # policy == reference before the first update: exactly zero
    assert sorted(kl) == [1, 2, 3]
    r = torch.load(rec)
    adv = losses.group_advantages(r["scores"], 4)
    assert torch.allclose(r["advantages"], adv[:, None] * r["mask"])
    # the recorded scores are the task verifier's verdicts on the decoded completions
    from data import chat, task
    tok = chat.load_tokenizer(policy)
    P = r["prompt_len"]
    for row, m, s in zip(r["seqs"], r["mask"], r["scores"]):
        question = tok.tokenizer.decode(row[:P].tolist(), skip_special_tokens=True)  # "User: What is a+b?\nAssistant: "
        a, b = question.split("What is ")[1].split("?")[0].split("+")
        text = tok.tokenizer.decode([int(t) for t, k in zip(row[P:], m) if k], skip_special_tokens=True)
        assert s.item() == float(task.is_correct(text, str(int(a) + int(b))))
    assert r["mask"][:, 0].all()  # every completion has at least one token


@pytest.mark.slow
def test_ppo_with_reward_model_matches_gae(tiny, tmp_path):
    policy, d = tiny
    rm = hf_io.from_pretrained(policy, head="score", seed=1)
    hf_io.save_pretrained(rm, tmp_path / "rm", tokenizer_dir=policy)
    rec = tmp_path / "rollout.pt"
    run_script("train_ppo.py", ["--model", policy, "--out", "o", "--algo", "ppo", "--reward-model", tmp_path / "rm",
                                "--beta", "0.05", "--record-rollout", rec] + SMALL, tmp_path)
    m = series(tmp_path / "o", "value_loss")
    assert sorted(m) == [1, 2, 3] and "explained_variance" in json.loads(open(tmp_path / "o" / "metrics.jsonl").readlines()[-2])
    r = torch.load(rec)
    mask = r["mask"]
    rewards = -0.05 * (r["old_logps"] - r["ref_logps"]) * mask  # zero at step 0, still the formula
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(len(last)), last] += r["scores"]
    adv, ret = losses.gae(rewards, r["values"], mask, 1.0, 0.95)
    assert torch.allclose(r["advantages"], losses.masked_whiten(adv, mask), atol=1e-6)
    assert torch.allclose(r["returns"], ret, atol=1e-6)
    # the scores are the reward model's, read at each sequence's last completion token
    seqs, P = r["seqs"], r["prompt_len"]
    attn = torch.cat([(seqs[:, :P] != 0).long(), mask.long()], 1)
    with torch.no_grad():
        s = rm(seqs, attn)[torch.arange(len(last)), P + last]
    assert torch.allclose(s, r["scores"], atol=1e-5)


@pytest.mark.slow
def test_resume_mid_run_equals_uninterrupted(tiny, tmp_path):
    policy, _ = tiny
    args = ["--model", policy, "--out", "o", "--algo", "ppo"] + SMALL
    (tmp_path / "full").mkdir()
    (tmp_path / "split").mkdir()
    run_script("train_ppo.py", args, tmp_path / "full")
    run_script("train_ppo.py", args + ["--stop-after", "2"], tmp_path / "split")
    run_script("train_ppo.py", args + ["--resume"], tmp_path / "split")
    a, b = series(tmp_path / "full" / "o", "policy_loss"), series(tmp_path / "split" / "o", "policy_loss")
    assert a == b and len(a) == 3


@pytest.mark.slow
def test_generation_under_fsdp_equals_single_process(tiny, tmp_path):
    policy, _ = tiny
    script = os.path.join(ROOT, "tests", "support", "fsdp_generate.py")
    run_script(script, [policy, tmp_path / "two.pt"], tmp_path, nproc=2)
    run_script(script, [policy, tmp_path / "one.pt"], tmp_path, nproc=1)
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[1])


@pytest.mark.slow
def test_stop_tokens_end_completions(tiny, tmp_path):
    policy, _ = tiny
    letters = "abcdefghijklmnopqrstuvwxyz"  # a quarter of the random model's vocabulary: stops are frequent
    rec = tmp_path / "rollout.pt"
    args = ["--model", policy, "--out", "o", "--record-rollout", rec, "--stop-tokens", ",".join(letters)]
    run_script("train_ppo.py", args + ["--max-steps", "1"] + SMALL[2:], tmp_path)
    from data import chat
    tok = chat.load_tokenizer(policy)
    stops = {tok.tokenizer.token_to_id(c) for c in letters} | set(tok.stop_ids)
    r = torch.load(rec)
    P, lengths = r["prompt_len"], []
    for row, m in zip(r["seqs"], r["mask"]):
        comp = [int(t) for t, k in zip(row[P:], m) if k]
        assert not stops & set(comp[:-1])  # a completion ends at its first stop token
        lengths.append(len(comp))
    assert min(lengths) < 6  # some completion did stop early (6 = --max-new-tokens)
    with pytest.raises(AssertionError, match="not a single token"):
        run_script("train_ppo.py", args + ["--stop-tokens", "<|nope|>", "--out", "o2"] + SMALL, tmp_path)


@pytest.mark.slow
def test_logps_are_those_of_the_sampling_distribution(tiny, tmp_path):
    """With --temperature 0.5 the rollout samples from softmax(logits / 0.5): old (and reference)
    log-probs must be of that distribution, or every update is off-policy by up to a nat."""
    policy, _ = tiny
    rec = tmp_path / "rollout.pt"
    run_script("train_ppo.py", ["--model", policy, "--out", "o", "--record-rollout", rec, "--temperature", "0.5",
                                "--max-steps", "1"] + SMALL[2:], tmp_path)
    r = torch.load(rec)
    seqs, mask, P = r["seqs"], r["mask"], r["prompt_len"]
    attn = torch.cat([(seqs[:, :P] != 0).long(), mask.long()], 1)
    with torch.no_grad():
        logits = hf_io.from_pretrained(policy)(seqs, attn)[:, P - 1:-1] / 0.5
    want = torch.log_softmax(logits, -1).gather(-1, seqs[:, P:, None]).squeeze(-1)
    assert (((r["old_logps"] - want) * mask).abs().max() < 1e-5) and torch.equal(r["ref_logps"], r["old_logps"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", [
    ["--loss", "cispo"],
    ["--loss", "sapo"],
    ["--importance-level", "sequence", "--clip-eps", "3e-4", "--clip-eps-high", "4e-4", "--loss-agg", "grpo"],  # GSPO
    ["--algo", "reinforce_pp", "--kl-estimator", "k2"],
    ["--algo", "rloo", "--kl-in-reward", "--kl-estimator", "k3"],
    ["--algo", "online_dpo", "--dpo-loss", "discopop", "--beta", "0.1"],
])
def test_new_modes_train_and_match_losses(tiny, tmp_path, mode):
    """Each surrogate / advantage mode trains a few steps, and its recorded advantages are the
    formula's. A reference with other weights makes the KL penalty nonzero at the first step."""
    policy, d = tiny
    ref = d / "ref"
    if not ref.exists():
        tiny_model_dir(str(ref), seed=1)
    rec = tmp_path / "rollout.pt"
    args = ["--model", policy, "--ref-model", ref, "--out", "o", "--record-rollout", rec, "--max-steps", "2"]
    run_script("train_ppo.py", args + mode + SMALL[2:], tmp_path)
    loss = series(tmp_path / "o", "policy_loss")
    assert sorted(loss) == [1, 2] and all(map(math.isfinite, loss.values()))
    r = torch.load(rec)
    mask, scores = r["mask"], r["scores"]
    beta = 0.1 if "online_dpo" in mode else 0.02
    if "reinforce_pp" in mode:
        rewards = -beta * losses.kl_penalty(r["old_logps"], r["ref_logps"], "k2") * mask
        last = mask.sum(-1).long() - 1
        rewards[torch.arange(len(last)), last] += losses.group_advantages(scores, 4, scale=False)
        want = losses.masked_whiten(losses.discounted_returns(rewards, mask), mask)
        assert torch.allclose(r["advantages"], want, atol=1e-6)
        assert (rewards != 0).sum() > len(last)  # the KL penalty did reach the tokens
    elif "rloo" in mode:
        kl = (losses.kl_penalty(r["old_logps"], r["ref_logps"], "k3") * mask).sum(-1)
        assert (kl > 0).all()
        assert torch.allclose(r["advantages"], losses.rloo_advantages(scores - beta * kl, 4)[:, None] * mask, atol=1e-6)
    elif "online_dpo" in mode:  # +1 chosen, -1 rejected, 0 for both of a tie, in consecutive pairs
        s = scores.view(-1, 2)
        sign = torch.stack([(s[:, 0] - s[:, 1]).sign(), (s[:, 1] - s[:, 0]).sign()], 1).view(-1, 1)
        assert torch.equal(r["advantages"], sign * mask)
    else:
        assert torch.allclose(r["advantages"], losses.group_advantages(scores, 4)[:, None] * mask)


def test_online_dpo_objective_picks_chosen_and_skips_ties():
    import train_ppo
    cfg = train_ppo.PPOConfig(beta=0.5, dpo_loss="sigmoid", rpo_alpha=0.0)
    logps = torch.tensor([[-1.0, -0.5], [-3.0, 0.0], [-2.0, 0.0], [-0.5, 0.0], [-1.0, 0.0], [-9.0, 0.0]],
                         dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0]] + [[1.0, 0.0]] * 5, dtype=torch.float64)
    ref = torch.full_like(logps, -1.0)
    pref = torch.tensor([1.0, -1.0, -1.0, 1.0, 0.0, 0.0], dtype=torch.float64)  # pair 1: the second row is chosen; pair 2 a tie
    # the step's global counts (one process, one micro-batch): the non-tied pairs and the chosen rows' tokens
    totals = {"pairs": int((pref.view(-1, 2)[:, 0] != 0).sum()), "chosen_tokens": mask[pref > 0].sum().item()}
    loss, st = train_ppo.online_dpo_objective(logps, ref, pref, mask, totals, cfg)
    # pair 0: chosen row 0 (-1.5, ref -2), rejected row 1 (-3, ref -1): m = 0.5 + 2 = 2.5
    # pair 1: chosen row 3 (-0.5, ref -1), rejected row 2 (-2, ref -1): m = 0.5 + 1 = 1.5
    want = -(torch.nn.functional.logsigmoid(torch.tensor(0.5 * 2.5)) + torch.nn.functional.logsigmoid(torch.tensor(0.75))) / 2
    assert abs(loss.item() - want.item()) < 1e-6 and st["pairs"] == 2.0 and st["rewards/accuracies"] == (1.0, 2)
    loss.backward()
    g = logps.grad[:, 0]
    assert g[0] < 0 < g[1] and g[3] < 0 < g[2] and g[4] == g[5] == 0  # chosen up, rejected down, ties untouched
    # RPO's term adds the token-mean NLL of the chosen rows (3 tokens: -1.5 and -0.5 summed)
    loss_rpo, _ = train_ppo.online_dpo_objective(logps, ref, pref, mask, totals, train_ppo.PPOConfig(beta=0.5, rpo_alpha=1.0))
    assert abs(loss_rpo.item() - loss.item() - 2.0 / 3) < 1e-6
