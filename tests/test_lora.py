"""lora.py against PEFT (the oracle) and LoRA in the training scripts.

Tolerances: our fp32 forward and transformers' differ by ~1e-6 in logits (fused SDPA vs eager
softmax, GPT-2's fused qkv); the adapters add the same low-rank update on both sides, so 1e-5
(the issue's bound) holds, while a wrong scaling, a missing transpose or an adapter on the wrong
module moves logits by >1e-2 at the adapter magnitudes used here. Where both sides run the same
ops in the same order (adapters off vs the base model, a live reference vs a separate copy) the
results must be bit-identical.
"""
import json
import os

import pytest
import torch
from safetensors.torch import load_file


import config
import lora
import hf_io
import model as M
import train_rm
from helpers import run_script, series, tiny_model_dir

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_model import batch, hf_tiny  # noqa: E402  (the same tiny HF checkpoints test_model uses)


def randomize_adapters(model, seed=0):
    """B = 0 makes any adapter look right: give A and B values that move the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(model):
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


@pytest.mark.parametrize("family,targets,rslora", [("llama", "all-linear", False), ("qwen2", "q_proj,v_proj,down_proj", True),
                                                   ("gpt2", "c_attn,c_proj,c_fc", False), ("gpt2", "c_fc,c_proj", True)])
def test_forward_and_exports_match_peft(family, targets, rslora, tmp_path):
    hf = hf_tiny(family)
    hf.save_pretrained(tmp_path / "base")
    ours = lora.apply_lora(hf_io.from_pretrained(tmp_path / "base"), r=4, alpha=8, targets=targets, rslora=rslora)
    randomize_adapters(ours)
    trainable = {n: p.detach() for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    sd = lora.peft_state_dict(ours, trainable)
    config = lora.peft_config(ours, str(tmp_path / "base"))
    lora.save_adapter(tmp_path / "adapter", config, sd)
    # PEFT's own key names and shapes for the same config
    native = peft.get_peft_model(hf_tiny(family), peft.LoraConfig(**{k: v for k, v in config.items() if k != "peft_type"}))
    expected = {k: v.shape for k, v in peft.get_peft_model_state_dict(native).items()}
    assert {k: v.shape for k, v in sd.items()} == expected
    ids, mask, pos = batch()
    real = mask.bool()
    with torch.no_grad():
        got = ours(ids, mask, pos)
        with lora.adapters_disabled(ours):
            off = ours(ids, mask, pos)
        pm = peft.PeftModel.from_pretrained(hf_tiny(family), tmp_path / "adapter").eval()
        ref = pm(ids, attention_mask=mask, position_ids=pos).logits
        assert (got - off)[real].abs().max() > 1e-2  # the adapters matter
        assert (got - ref)[real].abs().max() <= 1e-5
        # merged: the same logits, saved as a plain HF directory that transformers loads
        hf_io.save_pretrained(lora.merge_(ours), tmp_path / "merged")
        assert not lora.lora_layers(ours)
        merged = ours(ids, mask, pos)
        assert (merged - got)[real].abs().max() <= 1e-5
        hf_merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
        assert (hf_merged(ids, attention_mask=mask, position_ids=pos).logits - ref)[real].abs().max() <= 1e-5


def test_adapters_off_is_the_base_exactly():
    cfg = M.ModelConfig(num_layers=2)
    base = M.Transformer(cfg)
    base.init_weights(seed=0)
    ours = M.Transformer(cfg)
    ours.load_state_dict(base.state_dict())
    lora.apply_lora(ours, r=8, alpha=16)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(ids)
        assert torch.equal(ours(ids), want)  # B = 0 at init: the update adds exact zeros
        randomize_adapters(ours)
        assert not torch.equal(ours(ids), want)
        with lora.adapters_disabled(ours):
            assert torch.equal(ours(ids), want)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)


class Dequantizing(torch.nn.Module):
    """A stand-in for a quantized linear (issue 12's NF4): no `weight`, only `dequantize()`."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features, self.bias = linear.in_features, linear.out_features, linear.bias
        self.register_buffer("packed", linear.weight.detach().clone())

    def dequantize(self):
        return self.packed

    def forward(self, x):
        return torch.nn.functional.linear(x, self.dequantize(), self.bias)


def test_any_base_with_in_out_features_and_dequantize():
    model = M.Transformer(M.ModelConfig(num_layers=1, qkv_bias=True))
    model.init_weights(seed=0)
    for name, m in list(model.named_modules()):
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            parent, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
            setattr(parent, leaf, Dequantizing(m))
    lora.apply_lora(model, r=4, alpha=8)
    randomize_adapters(model)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
        lora.merge_(model)
        assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)  # merged into a dense layer
        assert (model(ids) - want).abs().max() <= 1e-5


