"""
Which attention kernel each of nanotrl's attention calls gets, with its time and peak memory. Each
case calls F.scaled_dot_product_attention the way model.py's Attention does (the calls are written
out here, model.py is not imported: this measures the alternatives, whichever model.py takes).

    python bench/attention_paths.py          # one GPU: B 4, T 2048, 32 / 8 heads, head_dim 128, bf16
    python bench/attention_paths.py --cpu    # B 2, T 64, 4 / 2 heads, head_dim 16, fp32

The cases (G = query heads per KV head):
  causal_gqa         is_causal, no mask, enable_gqa: right-padded rows (SFT, RM, eval/loss)
  masked_gqa         a bool mask [B, 1, T, T] and enable_gqa: packed SFT, DPO's shared prompt,
  masked_expanded      RL's log-prob rows; or K/V expanded to all heads (repeat_interleave on dim 1)
  decode_gqa         one query per row over a KV cache of S slots with a bool mask [B, 1, 1, S]:
  decode_folded        enable_gqa; or each KV head's G queries folded into the query axis (q viewed
  decode_expanded      [B, kv, G, hd], the mask repeated G times along it); or K/V expanded
The first three run forward + backward, the decode ones forward only (no grad), as in sampling.

Prints JSON lines: the versions, then one per case: the backends that accept the call alone
(sdpa_kernel([X]) for X in FLASH_ATTENTION, EFFICIENT_ATTENTION, CUDNN_ATTENTION, MATH; a refused
one with torch's reason), the one the default dispatch runs (read off the profiler's aten op; on a
CPU only MATH and the CPU flash kernel exist), time_ms and peak_mem_mb of each accepted backend and
of the default (memory: max_memory_allocated above what was allocated before the call, so the
saved activations and an expansion's copies count; null on a CPU), and max_abs_err of the default
against an fp32 MATH reference with K/V expanded.
"""
import argparse
import json
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--cpu", action="store_true", help="tiny shapes, fp32, on the CPU")
p.add_argument("--reps", type=int, default=0, help="timed calls per backend (0: 10 on a GPU, 2 on a CPU)")
a = p.parse_args()

dev = torch.device("cpu" if a.cpu or not torch.cuda.is_available() else "cuda")
cuda = dev.type == "cuda"
B, T, H, KV, HD = (4, 2048, 32, 8, 128) if cuda else (2, 64, 4, 2, 16)
S, G = T, H // KV  # the decode cache holds as many slots as a training row
dtype = torch.bfloat16 if cuda else torch.float32
reps = a.reps or (10 if cuda else 2)
BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
OPS = {  # the aten op each backend runs, as the profiler names it
    "aten::_scaled_dot_product_flash_attention": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "FLASH_ATTENTION",
    "aten::_scaled_dot_product_efficient_attention": "EFFICIENT_ATTENTION",
    "aten::_scaled_dot_product_cudnn_attention": "CUDNN_ATTENTION",
    "aten::_scaled_dot_product_attention_math": "MATH",
    "aten::_scaled_dot_product_fused_attention_overrideable": "OVERRIDEABLE",
}


def sync():
    if cuda:
        torch.cuda.synchronize(dev)


