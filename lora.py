"""
LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") in plain torch.

A targeted projection W becomes W x + scaling * B(A(dropout(x))), with A [r, in] initialised
Kaiming-uniform and B [out, r] zero (as PEFT does), so training starts from the base model exactly.
scaling = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023). Only A and B (and a
trained head, `modules_to_save`) require grad; the base stays frozen.

Module names follow PEFT (`base_layer`, `lora_A`, `lora_B`), so an adapter exports to PEFT's format
by renaming keys (`peft_state_dict`). `adapters_disabled(model)` turns every adapter off: the frozen
base, i.e. the DPO/PPO reference, from the same weights (no second copy).
"""
import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn as nn
from safetensors.torch import save_file

import hf_io

# HF leaf names (PEFT's target_modules) of GPT-2 -> our leaf names; nanotrl splits c_attn into q/k/v
GPT2_TARGETS = {"c_attn": ("q_proj", "k_proj", "v_proj"), "c_proj": ("o_proj", "down_proj"), "c_fc": ("up_proj",)}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """Wraps any base exposing in_features/out_features (nn.Linear, or a quantized linear)."""

    def __init__(self, base_layer, r, alpha, dropout=0.0, rslora=False, generator=None):
        super().__init__()
        self.base_layer, self.r, self.alpha = base_layer, r, alpha
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = dense_weight(base_layer)  # for the dtype and device (a quantized base dequantizes once, here)
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)  # PEFT's (and nn.Linear's) init
        nn.init.zeros_(self.lora_B.weight)
        self.disabled = False

    def forward(self, x):
        y = self.base_layer(x)
        if self.disabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def dense_weight(layer):
    """The base's weight as a dense [out, in] tensor (quantized bases dequantize)."""
    return layer.dequantize() if hasattr(layer, "dequantize") else layer.weight


def resolve_targets(model, targets: str):
    """--lora-targets (PEFT target_modules: comma-separated leaf names, or all-linear) -> our leaf
    names. GPT-2 takes HF's names (c_attn, c_proj, c_fc)."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if {"lm_head", "score"} & set(names):  # the chunked log-probs read the head's weight directly
        raise ValueError(f"--lora-targets {targets!r}: adapters on the head are not supported (a score head trains fully)")
    if names == ["all-linear"]:
        return set(ALL_LINEAR)
    if model.cfg.gpt2:
        bad = [n for n in names if n not in GPT2_TARGETS]
        if bad:
            raise ValueError(f"--lora-targets {targets!r}: {bad} name no GPT-2 module (GPT-2's are c_attn, c_proj, c_fc)")
        return {ours for n in names for ours in GPT2_TARGETS[n]}
    return set(names)


def apply_lora(model, r, alpha, dropout=0.0, targets="all-linear", rslora=False, modules_to_save=(), seed=0,
               part=None, generator=None):
    """Wrap every module whose leaf name is a target in a LoRALinear, in place, after the weights
    are loaded (HF key names load unchanged). Freezes everything except the adapters and
    `modules_to_save` (e.g. ("score",)). The adapters' init is a function of `seed` alone.
    `part` (a block) wraps that block's modules only, as the streamed loader (common.load_model)
    does block by block before sharding each: with one `generator` for all blocks, then
    `freeze_base`, the result equals one call on the whole model."""
    if r <= 0:
        raise ValueError(f"--lora-r must be > 0 to add adapters, got {r}")
    wanted = resolve_targets(model, targets)
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    scope = model if part is None else part
    hits = [(n, m) for n, m in scope.named_modules() if n.rsplit(".", 1)[-1] in wanted and hasattr(m, "in_features")]
    if not hits:
        raise ValueError(f"--lora-targets {targets!r} matches no module of the {model.cfg.model_type} model "
                         f"(its projections: {', '.join(sorted(GPT2_TARGETS) if model.cfg.gpt2 else ALL_LINEAR)})")
    narrow = min(hits, key=lambda h: min(h[1].in_features, h[1].out_features))
    if r > min(narrow[1].in_features, narrow[1].out_features):
        k = min(narrow[1].in_features, narrow[1].out_features)
        raise ValueError(f"--lora-r {r}: larger than {narrow[0]} ({narrow[1].in_features} -> {narrow[1].out_features}), "
                         f"whose update has rank {k} at most; use --lora-r {k} or less")
    for name, m in hits:
        parent, leaf = scope.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        setattr(parent, leaf, LoRALinear(m, r, alpha, dropout, rslora, g))
    if part is None:
        freeze_base(model, r, alpha, dropout, rslora, modules_to_save)
    return model


def freeze_base(model, r, alpha, dropout, rslora, modules_to_save):
    """Only the adapters and `modules_to_save` train; records the LoRA settings on the model."""
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    for name in modules_to_save:
        model.get_submodule(name).requires_grad_(True)
    model.lora = dict(r=r, alpha=alpha, dropout=dropout, rslora=rslora, modules_to_save=list(modules_to_save),
                      targets=sorted({n.rsplit(".", 1)[-1] for n, _ in lora_layers(model)}))


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_disabled(model):
    """The base model: every adapter off for the duration (a no-op on a model without LoRA)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


