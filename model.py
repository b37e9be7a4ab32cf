"""
A from-scratch decoder-only transformer that reads and writes Hugging Face checkpoints.

One module covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3 and GPT-2. Module names follow HF's
Llama layout (model.layers.N.self_attn.q_proj, ...), so loading a Llama-family checkpoint is a key
copy with shape checks; GPT-2 is the one family that needs a name table (`_gpt2_to_ours`).

The head is either the LM head (`lm_head`, logits over the vocabulary) or a scalar `score` head
(reward / value model), which round-trips with HF's `*ForSequenceClassification`.

Conventions: `attention_mask [B, T]` is 0 for padding and a positive *document id* otherwise, so an
HF 0/1 mask works as is and packed rows (ids 1, 2, 3, ...) get a block-diagonal causal mask. Tokens
attend to earlier tokens of the same document only.
"""
import functools
import json
import math
import mmap
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FAMILIES = {  # model_type -> HF class-name prefix
    "llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gpt2": "GPT2",
}


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # the HF dict with rope_type "llama3" or "linear", else None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False       # Qwen2 (and Llama with attention_bias)
    o_bias: bool = False         # Llama attention_bias, GPT-2
    mlp_bias: bool = False       # Llama mlp_bias, GPT-2
    qk_norm: bool = False        # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    gpt2: bool = False           # LayerNorm, learned positions, gelu MLP, no gate
    sliding_window: int | None = None
    pad_token_id: int | None = None
    hf: dict = field(default_factory=dict, repr=False)  # the original config.json, re-saved as is

    @staticmethod
    def from_hf(d: dict, where: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"{where}: model_type {mt!r} is not supported (supported: {sorted(FAMILIES)})")
        if mt == "gpt2":
            D, H = d["n_embd"], d["n_head"]
            if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
                raise ValueError(f"{where}: activation_function {d['activation_function']!r} is not supported")
            return ModelConfig(
                model_type=mt, vocab_size=d["vocab_size"], hidden_size=D,
                intermediate_size=d.get("n_inner") or 4 * D, num_layers=d["n_layer"], num_heads=H,
                num_kv_heads=H, head_dim=D // H, max_position_embeddings=d["n_positions"],
                norm_eps=d.get("layer_norm_epsilon", 1e-5), tie_word_embeddings=d.get("tie_word_embeddings", True),
                qkv_bias=True, o_bias=True, mlp_bias=True, gpt2=True, pad_token_id=d.get("pad_token_id"), hf=d)
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        # transformers v5 writes rope_parameters; v4 checkpoints write rope_theta + rope_scaling.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type", "default"))
        if rtype not in ("default", "llama3", "linear"):
            raise ValueError(f"{where}: rope scaling type {rtype!r} is not supported (default, linear, llama3)")
        H = d["num_attention_heads"]
        window = d.get("sliding_window") if (mt == "mistral" or d.get("use_sliding_window")) else None
        return ModelConfig(
            model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"], num_heads=H,
            num_kv_heads=d.get("num_key_value_heads") or H, head_dim=d.get("head_dim") or d["hidden_size"] // H,
            max_position_embeddings=d.get("max_position_embeddings", 2048), norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=None if rtype == "default" else {**rope, "rope_type": rtype},
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            qkv_bias=True if mt == "qwen2" else d.get("attention_bias", False),
            o_bias=d.get("attention_bias", False) if mt != "qwen2" else False,
            mlp_bias=d.get("mlp_bias", False), qk_norm=mt == "qwen3", sliding_window=window,
            pad_token_id=d.get("pad_token_id"), hf=d)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], fp32, exactly as HF computes them (incl. llama3 scaling)."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    if rs["rope_type"] == "linear":
        return inv / rs["factor"]
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth blend in between.
    factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    mid = (wavelen >= old / hi) & (wavelen <= old / lo)
    return torch.where(mid, blended, scaled)


