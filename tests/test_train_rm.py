"""train_rm.py end to end on small synthetic preference data (helpers.write_pairs): the reward
model learns the held-out preferences, and its saved score head loads in transformers as a
*ForSequenceClassification with the same scores. Runs are in-process."""
import pytest
import torch


import config
import hf_io
import train_rm
from helpers import preference_setup, series


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return preference_setup(tmp_path_factory.mktemp("rm"))


@pytest.mark.slow
def test_reward_model_matches_transformers(setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    args = ["--model", setup["model"], "--data", setup["train"], "--eval-data", setup["eval"], "--out", str(tmp_path / "rm"),
            "--max-steps", "20", "--batch-size", "8", "--warmup-steps", "1", "--log-every", "5", "--eval-every", "0", "--lr", "3e-3"]
    train_rm.main(config.parse_config(train_rm.RMConfig, args))
    assert series(tmp_path / "rm", "eval/accuracy")[20] > 0.8
    d = tmp_path / "rm" / "model"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(d, dtype=torch.float32).eval()
    ours = hf_io.from_pretrained(d, head="score")
    ids = torch.randint(5, 90, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, 7:], mask[1, 7:] = 0, 0  # right padding with the pad id (0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits[:, 0]
        got = ours(ids, mask)[torch.arange(3), mask.sum(-1) - 1]
    assert (ref - got).abs().max() < 1e-5 and ref.std() > 1e-3