@torch.no_grad()
def merge_(model):
    """Fold scaling * B @ A into each base weight and unwrap it, in place: the model becomes the plain
    HF-named model. Works on FSDP2's sharded DTensors too (B and W are both sharded by output row;
    DTensor gathers the small A), so no rank holds an unsharded model. The scripts' export is
    `dense_state_dict` instead, block by block, which leaves the model as it is."""
    for name, m in lora_layers(model):
        base, w = m.base_layer, dense_weight(m.base_layer)
        delta = (m.lora_B.weight.float() @ m.lora_A.weight.float() * m.scaling).to(w.dtype)
        if isinstance(base, nn.Linear):
            w.add_(delta)
        else:  # a quantized base has no dense weight to update: the merged layer is a dense nn.Linear
            bias = getattr(base, "bias", None)
            base = nn.Linear(base.in_features, base.out_features, bias=bias is not None, device=w.device, dtype=w.dtype)
            base.weight = nn.Parameter(w + delta, requires_grad=False)
            if bias is not None:
                base.bias = nn.Parameter(bias.detach().to(w.dtype), requires_grad=False)
        parent, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        setattr(parent, leaf, base)
    return model


@torch.no_grad()
def dense_state_dict(module, prefix="", exclude=None):
    """`module`'s tensors under their HF-style names (`prefix` + name) as the plain model has them:
    quantized bases dequantized, adapters merged into their base (new tensors, the module is
    unchanged). Names starting with `exclude` are left out. Run on full (unsharded) parameters."""
    out, done = {}, []
    for name, m in module.named_modules(prefix=prefix.rstrip(".")):
        if any(name.startswith(d) for d in done) or (exclude and name.startswith(exclude)):
            continue
        if isinstance(m, LoRALinear) or hasattr(m, "dequantize"):
            base = m.base_layer if isinstance(m, LoRALinear) else m
            w = dense_weight(base).detach().clone()
            if isinstance(m, LoRALinear):
                w.add_((m.lora_B.weight.float() @ m.lora_A.weight.float() * m.scaling).to(w.dtype))
            out[name + ".weight"] = w
            if base.bias is not None:
                out[name + ".bias"] = base.bias
            done.append(name + ".")
        else:
            out.update({f"{name}.{k}" if name else k: p for k, p in m.named_parameters(recurse=False)})
    return out


def peft_config(model, base_model_name_or_path):
    """adapter_config.json as PEFT writes it, for the adapters apply_lora added."""
    c = model.lora
    targets, rank_pattern, alpha_pattern = c["targets"], {}, {}
    if model.cfg.gpt2:
        targets = sorted({hf for hf, ours in GPT2_TARGETS.items() if set(ours) & set(c["targets"])})
        if "c_attn" in targets:  # q, k, v adapters as one block-diagonal adapter of rank 3r (see peft_state_dict)
            rank_pattern["c_attn"] = 3 * c["r"]
            alpha_pattern["c_attn"] = c["alpha"] * (math.sqrt(3) if c["rslora"] else 3)  # same scaling at 3r
    return {"peft_type": "LORA", "task_type": "SEQ_CLS" if model.head == "score" else "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path, "r": c["r"], "lora_alpha": c["alpha"],
            "lora_dropout": c["dropout"], "use_rslora": c["rslora"], "target_modules": targets,
            "modules_to_save": c["modules_to_save"] or None, "rank_pattern": rank_pattern,
            "alpha_pattern": alpha_pattern, "bias": "none", "fan_in_fan_out": model.cfg.gpt2,
            "init_lora_weights": True, "inference_mode": True}


def peft_state_dict(model, sd):
    """Our trainable tensors `sd` (adapters, saved heads; full, not sharded) under PEFT's key names:
    base_model.model.<HF module>.lora_A.weight, and modules_to_save heads as <HF module>.weight.
    GPT-2's q/k/v adapters become one c_attn adapter of rank 3r: A = [A_q; A_k; A_v] and B
    block-diagonal, which is the same update (B A x = [B_q A_q x; B_k A_k x; B_v A_v x])."""
    out, qkv = {}, {}
    for k, t in sd.items():
        if model.cfg.gpt2 and ".self_attn." in k and k.split(".")[4] in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault(k.split(".")[2], {})[k.split(".")[4] + k.split(".")[5][-1]] = t
            continue
        k = k.replace(".base_layer", "")
        if model.cfg.gpt2:
            k = gpt2_module_name(k)
        out["base_model.model." + k] = t.contiguous()
    for i, d in qkv.items():
        pre = f"base_model.model.transformer.h.{i}.attn.c_attn."
        out[pre + "lora_A.weight"] = torch.cat([d["q_projA"], d["k_projA"], d["v_projA"]])
        out[pre + "lora_B.weight"] = torch.block_diag(d["q_projB"], d["k_projB"], d["v_projB"])
    return out


def gpt2_module_name(k):
    """Our parameter name -> HF GPT-2's (the adapter's part after the module path kept)."""
    names = {"self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
    if k.startswith("model.layers."):
        p = k.split(".")
        return f"transformer.h.{p[2]}.{names[p[3] + '.' + p[4]]}.{'.'.join(p[5:])}"
    return k  # score.weight


def save_adapter(path, config, sd):
    """<path>/adapter_config.json + adapter_model.safetensors, written atomically."""
    with hf_io.atomic_dir(path) as tmp:
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(sd, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
    return os.path.abspath(path)