def unpack(t, real):
    """t [N, C], the rows of the True positions of real [B, T] in order -> [B, T, C], zeros elsewhere."""
    return t.new_zeros(*real.shape, t.shape[-1]).masked_scatter_(real[..., None], t)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        # HF normalises in fp32 and casts back before the weight multiply.
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def make_norm(cfg, dim):
    return nn.LayerNorm(dim, eps=cfg.norm_eps) if cfg.gpt2 else RMSNorm(dim, cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.hd, cfg.norm_eps), RMSNorm(self.hd, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, rope, mask, cache=None, pos=0, real=None):
        """x [B, T, D]; or, with real [B, T] (bool), only those positions, packed [N, D]."""
        B, T = x.shape[:2] if real is None else real.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if real is not None:  # attention and the cache take the padded layout; padding gets zeros
            q, k, v = unpack(q, real), unpack(k, real), unpack(v, real)
        q, k = q.view(B, T, self.nh, self.hd), k.view(B, T, self.nkv, self.hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, T, hd]
        if rope is not None:
            cos, sin = rope
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:  # preallocated [B, nkv, Tmax, hd]; write this step, attend to all so far
            cache[0][:, :, pos:pos + T], cache[1][:, :, pos:pos + T] = k, v
            k, v = cache[0][:, :, :pos + T], cache[1][:, :, :pos + T]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.nh != self.nkv)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.o_proj(y if real is None else y[real])


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = not cfg.gpt2
        if self.gated:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        if self.gated:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg, cfg.hidden_size)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg, cfg.hidden_size)
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, cache=None, pos=0, real=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, pos, real)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.gpt2:
            self.embed_positions = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg, cfg.hidden_size)


