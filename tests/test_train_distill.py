"""train_distill.py end to end: the logged loss is losses.generalized_jsd of the two models over the
data's completion tokens, on-policy steps train, a smaller student, and 1 vs 2 processes."""
import json

import pytest
import torch


import config
import losses
import hf_io
import train_distill
from data import batching, chat, formats
from helpers import run_script, series, tiny_model_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("distill")
    data = d / "data.jsonl"
    with open(data, "w") as f:
        for i in range(32):
            f.write(json.dumps({"prompt": f"What is {10 + i}+{20 + 2 * i}?", "completion": str(30 + 3 * i)}) + "\n")
    return {"student": tiny_model_dir(str(d / "student")), "teacher": tiny_model_dir(str(d / "teacher"), seed=1, layers=1),
            "data": str(data)}


def args(setup, out, *extra):
    return ["--model", setup["student"], "--teacher", setup["teacher"], "--data", setup["data"], "--out", str(out),
            "--max-steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0",
            "--lr", "1e-3", "--chunk-size", "5", *extra]


@pytest.mark.slow
def test_loss_is_generalized_jsd_of_the_two_models(setup, tmp_path):
    out = tmp_path / "o"
    train_distill.main(config.parse_config(train_distill.DistillConfig,
                                           args(setup, out, "--lmbda", "0", "--beta", "0.3", "--temperature", "2")))
    loss = series(out, "loss")
    assert sorted(loss) == [1, 2, 3] and loss[3] < loss[1]
    # step 1 by hand: full logits of both (untrained) models on the step's data rows
    tok = chat.load_tokenizer(setup["student"])
    rows = [chat.tokenize_sft(r, tok, 512) for r in formats.load_sft(setup["data"])]
    idx = batching.batch_indices(len(rows), 8, 0, 0)
    b = batching.collate_sft([rows[i] for i in idx], tok.pad_id)
    with torch.no_grad():
        s = hf_io.from_pretrained(setup["student"])(b["input_ids"])
        t = hf_io.from_pretrained(setup["teacher"])(b["input_ids"])
    m = b["loss_mask"]
    want = (losses.generalized_jsd(s, t, 0.3, 2.0) * m).sum() / m.sum()
    assert abs(loss[1] - want.item()) < 1e-5, (loss[1], want)  # fp32, chunked vs full logits


@pytest.mark.slow
def test_on_policy_and_smaller_student(setup, tmp_path):
    out = tmp_path / "o"
    train_distill.main(config.parse_config(train_distill.DistillConfig,
                                           args(setup, out, "--lmbda", "1", "--beta", "1", "--student-layers", "1")))
    assert [m["on_policy"] for m in map(json.loads, open(out / "metrics.jsonl"))] == [1.0] * 3
    saved = hf_io.from_pretrained(out / "model")
    assert saved.cfg.num_layers == 1 and json.load(open(out / "model" / "config.json"))["num_hidden_layers"] == 1


@pytest.mark.slow
def test_one_vs_two_processes(setup, tmp_path):
    a = args(setup, "one", "--lmbda", "0")
    run_script("train_distill.py", a, tmp_path)
    b = args(setup, "two", "--lmbda", "0")
    b[b.index("--batch-size") + 1] = "4"  # the same global batch of 8
    run_script("train_distill.py", b, tmp_path, nproc=2)
    one, two = series(tmp_path / "one", "loss"), series(tmp_path / "two", "loss")
    assert one.keys() == two.keys() and len(one) == 3
    # the same math summed in another order over two ranks: fp32 noise only
    assert all(abs(one[k] - two[k]) < 1e-5 for k in one), (one, two)
