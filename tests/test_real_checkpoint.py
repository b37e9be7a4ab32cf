"""What a user of a real checkpoint meets: TRL's defaults when --model is a pretrained model (the
built-in task keeps its own), sequence lengths checked against the model's positions, RL on
their own data needing a reward, a warning when rewards have no spread, saved files that follow
the umask, a model card the Hub reads, no empty log records, and generate.py answering."""
import json
import os
import subprocess
import sys

import pytest
import torch

import config
import hf_io
import train_dpo
import train_ppo
import train_sft
from helpers import ROOT, metrics, run_script, tiny_model_dir


def pretrained_dir(path, positions=2048):
    """A config.json as a real checkpoint has one (a large vocabulary): all the parser reads."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "vocab_size": 49152, "max_position_embeddings": positions}, f)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("real") / "model"))


def test_a_pretrained_model_gets_trls_defaults_and_flags_given_win(tmp_path, tiny, capsys):
    real = pretrained_dir(tmp_path / "real")
    sft = config.parse_config(train_sft.SFTConfig, ["--model", real])
    assert (sft.lr, sft.batch_size, sft.max_length) == (2e-5, 8, 1024)
    assert "TRL's defaults --lr 2e-05 --batch-size 8 --max-length 1024" in capsys.readouterr().out
    dpo = config.parse_config(train_dpo.DPOConfig, ["--model", real, "--lr=5e-7"])
    assert (dpo.lr, dpo.beta, dpo.max_prompt_length) == (5e-7, 0.1, 512)
    ppo = config.parse_config(train_ppo.PPOConfig, ["--model", real, "--max-new-tokens", "64"])
    assert (ppo.lr, ppo.max_new_tokens, ppo.max_prompt_length) == (1e-6, 64, 512)
    # the built-in task's models (its 100-character vocabulary) and no --model keep the task's defaults
    for argv in (["--model", tiny], []):
        assert config.parse_config(train_ppo.PPOConfig, argv).lr == train_ppo.PPOConfig.lr
    with pytest.raises(SystemExit):
        config.parse_config(train_sft.SFTConfig, ["--help"])
    assert "a real --model: 2e-05, TRL's" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("cls, argv, message", [
    (train_sft.SFTConfig, ["--max-length", "100000"], "--max-length 100000: longer than the 2048 positions"),
    (train_ppo.PPOConfig, ["--max-new-tokens", "2000"], "--max-prompt-length 512 + --max-new-tokens 2000: longer than"),
])
def test_lengths_beyond_the_models_positions_are_refused(tmp_path, capsys, cls, argv, message):
    with pytest.raises(SystemExit) as e:
        config.parse_config(cls, ["--model", pretrained_dir(tmp_path / "real"), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_a_default_beyond_the_positions_is_lowered_to_fit(tmp_path, tiny):
    assert config.parse_config(train_sft.SFTConfig, ["--model", tiny]).max_length == 256  # the task model's positions
    ppo = config.parse_config(train_ppo.PPOConfig, ["--model", pretrained_dir(tmp_path / "short", positions=600)])
    assert (ppo.max_prompt_length, ppo.max_new_tokens) == (600 - 256, 256)


def test_rl_on_other_data_needs_a_reward(tmp_path, tiny, monkeypatch, capsys):
    data = tmp_path / "rl.jsonl"
    data.write_text(json.dumps({"prompt": "Name a colour.", "answer": "red"}) + "\n")
    monkeypatch.setattr(sys, "argv", ["train_ppo.py", "--model", tiny, "--data", str(data), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        import common
        common.run(train_ppo.main, train_ppo.PPOConfig)
    err = capsys.readouterr().err.strip()
    assert "is not the built-in task" in err and "--reward-fn module:function" in err and "--reward-model" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_follow_the_umask(tmp_path, tiny, umask):
    old = os.umask(umask)
    try:
        path = hf_io.save_pretrained(hf_io.from_pretrained(tiny), tmp_path / "saved", tokenizer_dir=tiny)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask
    for name in os.listdir(path):
        assert os.stat(os.path.join(path, name)).st_mode & 0o777 == 0o666 & ~umask, name


def test_model_card_names_a_hub_id_when_the_config_has_one(tmp_path):
    import checkpoint
    d = pretrained_dir(tmp_path / "m")
    assert checkpoint._model_id(d) == "m"
    conf = json.load(open(os.path.join(d, "config.json")))
    json.dump({**conf, "_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}, open(os.path.join(d, "config.json"), "w"))
    assert checkpoint._model_id(d) == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_the_model_card_parses_and_transformers_loads_the_directory(tmp_path, tiny):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i}+1?", "completion": str(i + 1)}) + "\n" for i in range(16)))
    run_script("train_sft.py", ["--model", tiny, "--data", data, "--out", "o", "--max-steps", "2", "--batch-size", "4"],
               tmp_path)
    out = tmp_path / "o" / "model"
    from huggingface_hub import metadata_load  # the Hub's own reader of a card's front matter
    meta = metadata_load(out / "README.md")
    assert meta["base_model"] == "model" and meta["library_name"] == "transformers"
    assert meta["tags"][:2] == ["nanotrl", "sft"] and meta["datasets"] == ["sft.jsonl"]
    card = (out / "README.md").read_text()
    import hashlib
    assert hashlib.sha256(data.read_bytes()).hexdigest() in card and "| loss |" in card
    assert "--max-steps 2" in card
    # no record without a metric: with no eval data there is nothing to log at step 0
    assert all(len(r) > 1 for r in metrics(tmp_path / "o")) and metrics(tmp_path / "o")[0]["step"] == 1
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(hf(ids).logits, hf_io.from_pretrained(out)(ids), atol=1e-5)


@pytest.mark.slow
def test_flat_rewards_warn(tmp_path, tiny):
    # a random-init model never answers the task right: every reward is 0 from the first rollout
    p = run_script("train_ppo.py", ["--model", tiny, "--out", "o", "--max-steps", "3", "--prompts-per-step", "2",
                                    "--group-size", "2", "--max-new-tokens", "4", "--eval-samples", "4"], tmp_path)
    assert "warning: step 3: every reward of the last 3 rollouts was 0: no spread" in p.stderr, p.stderr[-2000:]


@pytest.mark.slow
def test_generate_answers_on_the_real_model():
    import real_model
    try:
        model_dir = real_model.model_dir()
    except real_model.Unavailable as e:
        pytest.skip(str(e))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", model_dir, "--prompt",
                        "What is the capital of France?", "--temperature", "0", "--max-new-tokens", "12"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "Paris" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", model_dir, "--temperature", "0",
                        "--max-new-tokens", "8"], input="What is 3+5?", capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "8" in p.stdout, p.stdout + p.stderr