def attention_bias(attention_mask, T):
    """Bool mask [B, 1, T, S] for the last T queries over S keys: causal, same document, no padding.

    attention_mask [B, S]: 0 = padding, >0 = document id. A padding query may see only itself, so
    that no softmax row is empty (its output is never used).
    """
    S = attention_mask.shape[1]
    qi = torch.arange(S - T, S, device=attention_mask.device)[:, None]
    kj = torch.arange(S, device=attention_mask.device)[None, :]
    doc_q, doc_k = attention_mask[:, S - T:, None], attention_mask[:, None, :]
    mask = (kj <= qi) & (doc_q == doc_k) & (doc_k > 0)
    return (mask | (kj == qi))[:, None]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, head: str = "lm"):
        super().__init__()
        if head not in ("lm", "score"):
            raise ValueError(f"head must be 'lm' or 'score', got {head!r}")
        self.cfg, self.head, self.grad_checkpointing = cfg, head, False
        self.model = Body(cfg)
        if head == "lm":
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            self.tie_weights()
        else:
            self.score = nn.Linear(cfg.hidden_size, 1, bias=False)

    def tie_weights(self):
        if self.head == "lm" and self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_weights(self, std=0.02, seed=None):
        """Fresh weights as HF initialises them: N(0, std) matrices, zero biases, unit norms."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                w = torch.randn(m.weight.shape, generator=g) * std
                m.weight.data.copy_(w)
                if getattr(m, "bias", None) is not None:
                    m.bias.data.zero_()
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                m.weight.data.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.data.zero_()
        if self.head == "score":
            self.init_score(seed)
        self.tie_weights()

    def init_score(self, seed=None):
        # Value/reward heads start near zero: std 1/sqrt(d+1) as in OpenAI's lm-human-preferences.
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(self.score.weight.shape, generator=g) / math.sqrt(self.cfg.hidden_size + 1)
        self.score.weight.data.copy_(w.to(self.score.weight.dtype))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, pos=0,
                      skip_padding=False):
        """Final hidden states [B, T, D] (after the last norm). With a kv_cache, `attention_mask`
        covers all pos + T keys and `pos` is where this call's tokens go in the cache.
        `attention_mask` may also be a ready bool mask [B, 1, T, S] (True = may attend), used as
        is; then pass position_ids too (data/batching.py's shared-prompt preference rows do).
        skip_padding: every layer but attention runs on the real positions only (generation's
        prefill of left-padded prompts); the padding positions' hidden states are then zeros."""
        cfg, B, T = self.cfg, input_ids.shape[0], input_ids.shape[1]
        if position_ids is None:
            if attention_mask is not None and attention_mask.dim() == 4:
                raise ValueError("a 4-D attention_mask needs explicit position_ids")
            if attention_mask is not None:  # left padding: count real tokens (HF generate does the same)
                position_ids = ((attention_mask > 0).long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(pos, pos + T, device=input_ids.device).expand(B, T)
        if cfg.sliding_window is not None and pos + T > cfg.sliding_window:
            raise NotImplementedError(f"sequence of {pos + T} tokens exceeds sliding_window {cfg.sliding_window}")
        x = self.model.embed_tokens(input_ids).to(self.model.norm.weight.dtype)  # a frozen one may be narrower
        rope = None
        if cfg.gpt2:
            x = x + self.model.embed_positions(position_ids)
        else:
            freqs = position_ids[:, :, None].float() * rope_inv_freq(cfg).to(x.device)  # [B, T, hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
            rope = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = attention_mask if attention_mask is None or attention_mask.dim() == 4 else attention_bias(attention_mask, T)
        if mask is None and kv_cache is not None and pos > 0:
            raise ValueError("decoding with a KV cache needs the attention_mask over all keys")
        real = None
        if skip_padding and attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[:, -T:] > 0
            if bool(real.all()):
                real = None
            else:  # [N, D]: a quarter of a batch of 20-40-token prompts is padding
                x = x[real]
        for i, layer in enumerate(self.model.layers):
            if self.grad_checkpointing and torch.is_grad_enabled():  # recompute activations in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, None, 0, real, use_reentrant=False)
            else:
                x = layer(x, rope, mask, None if kv_cache is None else kv_cache[i], pos, real)
        h = self.model.norm(x)
        return h if real is None else unpack(h, real)

    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, pos=0, head_fn=None,
                skip_padding=False):
        """LM head: logits [B, T, V]. Score head: scores [B, T] (one scalar per position).

        head_fn(hidden [B, T, D], lm_head_weight [V, D]) replaces the LM head, e.g. with chunked
        log-probs that never materialise [B, T, V]. It runs inside forward so that FSDP has the
        head's weight gathered (a separate method call would bypass FSDP's hooks)."""
        h = self.hidden_states(input_ids, attention_mask, position_ids, kv_cache, pos, skip_padding)
        if self.head == "score":  # a copy, not a view: FSDP2 warns on a view (an in-place op would skip its hook)
            return self.score(h).squeeze(-1).clone()
        return self.lm_head(h) if head_fn is None else head_fn(h, self.lm_head.weight)


# ----------------------------------------------------------------------------- HF checkpoints

def _gpt2_to_ours(sd, D):
    """GPT-2 names -> ours. Conv1D weights are stored [in, out] and must be transposed."""
    out = {}
    for name, t in sd.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # old causal-mask buffers, not weights
            continue
        p = name.split(".")
        if p[0] in ("wte", "wpe", "ln_f"):
            out[{"wte": "model.embed_tokens", "wpe": "model.embed_positions", "ln_f": "model.norm"}[p[0]] + "." + p[-1]] = t
        elif p[0] == "h":
            pre, mod, kind = f"model.layers.{p[1]}.", ".".join(p[2:-1]), p[-1]
            tt = t.t() if kind == "weight" and t.dim() == 2 else t
            if mod == "attn.c_attn":
                for n, part in zip("qkv", tt.split(D, dim=0)):
                    out[f"{pre}self_attn.{n}_proj.{kind}"] = part
            else:
                ours = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm", "attn.c_proj": "self_attn.o_proj",
                        "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}[mod]
                out[f"{pre}{ours}.{kind}"] = tt
        else:
            out[name] = t  # lm_head.weight, score.weight
    return out


def _ours_to_gpt2(sd):
    out, qkv = {}, {}
    names = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.o_proj": "attn.c_proj",
             "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
    for name, t in sd.items():
        p = name.split(".")
        if name.startswith("model.layers."):
            i, mod, kind = p[2], ".".join(p[3:-1]), p[-1]
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((i, kind), {})[mod[10]] = t
                continue
            out[f"transformer.h.{i}.{names[mod]}.{kind}"] = t.t().contiguous() if kind == "weight" and t.dim() == 2 else t
        elif name.startswith("model."):
            top = {"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f"}[p[1]]
            out[f"transformer.{top}.{p[-1]}"] = t
        else:
            out[name] = t
    for (i, kind), d in qkv.items():
        t = torch.cat([d["q"], d["k"], d["v"]], dim=0)
        out[f"transformer.h.{i}.attn.c_attn.{kind}"] = t.t().contiguous() if kind == "weight" else t
    return out


def read_config(path) -> ModelConfig:
    where = os.path.join(path, "config.json")
    if not os.path.isfile(where):
        raise FileNotFoundError(f"{where}: not found; expected a Hugging Face model directory (config.json, "
                                "model.safetensors, tokenizer.json), e.g. from huggingface-cli download")
    try:
        with open(where, encoding="utf-8") as f:
            return ModelConfig.from_hf(json.load(f), where)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at line {e.lineno} column {e.colno}); download it again") from None
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from None


