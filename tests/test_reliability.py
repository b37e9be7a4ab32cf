"""Failure and recovery: runs never mix in one --out, NaN never reaches the weights, resume unpickles
nothing of ours, every user mistake names its file, flags are range-checked, RL data is checked at
load time. Runs are in-process (train_*.main) on 32 records of the built-in task: a few seconds each."""
import gzip
import json
import os
import pickle

import pytest
import torch

import checkpoint
import common
import config
import hf_io
import model as M
import train_ppo
import train_sft
from data import chat, formats, task
from helpers import metrics, tiny_model_dir

SFT = ["--max-steps", "4", "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0", "--batch-size", "4",
       "--lr", "3e-3", "--data", "d.jsonl", "--eval-data", "d.jsonl"]


@pytest.fixture
def here(tmp_path, monkeypatch):
    """tmp_path as the working directory, with d.jsonl: 32 SFT records of the built-in task."""
    monkeypatch.chdir(tmp_path)
    tdir = task.ensure_task(task.TASK_DIR)
    with open(os.path.join(tdir, "train.jsonl")) as f:
        (tmp_path / "d.jsonl").write_text("".join(f.readlines()[:32]))
    return tmp_path


def sft(*args):
    train_sft.main(config.parse_config(train_sft.SFTConfig, [str(a) for a in args]))


def steps(out):
    return [m["step"] for m in metrics(out) if "loss" in m]


def checkpoints(out):
    return sorted(os.listdir(os.path.join(out, "checkpoints")))


# ----------------------------------------------------------------------------- 1. runs never mix

@pytest.mark.slow
def test_runs_never_mix(here, capsys):
    sft(*SFT, "--save-every", "2", "--out", "o")  # a finished run: checkpoints 2 and 4, model/
    before = {n: (here / "o" / n).read_bytes() for n in ("metrics.jsonl", "config.json")}
    # the reproduction: another run (other lr) in the same --out must not start there...
    with pytest.raises(checkpoint.RunError, match="o holds another run .*--overwrite"):
        sft(*SFT, "--lr", "1e-4", "--stop-after", "1", "--out", "o")
    # ...nor continue the first run's checkpoint with a field that defines the run changed (--lr may
    # change on resume: see the end); the message names the field that differs
    with pytest.raises(checkpoint.RunError, match="--batch-size 4; this one has 8"):
        sft(*SFT, "--batch-size", "8", "--resume", "--out", "o")
    with pytest.raises(ValueError, match="pass one of them"):
        sft(*SFT, "--resume", "--overwrite", "--out", "o")
    # --overwrite deletes nothing before the new run's inputs are validated
    (here / "bad.jsonl").write_text('{"prompt": "a", "completion": 3}\n')
    with pytest.raises(formats.DataError, match="bad.jsonl:1"):
        sft(*SFT, "--data", "bad.jsonl", "--overwrite", "--out", "o")
    assert before == {n: (here / "o" / n).read_bytes() for n in before}  # refused runs wrote nothing
    assert checkpoints(here / "o") == ["step_00000002", "step_00000004"] and (here / "o" / "model").exists()
    # --overwrite clears the old run; its own checkpoint is then what --resume continues
    sft(*SFT, "--lr", "1e-4", "--stop-after", "1", "--overwrite", "--out", "o")
    assert checkpoints(here / "o") == ["step_00000001"] and not (here / "o" / "model").exists()
    assert json.loads((here / "o" / "config.json").read_text())["lr"] == 1e-4
    capsys.readouterr()
    sft(*SFT, "--lr", "5e-5", "--resume", "--max-steps", "5", "--out", "o")  # --lr may change, --max-steps grow
    assert "with changed settings: --lr 0.0001 -> 5e-05, --max-steps 4 -> 5" in capsys.readouterr().out
    assert steps(here / "o") == [1, 2, 3, 4, 5] and (here / "o" / "model").exists()


# ----------------------------------------------------------------------------- 2. NaN never lands

def load_weights(ckpt, tdir):
    model = M.Transformer(hf_io.read_config(tdir))
    model.init_weights(seed=1)
    opt = common.make_optimizer(model, config.TrainConfig())
    checkpoint.load_checkpoint(ckpt, common.Dist(0, 1, torch.device("cpu"), None), {"model": (model, opt)})
    return model


@pytest.mark.slow
def test_nan_stops_before_the_optimizer_step(here):
    # lr 1e4: step 1's update is finite but huge, step 2's gradient is NaN; today's code applied it
    # and saved step 2's NaN weights as the newest checkpoint
    with pytest.raises(FloatingPointError, match=r"step 2: grad_norm is nan"):
        sft(*SFT, "--lr", "1e4", "--save-every", "1", "--out", "o")
    assert checkpoints(here / "o") == ["step_00000001"] and not (here / "o" / "model").exists()
    model = load_weights(str(here / "o" / "checkpoints" / "step_00000001"), task.TASK_DIR)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("flag, quantity", [("--lr", "grad_norm"), ("--value-lr", "value grad_norm")])
