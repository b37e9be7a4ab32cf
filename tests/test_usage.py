"""What a user meets before and between runs: a user's mistake is one line naming the flag (no
traceback) and writes nothing; a missing prerequisite names the command that makes it (no script
runs another); --resume may change the optimisation settings and says so, but refuses a change of
what the run is; every shared flag is honoured (train_distill.py with QLoRA) or refused."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

import common

import config
import hf_io
import train_distill
import train_dpo
import train_ppo
import train_rm
import train_sft
from helpers import ROOT, metrics, tiny_model_dir

SCRIPTS = {"sft": train_sft, "rm": train_rm, "dpo": train_dpo, "ppo": train_ppo, "distill": train_distill}


def config_class(mod):
    return next(v for k, v in vars(mod).items() if k.endswith("Config") and v is not config.TrainConfig)


def run(name, args, monkeypatch, capsys):
    """The script as its command line runs it (common.run): (exit status, stdout, stderr)."""
    mod = SCRIPTS[name]
    monkeypatch.setattr(sys, "argv", [f"train_{name}.py", *map(str, args)])
    code = 0
    try:
        common.run(mod.main, config_class(mod))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), (words, lines[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("usage")
    with open(d / "sft.jsonl", "w") as f, open(d / "pairs.jsonl", "w") as p, open(d / "other.jsonl", "w") as o:
        for i in range(32):
            f.write(json.dumps({"prompt": f"What is {10 + i}+{20 + i}?", "completion": str(30 + 2 * i)}) + "\n")
            for out in (p, o):
                p_ = {"prompt": f"What is {10 + i}+{20 + i}?", "chosen": str(30 + 2 * i), "rejected": str(31 + 2 * i)}
                out.write(json.dumps(p_) + "\n")
    return {"model": tiny_model_dir(str(d / "model")), "other_model": tiny_model_dir(str(d / "other_model"), seed=1),
            "sft": str(d / "sft.jsonl"), "pairs": str(d / "pairs.jsonl"), "other": str(d / "other.jsonl")}


@pytest.mark.parametrize("name, args, command", [
    ("dpo", [], "`python train_sft.py`"), ("rm", [], "`python train_sft.py`"), ("ppo", [], "`python train_sft.py`"),
    ("distill", [], "`python train_sft.py`"),
    ("distill", ["--model", "{model}"], "`python train_ppo.py`"),
    ("sft", ["--lora-r", "8"], "`python train_sft.py --max-steps 300 --out runs/sft_base`"),
])
def test_missing_prerequisite_names_the_command_and_writes_nothing(files, tmp_path, monkeypatch, capsys, name, args,
                                                                    command):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(name, [a.format(**files) for a in args], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "error: no ", command)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name, args, flag", [
    ("sft", ["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
    ("dpo", ["--model", "no/such/dir"], "--model no/such/dir: no such file"),
    ("ppo", ["--model", "{model}", "--reward-fn", "data.prepare_gsm8k:gsm8k"], "--reward-fn data.prepare_gsm8k:gsm8k"),
    ("ppo", ["--model", "{model}", "--reward-fn", "no_such_module:fn"], "--reward-fn no_such_module:fn"),
    ("ppo", ["--model", "{model}", "--reward-fn", "data.task"], "--reward-fn 'data.task': expected module:function"),
    ("sft", ["--model", "{model}", "--data", "{sft}", "--lora-r", "100000"], "--lora-r 100000: larger than"),
    ("dpo", ["--loss", "nope"], "--loss 'nope': expected one of"),
    ("ppo", ["--batch-size", "4"], "--batch-size: not used by this script"),
    ("sft", ["--report-to", "wandb,mlflow"], "--report-to 'mlflow'"),
    ("sft", ["--quantize", "nf4"], "--quantize nf4 freezes the base weights"),
])
def test_user_mistakes_are_one_line_naming_the_flag(files, tmp_path, monkeypatch, capsys, name, args, flag):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(name, [a.format(**files) for a in args], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, flag)
    assert not os.path.exists(tmp_path / "runs" / name)  # no output directory started


@pytest.mark.slow
def test_a_mistake_from_the_command_line_prints_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), "--data", "missing.jsonl"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "error: --data missing.jsonl: no such file or directory", p.stderr


def test_help_shows_the_allowed_values(capsys):
    with pytest.raises(SystemExit):
        config.parse_config(train_ppo.PPOConfig, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "one of grpo | rloo | reinforce_pp | ppo | online_dpo" in text
    assert "comma list of wandb | tensorboard" in text
    assert "--batch-size" not in text  # refused by PPO's parser, so not offered


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_every_flag_declares_its_help(name):
    classes = [v for v in vars(SCRIPTS[name]).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
               and issubclass(v, config.TrainConfig) and v is not config.TrainConfig]
    assert classes, name
    for cls in classes:
        missing = [config.flag(f.name) for f in dataclasses.fields(cls) if not f.metadata.get("help", "").strip()]
        assert not missing, f"{cls.__name__}: no help for {', '.join(missing)} (declare it: config.arg(default, help))"


@pytest.mark.parametrize("rank, lines", [("0", 1), ("1", 0)])
def test_a_pretrained_model_names_the_defaults_it_gets_in_one_line(tmp_path, monkeypatch, capsys, rank, lines):
    with open(tmp_path / "config.json", "w") as f:  # a vocabulary other than the task's: a pretrained model
        json.dump({"model_type": "llama", "vocab_size": 49152, "max_position_embeddings": 4096}, f)
    monkeypatch.setenv("RANK", rank)
    config.parse_config(train_dpo.DPOConfig, ["--model", str(tmp_path), "--beta", "0.2"])
    out = capsys.readouterr().out.splitlines()
    assert len(out) == lines, out  # rank 0 only
    applied = {k: v for k, v in train_dpo.DPOConfig.REAL_MODEL.items() if k != "beta"}  # a flag given wins
    for line in out:
        assert all(f"{config.flag(k)} {v}" in line for k, v in applied.items()) and "--beta" not in line, line


@pytest.mark.slow
def test_resume_may_change_the_lr_and_refuses_what_defines_the_run(files, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["--model", files["model"], "--data", files["pairs"], "--out", "o", "--max-steps", "3", "--batch-size", "4",
            "--warmup-steps", "0", "--log-every", "1", "--eval-every", "0", "--lr", "1e-3"]
    assert run("dpo", base + ["--stop-after", "1"], monkeypatch, capsys)[0] == 0
    for flag, value in (("--model", files["other_model"]), ("--data", files["other"]), ("--loss", "ipo")):
        args = base + ["--resume", flag, value]
        code, _, err = run("dpo", args, monkeypatch, capsys)
        assert code == 2
        assert_one_line(err, "error: --resume:", f"belongs to a run with {flag}")
    assert [m["step"] for m in metrics("o")] == [1]  # the refusals wrote nothing (no eval data: no eval records)
    code, out, _ = run("dpo", base[:-1] + ["5e-4", "--resume", "--max-steps", "4"], monkeypatch, capsys)
    assert code == 0
    assert "with changed settings: --lr 0.001 -> 0.0005, --max-steps 3 -> 4" in out
    lr = {m["step"]: m["lr"] for m in metrics("o") if "lr" in m}
    cfg = train_dpo.DPOConfig(lr=5e-4, warmup_steps=0, max_steps=4)
    # metrics.jsonl rounds to 6 decimals
    assert lr[1] == pytest.approx(common.lr_at(0, train_dpo.DPOConfig(lr=1e-3, warmup_steps=0, max_steps=3)), abs=1e-6)
    assert [lr[s] for s in (2, 3, 4)] == pytest.approx([common.lr_at(s - 1, cfg) for s in (2, 3, 4)], abs=1e-6)
    assert os.path.exists("o/model/config.json")


@pytest.mark.slow
def test_distill_takes_qlora_and_exports_like_the_others(files, tmp_path, monkeypatch, capsys):
    """--lora-r 8 --quantize nf4 on the student: adapters train on a 4-bit base; out/adapter is a
    PEFT adapter and out/model the merged model, which transformers loads."""
    monkeypatch.chdir(tmp_path)
    args = ["--model", files["model"], "--teacher", files["other_model"], "--data", files["sft"], "--out", "o",
            "--max-steps", "3", "--batch-size", "8", "--log-every", "1", "--eval-every", "0", "--lr", "1e-2",
            "--lora-r", "8", "--quantize", "nf4", "--lmbda", "0.5"]
    assert run("distill", args, monkeypatch, capsys)[0] == 0
    log = [m for m in metrics("o") if "loss" in m]
    assert len(log) == 3 and all(m["grad_norm"] > 0 for m in log)
    with open("o/adapter/adapter_config.json") as f:
        adapter = json.load(f)
    assert adapter["r"] == 8 and adapter["base_model_name_or_path"] == files["model"]
    import transformers
    merged = transformers.AutoModelForCausalLM.from_pretrained("o/model")
    base = hf_io.from_pretrained(files["model"])
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, base(ids), atol=1e-4)  # the adapters learned something