def checkpoint_index(path) -> dict:
    """{tensor name in the files: file path} of an HF checkpoint directory (single file or sharded).
    Only headers are read."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    try:
        with safe_open(single, "pt") as f:
            return {k: single for k in f.keys()}
    except SafetensorError as e:
        raise unreadable(single, e) from None


def unreadable(path, e):
    return ValueError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt: download or save it again")


def _layer_of(name: str):
    """Block number of a checkpoint tensor name (ours, HF Llama-style or GPT-2's), None outside blocks."""
    p = name.removeprefix("transformer.").split(".")
    if p[0] == "h":
        return int(p[1])
    if p[:2] == ["model", "layers"]:
        return int(p[2])
    return None


READ_BYTES = 1 << 26  # a tensor is read in slices of about this many file bytes
EMBEDDINGS = ("model.embed_tokens.weight", "wte.weight")  # the token embedding's names in HF files


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


@functools.lru_cache(maxsize=64)
def _header(file, size, mtime_ns):
    """{name: (torch dtype, shape, first byte in the file)} of a safetensors file, after safe_open
    has checked the header against the file (keyed by size and mtime: a rewritten file is re-read)."""
    with safe_open(file, "pt"):
        pass
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: (SAFETENSORS_DTYPES.get(v["dtype"]), v["shape"], 8 + n + v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def _mapped_tensor(file, name, dtype):
    """The tensor as a private (copy-on-write) memory map of its own bytes in the file, or None
    when it must be copied (a dtype conversion, an odd dtype, a misaligned or empty tensor). Like
    transformers' loader, nothing is read until it is used, and the pages are the result itself:
    clean file pages the kernel can drop, no copy besides them; writes (training) copy only the
    pages written. The map is released with the tensor (a quantized layer's fp32 weight with it)."""
    st = os.stat(file)
    header = _header(file, st.st_size, st.st_mtime_ns)
    if name not in header:  # the sliced read below names the file in its error
        return None
    dt, shape, start = header[name]
    if dt is None or (dtype is not None and dt.is_floating_point and dt != dtype) or start % dt.itemsize:
        return None
    numel = math.prod(shape)
    if numel == 0:
        return None
    base = start - start % mmap.ALLOCATIONGRANULARITY
    with open(file, "rb") as f:
        buf = mmap.mmap(f.fileno(), start - base + numel * dt.itemsize, offset=base, access=mmap.ACCESS_COPY)
    return torch.frombuffer(buf, dtype=dt, count=numel, offset=start - base).view(shape)


def read_tensor(file, name, device="cpu", dtype=None, shard=None):
    """One checkpoint tensor, floating point ones in `dtype` (default: the file's). A whole tensor
    on the CPU in the file's dtype is memory-mapped (_mapped_tensor). Otherwise it is read in row
    slices of about READ_BYTES, each through its own safe_open, so that neither the whole tensor in
    the file's dtype nor the file's mapped pages (which count in a process's RSS while mapped) are
    ever in memory besides the result. shard=(rank, world): only the rows of FSDP2's dim-0 shard
    `rank` (as torch.chunk) are read and written; on the CPU the other rows' pages are never
    touched, so they take no memory until fully_shard keeps the shard and frees the rest."""
    try:
        if shard is None and torch.device(device).type == "cpu":
            mapped = _mapped_tensor(file, name, dtype)
            if mapped is not None:
                return mapped
        with safe_open(file, "pt") as f:
            sl = f.get_slice(name)
            shape, first = sl.get_shape(), sl[:1]
            if len(shape) < 2:
                first = f.get_tensor(name)
        dtype = dtype if dtype is not None and first.is_floating_point() else first.dtype
        if len(shape) < 2:
            return first.to(device=device, dtype=dtype)
        out = torch.empty(shape, dtype=dtype, device=device)
        start, stop = 0, shape[0]
        if shard is not None:
            size = -(-shape[0] // shard[1])
            start, stop = min(shape[0], shard[0] * size), min(shape[0], (shard[0] + 1) * size)
        step = max(1, READ_BYTES // max(1, first.numel() * first.element_size()))
        for i in range(start, stop, step):
            with safe_open(file, "pt") as f:
                out[i:min(stop, i + step)] = f.get_slice(name)[i:min(stop, i + step)]
        return out
    except SafetensorError as e:
        raise unreadable(file, e) from None


def read_tensors(index: dict, names, cfg: ModelConfig, device="cpu", dtype=None, shard=None) -> dict:
    """The checkpoint tensors `names` (file names), under our names (read_tensor: only those bytes
    come off the disk; `shard`: only those rows)."""
    sd = {n: read_tensor(index[n], n, device, dtype, shard) for n in names}
    return _gpt2_to_ours(sd, cfg.hidden_size) if cfg.gpt2 else sd


def load_parts(path, head="lm", dtype=torch.float32, device="cpu", seed=0, shard=None, frozen_embedding=False,
               keep_layers=0):
    """Load an HF directory one block at a time: the model is built on the meta device, then each
    block (and last the rest: embeddings, final norm, head) is read from the safetensors files
    (only its own tensors) and assigned in place. Yields (model, part) after each part is filled,
    so that a caller can quantize or shard it before the next one is read; the model holds the
    checkpoint's weights once the generator is exhausted. head="score" on a causal-LM checkpoint
    starts a fresh score head (reward and value models begin this way). shard=(rank, world): the
    root's matrices (embeddings, head) hold only this rank's FSDP2 rows (see read_tensor), for a
    caller that shards the root before touching them. frozen_embedding: the token embedding, when
    it is not also the LM head, stays in the checkpoint's dtype where that is narrower (a bf16
    file: half the memory, and the same values, upcast row by row in forward). keep_layers > 0:
    only the first N blocks are built and read (the saved config then says N layers)."""
    cfg = read_config(path)
    if keep_layers:
        if not 0 < keep_layers <= cfg.num_layers:
            raise ValueError(f"{path}: keeping {keep_layers} layers of a model that has {cfg.num_layers}")
        cfg.num_layers = keep_layers
        cfg.hf = dict(cfg.hf, **{"n_layer" if cfg.gpt2 else "num_hidden_layers": keep_layers})
    with torch.device("meta"):
        model = Transformer(cfg, head)
    index = checkpoint_index(path)
    names = {}
    for n in index:
        if not n.endswith((".attn.bias", ".attn.masked_bias")):  # GPT-2's old causal-mask buffers
            names.setdefault(_layer_of(n), []).append(n)
    for i, part in [*enumerate(model.model.layers), (None, model)]:
        own = names.get(i, [])
        narrow = [n for n in own if frozen_embedding and n.removeprefix("transformer.") in EMBEDDINGS
                  and not (head == "lm" and cfg.tie_word_embeddings)]
        sd = read_tensors(index, [n for n in own if n not in narrow], cfg, device, dtype, shard if part is model else None)
        for k, v in read_tensors(index, narrow, cfg, device, None, shard).items():
            sd[k] = v if v.element_size() < dtype.itemsize else v.to(dtype)
        prefix = "" if part is model else f"model.layers.{i}."
        expected = {k: v.shape for k, v in part.state_dict(prefix=prefix).items()
                    if part is not model or not k.startswith("model.layers.")}
        if part is model:
            if head == "score":
                sd.pop("lm_head.weight", None)
            if cfg.tie_word_embeddings and head == "lm":
                expected.pop("lm_head.weight")
                sd.pop("lm_head.weight", None)
        fresh_score = part is model and head == "score" and "score.weight" not in sd
        if fresh_score:
            expected.pop("score.weight")
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(s)}"
                  for k, s in expected.items() if k in sd and sd[k].shape != s]
        if missing or unexpected or shapes:
            raise ValueError(f"{path}: checkpoint does not match the {cfg.model_type} model:\n"
                             f"  missing: {missing}\n  unexpected: {unexpected}\n  shape mismatches: {shapes}")
        part.load_state_dict({k.removeprefix(prefix): v for k, v in sd.items()}, strict=False, assign=True)
        if fresh_score:
            model.score.weight = nn.Parameter(torch.empty(1, cfg.hidden_size, dtype=dtype, device=device))
            model.init_score(seed)
        if part is model:
            model.tie_weights()
        del sd  # the part holds its tensors; a caller that replaces them (quantizing) frees the old ones
        yield model, part


def from_pretrained(path, head="lm", dtype=torch.float32, device="cpu", seed=0) -> Transformer:
    """Load an HF directory (see `load_parts`; weights are materialised once). device="meta"
    returns the empty model."""
    if str(device) == "meta":
        with torch.device("meta"):
            return Transformer(read_config(path), head)
    for model, _ in load_parts(path, head, dtype, device, seed):
        pass
    return model


def hf_config(model: Transformer, dtype=None) -> dict:
    """config.json for `model`: the original dict with the head's architecture name."""
    cfg = model.cfg
    d = dict(cfg.hf)
    arch = FAMILIES[cfg.model_type] + ("LMHeadModel" if cfg.gpt2 else "ForCausalLM")
    d.pop("id2label", None), d.pop("label2id", None)
    if model.head == "score":
        arch = FAMILIES[cfg.model_type] + "ForSequenceClassification"
        d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    d["architectures"] = [arch]
    d["tie_word_embeddings"] = cfg.tie_word_embeddings
    if cfg.pad_token_id is not None:
        d["pad_token_id"] = cfg.pad_token_id
    if dtype is not None:
        d["torch_dtype" if "torch_dtype" in d else "dtype"] = str(dtype).removeprefix("torch.")
    return d


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "generation_config.json", "chat_template.jinja", "added_tokens.json")


def save_pretrained(model: Transformer, path, state_dict=None, tokenizer_dir=None, max_shard_bytes=5 * 2**30,
                    extra_files=None):
    """Write an HF directory atomically (temp dir, then rename). `state_dict` overrides the model's
    own: a dict, or an iterable of dicts written as they come (a model gathered one block at a time
    from FSDP shards: each shard file is written once full, so the whole state dict never exists).
    `extra_files`: {name: text} written beside the weights (the model card)."""
    chunks = [state_dict or model.state_dict()] if state_dict is None or isinstance(state_dict, dict) else state_dict
    with atomic_dir(path) as tmp:
        files, cur, size, total, dtype = [], {}, 0, 0, None

        def flush():
            files.append((os.path.join(tmp, f"part-{len(files)}.safetensors"), list(cur)))
            save_file(cur, files[-1][0], metadata={"format": "pt"})
            cur.clear()

        for chunk in chunks:
            sd = {k: v.detach().cpu().contiguous() for k, v in chunk.items()}
            if model.head == "lm" and model.cfg.tie_word_embeddings:
                sd.pop("lm_head.weight", None)  # HF stores the tied matrix once, as the embedding
            if model.cfg.gpt2:
                sd = _ours_to_gpt2(sd)
            for k in sorted(sd):
                nbytes = sd[k].numel() * sd[k].element_size()
                if cur and size + nbytes > max_shard_bytes:
                    flush()
                    size = 0
                cur[k], size, total, dtype = sd[k], size + nbytes, total + nbytes, dtype or sd[k].dtype
        flush()
        if len(files) == 1:
            os.rename(files[0][0], os.path.join(tmp, "model.safetensors"))
        else:
            weight_map = {}
            for i, (fname, keys) in enumerate(files):
                final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                os.rename(fname, os.path.join(tmp, final))
                weight_map.update({k: final for k in keys})
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(model, dtype), f, indent=2)
        for fname in TOKENIZER_FILES if tokenizer_dir else ():
            if os.path.exists(os.path.join(tokenizer_dir, fname)):
                shutil.copy(os.path.join(tokenizer_dir, fname), os.path.join(tmp, fname))
        for fname, text in (extra_files or {}).items():  # e.g. the model card, README.md
            with open(os.path.join(tmp, fname), "w", encoding="utf-8") as f:
                f.write(text)
    return os.path.abspath(path)