def test_ppo_nan_stops_before_the_optimizer_step(here, flag, quantity):
    """The policy's, then the critic's: a huge lr makes the first minibatch's update blow up the
    second minibatch's gradient. Today's code stepped with it and died in the next rollout."""
    policy = tiny_model_dir(str(here / "policy"))
    args = ["--model", policy, "--out", "o", flag, "1e4", "--max-steps", "3", "--prompts-per-step", "4",
            "--group-size", "4", "--minibatches", "2", "--max-new-tokens", "4", "--eval-every", "0", "--eval-samples", "4",
            "--algo", "ppo"]
    with pytest.raises(FloatingPointError, match=f"step 1: {quantity} is nan"):
        train_ppo.main(config.parse_config(train_ppo.PPOConfig, args))


def test_never_saves_nonfinite_weights(here):
    model = M.Transformer(hf_io.read_config(task.TASK_DIR))
    model.init_weights(seed=0)
    with torch.no_grad():
        model.model.norm.weight[3] = float("inf")
    dist = common.Dist(0, 1, torch.device("cpu"), None)
    with pytest.raises(FloatingPointError, match="model.norm.weight"):
        checkpoint.save_checkpoint("o", 7, dist, {"model": (model, common.make_optimizer(model, config.TrainConfig()))})
    assert not (here / "o").exists()


# ----------------------------------------------------------------------------- 3. resume unpickles nothing

class Payload:
    def __reduce__(self):
        return (open, ("pwned", "w"))


@pytest.mark.slow
def test_resume_unpickles_nothing_of_ours(here):
    sft(*SFT, "--stop-after", "2", "--out", "o")
    ckpt = here / "o" / "checkpoints" / "step_00000002"
    for name in os.listdir(ckpt):  # every file we write is JSON or safetensors (DCP's own: .metadata, .distcp)
        assert name.endswith((".json", ".safetensors", ".distcp")) or name == ".metadata", name
    with open(ckpt / "rng_rank0.pt", "wb") as f:  # where today's code looked for its pickled RNG state
        pickle.dump(Payload(), f)
    sft(*SFT, "--resume", "--out", "o")
    assert not (here / "pwned").exists() and steps(here / "o") == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 4. errors name their file

@pytest.mark.slow
def test_model_and_tokenizer_errors_name_the_file(here):
    with pytest.raises(common.UsageError, match="--model nope: no such file or directory"):  # setup checks the path flags
        sft(*SFT, "--model", "nope", "--out", "o")
    with pytest.raises(FileNotFoundError, match="nope: no such directory"):
        chat.load_tokenizer("nope")
    d = tiny_model_dir(str(here / "m"))
    (here / "m" / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"m/config.json: invalid JSON"):
        hf_io.from_pretrained(d)
    (here / "m" / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match=r"m/tokenizer.json: not a valid tokenizer.json"):
        chat.load_tokenizer(d)
    os.remove(here / "m" / "tokenizer.json")
    with pytest.raises(FileNotFoundError, match=r"m/tokenizer.json: not found"):
        chat.load_tokenizer(d)
    d = tiny_model_dir(str(here / "m2"))
    st = here / "m2" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"m2/model.safetensors: not a readable safetensors file"):
        hf_io.from_pretrained(d)
    assert not (here / "o").exists()


def test_data_errors_name_the_file_and_line(here):
    (here / "latin1.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(formats.DataError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9"):
        formats.load_sft(str(here / "latin1.jsonl"))
    data = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(2000)))
    (here / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])
    with pytest.raises(formats.DataError, match=r"cut.jsonl.gz: truncated or corrupt gzip data after line \d+"):
        formats.load_sft(str(here / "cut.jsonl.gz"))


