"""
A from-scratch decoder-only transformer: the architecture, nothing else (reading and writing
Hugging Face checkpoints is hf_io.py; sampling is engine.py).

One module covers Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3 and GPT-2. Module names follow HF's
Llama layout (model.layers.N.self_attn.q_proj, ...), so loading a Llama-family checkpoint is a key
copy with shape checks; GPT-2 is the one family that needs a name table (hf_io._gpt2_to_ours).

The head is either the LM head (`lm_head`, logits over the vocabulary) or a scalar `score` head
(reward / value model), which round-trips with HF's `*ForSequenceClassification`.

Conventions: `attention_mask [B, T]` is 0 for padding and a positive *document id* otherwise, so an
HF 0/1 mask works as is and packed rows (ids 1, 2, 3, ...) get a block-diagonal causal mask. Tokens
attend to earlier tokens of the same document only.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

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


def rope_inv_freq(cfg: ModelConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], fp32, exactly as HF computes them (incl. llama3 scaling)."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=device) / cfg.head_dim))
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
    """t [N, C], the rows at the flat positions real = (index [N], B, T) -> [B, T, C], zeros elsewhere."""
    index, B, T = real
    return t.new_zeros(B * T, t.shape[-1]).index_copy_(0, index, t).view(B, T, t.shape[-1])


# Decode steps (at most this many query tokens a row) fold a GQA group's query heads into the
# query axis when a mask is given on CUDA; longer calls expand K and V instead (see attend).
FOLD_MAX_T = 16


def gqa_masked_path(q, T) -> str:
    """How attend() runs SDPA with a mask and fewer KV heads than query heads. On CUDA flash attention
    takes no mask and torch 2.13's memory-efficient kernel has no GQA (its backward sizes grad_k
    by the query heads), so enable_gqa with a mask would take the math kernel, which keeps fp32
    [B, heads, T, S] scores for backward. The CPU kernels take both as they are."""
    if q.device.type != "cuda":
        return "native"
    return "fold" if T <= FOLD_MAX_T else "expand"


def attend(q, k, v, mask, path=None):
    """Attention of q [B, H, T, hd] over k, v [B, KV, S, hd] (H a multiple of KV, query head h
    reading KV head h // (H / KV)), causal without a mask, else under the bool mask [B, 1, T, S]
    (True = may attend), by the path that reaches an efficient CUDA kernel (docs/performance.md):
      no mask                  SDPA is_causal with enable_gqa: flash attention
      a mask, H == KV          SDPA with the mask: memory-efficient attention
      a mask, GQA, "fold"      decode: a group's query heads folded into the query axis,
                               q [B, KV, G * T, hd] and the mask repeated G times along it; the
                               cache is read at KV heads, nothing copied: memory-efficient
      a mask, GQA, "expand"    K and V repeated to H heads (a copy, kept for backward):
                               memory-efficient
      a mask, GQA, "native"    SDPA with the mask and enable_gqa (the CPU's kernels)
    Every path computes the same attention (tests/test_model.py checks each on the CPU)."""
    B, H, T, hd = q.shape
    KV = k.shape[1]
    if mask is None or H == KV:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                              enable_gqa=H != KV)
    path = path or gqa_masked_path(q, T)
    G = H // KV
    if path == "fold":
        y = F.scaled_dot_product_attention(q.reshape(B, KV, G * T, hd), k, v,
                                           attn_mask=mask[:, :, None].expand(B, 1, G, T, mask.shape[-1]).reshape(
                                               B, 1, G * T, mask.shape[-1]))
        return y.view(B, H, T, hd)
    if path == "expand":
        return F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


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
        """x [B, T, D]; or, with real = (index [N], B, T), only those flat positions, packed [N, D]."""
        B, T = x.shape[:2] if real is None else real[1:]
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
        y = attend(q, k, v, mask).transpose(1, 2).reshape(B, T, self.nh * self.hd)
        return self.o_proj(y if real is None else y.view(B * T, -1).index_select(0, real[0]))


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
        self.inv_freq = {}  # RoPE's inverse frequencies per device (not state: derived from cfg)
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
                w = torch.randn(m.weight.shape, generator=g, device="cpu") * std
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
        w = torch.randn(self.score.weight.shape, generator=g, device="cpu") / math.sqrt(self.cfg.hidden_size + 1)
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
            if x.device not in self.inv_freq:  # once per device: no host computation and copy per forward
                self.inv_freq[x.device] = rope_inv_freq(cfg, x.device)
            freqs = position_ids[:, :, None].float() * self.inv_freq[x.device]  # [B, T, hd/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, hd]
            rope = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        mask = attention_mask if attention_mask is None or attention_mask.dim() == 4 else attention_bias(attention_mask, T)
        if mask is None and kv_cache is not None and pos > 0:
            raise ValueError("decoding with a KV cache needs the attention_mask over all keys")
        real = None
        if skip_padding and attention_mask is not None and attention_mask.dim() == 2:
            # the real positions' flat indices: one wait for the device per call (their number)
            index = (attention_mask[:, -T:] > 0).flatten().nonzero().squeeze(1)
            if len(index) < B * T:  # [N, D]: a quarter of a batch of 20-40-token prompts is padding
                real = (index, B, T)
                x = x.flatten(0, 1).index_select(0, index)
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