def _umask_modes(root):
    """The modes a plain mkdir and open would give (mkdtemp makes 0700; copied files keep their
    source's): a server running as another user can read a saved model when the umask lets it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(d, name), 0o666 & ~umask)


@contextmanager
def atomic_dir(path):
    """Yields a temp directory beside `path` to fill; on success it replaces `path` (the old one is
    removed only after the new one is in place), on error it is deleted: never a half-written dir."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        yield tmp
        _umask_modes(tmp)
        if os.path.exists(path):
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- generation

def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Next tokens [B] from logits [B, V]. temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p (the top one always stays)
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    # Inverse-CDF sampling: one uniform number per row. torch.multinomial draws one exponential
    # per vocabulary entry ([B, V] random numbers, ~40% of a decode step at batch 64 on a CPU).
    # The CDF is summed in fp64 so that no token's share moves by more than ~1e-12.
    cdf = logits.softmax(-1).cumsum(-1, dtype=torch.float64)
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device, generator=generator) * cdf[:, -1:]
    # right=True: a zero-probability token (a flat step of the CDF) is never drawn; the clamp
    # catches u * total rounding up to the total itself (probability ~2^-53)
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)


def in_runs(rows, G) -> bool:
    """Whether rows [N, ...] come in runs of G identical rows (GRPO's groups of one prompt)."""
    return rows.shape[0] % G == 0 and bool((rows.view(-1, G, *rows.shape[1:]) == rows[::G, None]).all())


