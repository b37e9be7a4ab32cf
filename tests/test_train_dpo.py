"""train_dpo.py end to end on small synthetic preference data (helpers.write_pairs).

The synthetic preference is learnable from scratch in a few dozen steps: for "Pick a number",
chosen answers are made of the digits 1-4 and rejected ones of 6-9 (held-out pairs are new strings). Runs are in-process (fast) except the 2-process comparison, which needs torchrun.
"""
import json
import os

import pytest
import torch

import common

import config
import forward
import losses
import hf_io
import train_dpo
from helpers import preference_setup, run_script, series


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return preference_setup(tmp_path_factory.mktemp("dpo"))


def dpo(setup, out, *extra, steps=3):
    args = ["--model", setup["model"], "--data", setup["train"], "--eval-data", setup["eval"], "--out", str(out),
            "--max-steps", str(steps), "--batch-size", "8", "--warmup-steps", "1", "--log-every", "1",
            "--eval-every", "0", "--lr", "1e-3", "--rpo-alpha", "0", *extra]  # plain DPO unless asked
    train_dpo.main(config.parse_config(train_dpo.DPOConfig, args))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(losses.DPO_LOSS_TYPES) + ["simpo", "orpo", "kto"])
def test_every_loss_trains(setup, tmp_path, loss):
    out = dpo(setup, tmp_path / "o", "--loss", loss)
    ls = series(out, "loss")
    assert sorted(ls) == [1, 2, 3] and all(map(torch.isfinite, torch.tensor(list(ls.values()))))
    assert os.path.exists(out / "model" / "model.safetensors")
    if loss == "sigmoid":  # policy == reference at the first step: DPO's loss is log 2
        assert abs(ls[1] - 0.6931471805599453) < 1e-6


def test_help_lists_every_loss(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(train_dpo.DPOConfig, ["--help"])
    words = set(capsys.readouterr().out.split())
    assert set(losses.DPO_LOSS_TYPES) | {"simpo", "orpo", "kto"} <= words and "--discopop-tau" in words


@pytest.mark.slow
def test_kto_reads_unpaired_data(setup, tmp_path):
    """--loss kto takes TRL's unpaired records as they are, and they train exactly like the same
    examples unpaired from the preference file (desirable ones first, then undesirable)."""
    pairs = [json.loads(line) for line in open(setup["train"])]
    unpaired = tmp_path / "unpaired.jsonl"
    with open(unpaired, "w") as f:
        for key, label in (("chosen", True), ("rejected", False)):
            f.writelines(json.dumps({"prompt": p["prompt"], "completion": p[key], "label": label}) + "\n" for p in pairs)
    a = series(dpo(setup, tmp_path / "pairs", "--loss", "kto"), "loss")
    b = series(dpo(dict(setup, train=str(unpaired)), tmp_path / "unpaired", "--loss", "kto"), "loss")
    assert a == b and len(a) == 3


def test_shared_prompt_rows_equal_two_rows(setup):
    """collate_preference_shared (prompt once, rejected masked from chosen) gives the two-row
    layout's log-probs and gradients: same math, fp32 summation noise only."""
    from data import batching
    m = hf_io.from_pretrained(setup["model"])
    d = common.Dist(0, 1, torch.device("cpu"), None)
    ex = [{"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]},
          {"prompt_ids": [1, 5], "chosen_ids": [11, 2], "rejected_ids": [12, 13, 14, 15, 2]},
          {"prompt_ids": [1, 40, 41, 42, 43, 44], "chosen_ids": [2], "rejected_ids": [50, 51, 2]}]
    out = []
    for collate in (batching.collate_preference, batching.collate_preference_shared):
        m.zero_grad()
        lp, mask = forward.token_logps(m, collate(ex, 0), d, chunk_size=4)
        seq = (lp * mask).sum(-1)
        (seq * torch.arange(1.0, 7.0)).sum().backward()  # a different weight per sequence
        out.append((seq.detach(), mask.sum(-1), [p.grad.clone() for p in m.parameters()]))
    (a, na, ga), (b, nb, gb) = out
    assert torch.equal(na, torch.tensor([3.0, 2, 1, 2, 5, 3])) and torch.equal(na, nb)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert all(torch.allclose(x, y, atol=1e-5, rtol=1e-4) for x, y in zip(ga, gb))
    # the rejected answer must not see the chosen one: changing chosen leaves rejected unchanged
    ex2 = [dict(e, chosen_ids=[60, 61, 62] + e["chosen_ids"]) for e in ex]
    with torch.no_grad():
        lp2, mask2 = forward.token_logps(m, batching.collate_preference_shared(ex2, 0), d, chunk_size=4)
    assert torch.allclose((lp2 * mask2).sum(-1)[3:], b[3:], atol=1e-5)


@pytest.mark.slow
def test_precompute_ref_equals_live_reference(setup, tmp_path):
    live = series(dpo(setup, tmp_path / "live", steps=4), "loss")
    pre = series(dpo(setup, tmp_path / "pre", "--precompute-ref", steps=4), "loss")
    # the same reference log-probs, computed in batches of a different padded length: fp32 noise only
    assert all(abs(live[k] - pre[k]) < 1e-5 for k in live) and len(live) == 4
    rows = series(dpo(setup, tmp_path / "rows", "--share-prompt", "false", steps=4), "loss")
    assert all(abs(live[k] - rows[k]) < 1e-5 for k in live)


@pytest.mark.slow
def test_one_vs_two_processes(setup, tmp_path):
    one = series(dpo(setup, tmp_path / "one", steps=4), "loss")
    args = ["--model", setup["model"], "--data", setup["train"], "--out", "two", "--max-steps", "4",
            "--batch-size", "4", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0", "--lr", "1e-3", "--rpo-alpha", "0"]
    run_script("train_dpo.py", args, tmp_path, nproc=2)
    two = series(tmp_path / "two", "loss")
    assert one.keys() == two.keys()
    assert all(abs(one[k] - two[k]) < 1e-5 for k in one), (one, two)


@pytest.mark.slow
def test_dpo_learns_synthetic_preferences(setup, tmp_path):
    out = dpo(setup, tmp_path / "o", "--beta", "0.5", "--eval-every", "30", steps=30)
    acc = series(out, "eval/rewards/accuracies")
    assert acc[0] == 0.0 and acc[30] > 0.9, acc  # held-out pairs