@pytest.mark.slow
def test_resume_skips_a_truncated_checkpoint_and_repairs_metrics(here, capsys):
    sft(*SFT, "--stop-after", "2", "--save-every", "1", "--out", "o")
    shard = here / "o" / "checkpoints" / "step_00000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:len(shard.read_bytes()) // 2])
    with open(here / "o" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed while writing a line
    sft(*SFT, "--resume", "--out", "o")
    out = capsys.readouterr().out
    assert "skipping checkpoint" in out and "step_00000002: __0_0.distcp is truncated" in out
    assert "resumed from" in out and "step_00000001 at step 1" in out
    assert steps(here / "o") == [1, 2, 3, 4]


@pytest.mark.slow
def test_corrupt_checkpoint_names_its_directory(here):
    sft(*SFT, "--stop-after", "1", "--out", "o")
    ckpt = here / "o" / "checkpoints" / "step_00000001"
    shard = ckpt / "__0_0.distcp"
    shard.write_bytes(b"\0" * len(shard.read_bytes()))  # same size: only reading it finds out
    with pytest.raises(RuntimeError, match=r"step_00000001: checkpoint cannot be read .*delete this directory"):
        load_weights(str(ckpt), task.TASK_DIR)


@pytest.mark.slow
def test_full_disk_names_the_path(here, monkeypatch):
    """A full disk, simulated by sending every checkpoint write to /dev/full (ENOSPC)."""
    import builtins
    import io

    real_open = io.open

    def full_open(file, mode="r", *a, **kw):
        if "checkpoints" in str(file) and any(c in mode for c in "wa"):
            return real_open("/dev/full", mode, *a, **kw)
        return real_open(file, mode, *a, **kw)

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    monkeypatch.setattr(io, "open", full_open)
    monkeypatch.setattr(builtins, "open", full_open)
    with pytest.raises(OSError, match=r"no space left on device: .*o/checkpoints/step_00000001.tmp"):
        sft(*SFT, "--save-every", "1", "--out", "o")


# ----------------------------------------------------------------------------- 5. flags

@pytest.mark.parametrize("cls, flag, value", [
    (train_sft.SFTConfig, "--batch-size", "0"), (train_sft.SFTConfig, "--grad-accum", "0"),
    (train_sft.SFTConfig, "--log-every", "0"), (train_sft.SFTConfig, "--chunk-size", "0"),
    (train_sft.SFTConfig, "--max-steps", "-5"), (train_sft.SFTConfig, "--save-every", "-1"),
    (train_sft.SFTConfig, "--lr", "nan"), (train_ppo.PPOConfig, "--minibatches", "0"),
    (train_ppo.PPOConfig, "--top-p", "1.5")])
def test_flags_out_of_range_are_refused(cls, flag, value, capsys):
    with pytest.raises(SystemExit):
        config.parse_config(cls, [flag, value, "--out", "never"])
    assert f"{flag} {value}: expected a value in" in capsys.readouterr().err
    assert not os.path.exists("never")


@pytest.mark.parametrize("script", ["train_sft", "train_rm", "train_dpo", "train_ppo", "train_distill"])
def test_help_shows_defaults_and_descriptions(script, capsys):
    import importlib

    mod = importlib.import_module(script)
    cls = next(v for k, v in vars(mod).items() if k.endswith("Config") and v is not config.TrainConfig)
    with pytest.raises(SystemExit):
        config.parse_config(cls, ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(in [1, inf); default: " in text
    for f in __import__("dataclasses").fields(cls):  # every flag has a description and shows its default
        if f.name in cls.NOT_USED:  # refused by this script's parser, so not listed
            assert f"--{f.name.replace('_', '-')} " not in text, f.name
            continue
        assert f.metadata.get("help"), f"{script}: --{f.name.replace('_', '-')} has no help"
        assert f"default: {getattr(cls, f.name)!r}" in text or isinstance(f.default, bool), f.name


@pytest.mark.slow
def test_sft_with_model_and_no_data_trains_on_the_task(here):
    policy = tiny_model_dir(str(here / "m"))
    sft("--model", policy, "--out", "o", "--max-steps", "1", "--batch-size", "4", "--eval-every", "0",
        "--eval-data", "d.jsonl", "--eval-samples", "2")
    assert steps(here / "o") == [1]


# ----------------------------------------------------------------------------- 6. RL data

@pytest.mark.slow
def test_rl_records_are_checked_at_load_time(here):
    policy = tiny_model_dir(str(here / "m"))
    ok = {"prompt": "What is 1+2?", "answer": "3"}
    (here / "rl.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps({"prompt": "What is 2+2?"}) + "\n")
    args = ["--model", policy, "--data", "rl.jsonl", "--reward-fn", "data.task:reward_fn", "--out", "o"]
    with pytest.raises(formats.DataError, match=r"rl.jsonl:2: missing field 'answer', which the reward function"):
        train_ppo.main(config.parse_config(train_ppo.PPOConfig, args))
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "3"}]
    (here / "rl.jsonl").write_text(json.dumps(ok) + "\n" + json.dumps({"prompt": turns, "answer": "3"}) + "\n")
    with pytest.raises(formats.DataError, match=r"rl.jsonl:2: field 'prompt': ends with an assistant message"):
        train_ppo.main(config.parse_config(train_ppo.PPOConfig, args))
    assert not (here / "o").exists()
    assert train_ppo.load_reward_fn("data.task:reward_fn")[1] == ["answer"]


def test_identical_pairs_warn_with_count_and_lines(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a"}, {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "c"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match=r"p.jsonl: 2 of 3 pairs have identical chosen and rejected answers \(lines 1, 3\)"):
        formats.load_preference(str(tmp_path / "p.jsonl"))
    from data import cache  # the scripts' path: the data cache says the same, from its "same" column
    tok = chat.load_tokenizer(task.ensure_task(str(tmp_path / "task")))
    for _ in range(2):  # when it builds the cache and when it reuses it
        with pytest.warns(UserWarning, match=r"p.jsonl: 2 of 3 pairs have identical chosen and rejected answers \(lines 1, 3\)"):
            cache.load(str(tmp_path / "p.jsonl"), "preference", tok, {"max_length": 64, "max_prompt_length": 32})