# ----------------------------------------------------------------------------- in the scripts

SFT = ["--max-steps", "6", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0", "--eval-samples", "16",
       "--batch-size", "8", "--lr", "3e-3", "--lora-r", "8"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("lora") / "base"))


@pytest.fixture(scope="module")
def single(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("single")
    sft(base, ["--out", "o"], d)
    return d


def sft(base, args, cwd, nproc=1):
    data = os.path.join(os.path.dirname(base), "task", "train.jsonl")  # tiny_model_dir wrote the task there
    return run_script("train_sft.py", SFT + ["--model", base, "--data", data] + args, cwd, nproc)


def adapter(out):
    return load_file(os.path.join(out, "adapter", "adapter_model.safetensors"))


def assert_same_runs(a, b, rtol, atol):
    """Same losses and grad norms per step, and the same trained adapters. Tolerances as in
    test_train_sft.py (summation order only; Adam amplifies it on near-zero gradients)."""
    for key in ("loss", "grad_norm"):
        x, y = series(a, key), series(b, key)
        assert x.keys() == y.keys() and len(x) == 6
        assert all(abs(x[k] - y[k]) <= rtol * abs(x[k]) for k in x), (key, x, y)
    wa, wb = adapter(a), adapter(b)
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= atol


@pytest.mark.slow
def test_lora_sft_one_vs_two_processes(single, base, tmp_path):
    sft(base, ["--out", "o", "--batch-size", "4"], tmp_path, nproc=2)  # 2 x 4 = 8
    assert_same_runs(single / "o", tmp_path / "o", 1e-5, 1e-4)
    # the merged export is the same model on 1 and 2 processes
    a, b = (load_file(os.path.join(d, "model", "model.safetensors")) for d in (single / "o", tmp_path / "o"))
    assert a.keys() == b.keys() and not any("lora" in k or "base_layer" in k for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4


@pytest.mark.slow
def test_lora_sft_grad_accum_and_resume(single, base, tmp_path):
    sft(base, ["--out", "acc", "--batch-size", "2", "--grad-accum", "4"], tmp_path)
    assert_same_runs(single / "o", tmp_path / "acc", 1e-5, 1e-4)
    sft(base, ["--out", "r", "--stop-after", "3"], tmp_path)
    ckpt = tmp_path / "r" / "checkpoints" / "step_00000003"
    import torch.distributed.checkpoint as dcp
    keys = list(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys), model_keys  # adapters only
    assert sum(os.path.getsize(ckpt / f) for f in os.listdir(ckpt)) < 0.5 * os.path.getsize(os.path.join(base, "model.safetensors"))
    sft(base, ["--out", "r", "--resume"], tmp_path)
    assert_same_runs(single / "o", tmp_path / "r", 0.0, 0.0)  # resume repeats the same fp32 arithmetic


@pytest.mark.slow
def test_rm_adapter_and_score_head_load_in_peft(base, tmp_path):
    from helpers import write_pairs
    args = ["--model", base, "--data", write_pairs(tmp_path / "p.jsonl", 64, 0), "--out", str(tmp_path / "rm"),
            "--max-steps", "3", "--batch-size", "8", "--warmup-steps", "1", "--eval-every", "0", "--lr", "1e-2",
            "--lora-r", "4", "--lora-targets", "q_proj,v_proj"]
    train_rm.main(config.parse_config(train_rm.RMConfig, args))
    cfg = json.load(open(tmp_path / "rm" / "adapter" / "adapter_config.json"))
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"] and cfg["base_model_name_or_path"] == base
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf_base, tmp_path / "rm" / "adapter").eval()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model", dtype=torch.float32).eval()
    ids = torch.randint(5, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = pm(ids).logits, merged(ids).logits
    assert (a - b).abs().max() <= 1e-5 and a.std() > 1e-3


@pytest.fixture(scope="module")
def pairs(base, tmp_path_factory):
    from helpers import write_pairs
    d = tmp_path_factory.mktemp("pairs")
    return {"model": base, "train": write_pairs(d / "train.jsonl", 256, 0), "eval": write_pairs(d / "eval.jsonl", 64, 1)}


def dpo(setup, out, *extra, steps=3):
    from test_train_dpo import dpo as run
    return run(setup, out, "--lora-r", "8", *extra, steps=steps)


@pytest.mark.slow
def test_dpo_adapters_off_reference_equals_a_copy(pairs, tmp_path):
    live = series(dpo(pairs, tmp_path / "live"), "loss")
    copy = series(dpo(pairs, tmp_path / "copy", "--ref-model", pairs["model"]), "loss")
    assert live == copy and abs(live[1] - 0.6931471805599453) < 1e-6 and live[3] != live[1]
    pre = series(dpo(pairs, tmp_path / "pre", "--precompute-ref"), "loss")
    assert all(abs(live[k] - pre[k]) < 1e-5 for k in live)  # other padded lengths: fp32 noise only


@pytest.mark.slow
def test_dpo_lora_one_vs_two_processes(pairs, tmp_path):
    one = series(dpo(pairs, tmp_path / "one", steps=4), "loss")
    args = ["--model", pairs["model"], "--data", pairs["train"], "--out", "two", "--max-steps", "4", "--batch-size", "4",
            "--warmup-steps", "1", "--log-every", "1", "--eval-every", "0", "--lr", "1e-3", "--rpo-alpha", "0", "--lora-r", "8"]
    run_script("train_dpo.py", args, tmp_path, nproc=2)
    two = series(tmp_path / "two", "loss")
    assert one.keys() == two.keys() and all(abs(one[k] - two[k]) < 1e-5 for k in one), (one, two)


@pytest.mark.slow
def test_ppo_lora_reference_and_critic(base, tmp_path):
    args = ["--model", base, "--out", "o", "--algo", "ppo", "--beta", "0.05", "--max-steps", "2", "--prompts-per-step", "4",
            "--group-size", "2", "--max-new-tokens", "6", "--eval-every", "0", "--eval-samples", "8", "--log-every", "1",
            "--lora-r", "8"]
    run_script("train_ppo.py", args, tmp_path)  # FSDP with the adapters-off reference: test_dpo_lora_one_vs_two_processes
    assert series(tmp_path / "o", "kl")[1] == 0.0  # adapters start at B = 0: the reference is the policy exactly
    assert sorted(series(tmp_path / "o", "value_loss")) == [1, 2]  # the critic (adapters + score head) trains
    assert os.path.exists(tmp_path / "o" / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("flags,message", [(["--lora-r", "-1"], "--lora-r"), (["--lora-r", "4", "--lora-targets", "qproj"], "--lora-targets"),
                                           (["--lora-r", "4", "--lora-targets", "lm_head"], "--lora-targets")])
def test_bad_lora_flags(pairs, tmp_path, capsys, flags, message):
    # a negative rank is refused by the flag parser (SystemExit, message on stderr), bad targets by
    # lora.py (as common.UsageError, a ValueError)
    with pytest.raises((ValueError, SystemExit)) as e:
        dpo(pairs, tmp_path / "o", *flags)
    assert message in (str(e.value) if isinstance(e.value, ValueError) else capsys.readouterr().err)