def training_mask():
    """[B, 1, T, T] as model.attention_bias builds it for packed rows: causal within each of two
    documents per row, the row's tail padding (a padding query sees only itself)."""
    doc = torch.ones(B, T, dtype=torch.long, device=dev)
    doc[:, T // 3:] = 2
    doc[1:, T - T // 8:] = 0  # every row but the first ends in padding
    qi, kj = torch.arange(T, device=dev)[:, None], torch.arange(T, device=dev)[None, :]
    m = (kj <= qi) & (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] > 0)
    return (m | (kj == qi))[:, None]


def decode_mask():
    """[B, 1, 1, S]: left-padded prompts (row b skips its first b * S / 16 slots) and a hole."""
    m = torch.ones(B, 1, 1, S, dtype=torch.bool, device=dev)
    for b in range(B):
        m[b, ..., :b * S // 16] = False
    m[:, ..., S // 2] = False  # a finished row's hole, as engine.decode_one_token writes one
    return m


g = torch.Generator(dev).manual_seed(0)


def rand(*shape, grad=False):
    return torch.randn(*shape, generator=g, device=dev, dtype=dtype).requires_grad_(grad)


def expand(x):
    return x.repeat_interleave(G, dim=1)


q, k, v = rand(B, H, T, HD, grad=True), rand(B, KV, T, HD, grad=True), rand(B, KV, T, HD, grad=True)
q1, kc, vc = rand(B, H, 1, HD), rand(B, KV, S, HD), rand(B, KV, S, HD)
mask, mask1 = training_mask(), decode_mask()


def folded(q1, kc, vc, mask1):
    """The G query heads that share a KV head as G query positions of that head: the cache is
    read at kv heads, once; the mask is repeated along the query axis in the same order."""
    Tq = q1.shape[2]
    y = F.scaled_dot_product_attention(q1.reshape(B, KV, G * Tq, HD), kc, vc, attn_mask=mask1.repeat(1, 1, G, 1))
    return y.view(B, H, Tq, HD)


MASKED = "masked rows: packed SFT, DPO's shared prompt, RL's log-prob / value / reward forwards, prefill"
DECODE = "decode steps: a token per row over the KV cache"
CASES = [  # name, what calls it, the call, backward, fp32 reference
    ("causal_gqa", "right-padded rows: unpacked SFT, the reward model's pair scores, unshared DPO, eval/loss",
     lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), True,
     lambda: F.scaled_dot_product_attention(q.float(), expand(k.float()), expand(v.float()), is_causal=True)),
    ("masked_gqa", MASKED,
     lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True), True,
     lambda: F.scaled_dot_product_attention(q.float(), expand(k.float()), expand(v.float()), attn_mask=mask)),
    ("masked_expanded", MASKED,
     lambda: F.scaled_dot_product_attention(q, expand(k), expand(v), attn_mask=mask), True,
     lambda: F.scaled_dot_product_attention(q.float(), expand(k.float()), expand(v.float()), attn_mask=mask)),
    ("decode_gqa", DECODE,
     lambda: F.scaled_dot_product_attention(q1, kc, vc, attn_mask=mask1, enable_gqa=True), False,
     lambda: F.scaled_dot_product_attention(q1.float(), expand(kc.float()), expand(vc.float()), attn_mask=mask1)),
    ("decode_folded", DECODE,
     lambda: folded(q1, kc, vc, mask1), False,
     lambda: F.scaled_dot_product_attention(q1.float(), expand(kc.float()), expand(vc.float()), attn_mask=mask1)),
    ("decode_expanded", DECODE,
     lambda: F.scaled_dot_product_attention(q1, expand(kc), expand(vc), attn_mask=mask1), False,
     lambda: F.scaled_dot_product_attention(q1.float(), expand(kc.float()), expand(vc.float()), attn_mask=mask1)),
]


def step(call, backward):
    """One call as a training step (forward + backward, the grads dropped after) or a decode step."""
    if not backward:
        with torch.no_grad():
            return call()
    try:
        y = call()
        y.backward(torch.ones_like(y))
        return y.detach()
    finally:  # also when a backend refuses the backward: the next call starts without grads
        for t in (q, k, v):
            t.grad = None


def measure(call, backward):
    """(ms per call, MiB allocated above the baseline at the peak; None on a CPU)."""
    step(call, backward)  # warm: kernels picked, workspaces allocated
    sync()
    if cuda:
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    for _ in range(reps):
        step(call, backward)
    sync()
    ms = (time.perf_counter() - t) / reps * 1e3
    mem = round((torch.cuda.max_memory_allocated(dev) - base) / 2**20, 1) if cuda else None
    return round(ms, 3), mem


def default_backend(call, backward):
    """The backend the default dispatch runs: the aten op the profiler sees."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(call, backward)
        sync()
    ran = [OPS[e.name] for e in prof.events() if e.name in OPS]
    return ran[0] if ran else None


def reason(caught, err):
    """torch's reason for refusing a backend: its warnings, else the error's first line."""
    msgs = [str(w.message).split("\n")[0][:240] for w in caught
            if "not used because" not in str(w.message) and "kernel not used" not in str(w.message)]
    return "; ".join(dict.fromkeys(msgs)) or str(err).split("\n")[0][:240]


nccl = torch.cuda.nccl.version() if cuda and torch.distributed.is_nccl_available() else None
versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
            "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))) if cuda else None,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl,
            "shape": {"batch": B, "seq": T, "heads": H, "kv_heads": KV, "head_dim": HD, "cache": S},
            "dtype": str(dtype).removeprefix("torch.")}
print(json.dumps({"versions": versions}), flush=True)
for name, calls, call, backward, reference in CASES:
    accepted, rejected, time_ms, mem_mb = [], {}, {}, {}
    for backend in BACKENDS:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    step(call, backward)
                    sync()
                    time_ms[backend.name], mem_mb[backend.name] = measure(call, backward)
                accepted.append(backend.name)
            except RuntimeError as e:
                rejected[backend.name] = reason(caught, e)
    default = default_backend(call, backward)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        ref = reference()
    with torch.no_grad():
        err = (call().float() - ref).abs().max().item()
    print(json.dumps({"case": name, "calls": calls, "backward": backward, "accepted": accepted, "rejected": rejected,
                      "default": default, "time_ms": time_ms, "peak_mem_mb": mem_mb,
                      "default_time_ms": time_ms.get(default), "default_peak_mem_mb": mem_mb.get(default),
                      "max_abs_err": float(f"{err:.3g}")}), flush=True)
# read last: on CUDA the first dispatch sets the default order (cuDNN first on some cards and cuDNN versions)
print(json.dumps({"priority_order": [SDPBackend(i).name for i in torch._C._get_sdp_priority_order()]}), flush=True)