@torch.no_grad()
def generate(model: Transformer, input_ids, attention_mask=None, max_new_tokens=32, temperature=1.0,
             top_k=None, top_p=None, eos_ids=(), pad_id=0, generator=None, group=1):
    """Batched sampling with a preallocated KV cache.

    input_ids [B, P] left-padded prompts, attention_mask [B, P] (1 real, 0 pad).
    Returns tokens [B, P + N] (prompt, then completion) and completion_mask [B, N]: 1 for generated
    tokens up to and including the first EOS, 0 after it (those positions hold pad_id). N <= max_new_tokens:
    the loop stops early once every sequence has finished.
    group > 1: where the rows come in runs of `group` identical prompts (GRPO's groups), each prompt
    is prefilled once and its cache copied to the run's rows.
    """
    cfg, (B, P), dev = model.cfg, input_ids.shape, input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    dtype = next(model.parameters()).dtype
    total = P + max_new_tokens
    cache = [(torch.empty(B, cfg.num_kv_heads, total, cfg.head_dim, dtype=dtype, device=dev),
              torch.empty(B, cfg.num_kv_heads, total, cfg.head_dim, dtype=dtype, device=dev))
             for _ in range(cfg.num_layers)]
    mask = torch.cat([attention_mask.long(), attention_mask.new_ones(B, max_new_tokens).long()], dim=1)
    eos = torch.tensor(list(eos_ids), device=dev, dtype=torch.long)
    positions = attention_mask.long().sum(-1, keepdim=True)  # next position of each sequence
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    out, alive = [], []
    # the prompt's last position only: [B, P, V] logits of a long prompt and a large vocabulary are GBs
    def last(h, w):
        return F.linear(h[:, -1], w)
    G = group if group > 1 and in_runs(input_ids, group) and in_runs(attention_mask, group) else 1
    if G == 1:
        logits = model(input_ids, mask[:, :P], kv_cache=cache, pos=0, head_fn=last, skip_padding=True)
    else:
        once = [tuple(torch.empty(B // G, cfg.num_kv_heads, P, cfg.head_dim, dtype=dtype, device=dev) for _ in "kv")
                for _ in range(cfg.num_layers)]
        logits = model(input_ids[::G], mask[::G, :P], kv_cache=once, pos=0, head_fn=last,
                       skip_padding=True).repeat_interleave(G, 0)
        for (k, v), (k1, v1) in zip(cache, once):
            k[:, :, :P], v[:, :, :P] = k1.repeat_interleave(G, 0), v1.repeat_interleave(G, 0)
    for t in range(max_new_tokens):
        tok = sample(logits, temperature, top_k, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        out.append(tok)
        alive.append(~done)
        done = done | torch.isin(tok, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = model(tok[:, None], mask[:, :P + t + 1], position_ids=positions + t, kv_cache=cache, pos=P + t)[:, -1]
    completion = torch.stack(out, 1)
    return torch.cat([input_ids, completion], 1), torch.stack(alive, 1).long()
