"""
Batched sampling throughput: engine.generate_ids (preallocated KV cache) against transformers'
`generate` on the same checkpoint, the same prompts and the same settings.

    python bench/generate.py                                          # CPU: the tiny shape
    python bench/generate.py --shape qwen2.5-0.5b --batch 64 --prompt-len 256 --new-tokens 256   # GPU
    python bench/generate.py --shape qwen2.5-0.5b --batch 64,1      # both batches, one model load

A random-init model of --shape is saved as a Hugging Face directory and loaded by both. Every
sequence generates exactly --new-tokens tokens (no EOS stop; transformers gets min_new_tokens), so
the work is identical. tokens_per_s = batch * new_tokens / wall time of the generate call (after
--warmup untimed calls), prompts left-padded to different lengths as in an RL rollout.
Prints one JSON line per implementation, then their ratio when transformers is installed (per batch).

Decode is memory-bound at small batches: each step reads every weight it multiplies (the layers and
the LM head; of the input embedding only the rows it looks up) and the KV cache so far. Each line
also has decode_step_s ((the call - the prefill) / (new_tokens - 1); the prefill is a 1-token call,
timed the same way), bytes_per_step (those weights + the cache at its mean length over the decode)
and hbm_fraction: bytes_per_step / decode_step_s over the card's datasheet bandwidth (timing.py;
null on a CPU or an unknown card). Clocks are read after a synchronize. peak_mem_mb: on a GPU
max_memory_allocated over the implementation's timed calls (the other's weights are resident too),
on a CPU the process's peak RSS.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import hf_io  # noqa: E402
import model as M  # noqa: E402
from shapes import SHAPES  # noqa: E402
from timing import hbm_bytes_per_s, peak_mem_mb, sync  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
p.add_argument("--batch", default="16", help="rows; a comma list runs each in turn on the same model (64,1)")
p.add_argument("--prompt-len", type=int, default=64, help="longest prompt; the others are up to half shorter")
p.add_argument("--new-tokens", type=int, default=64)
p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
p.add_argument("--repeats", type=int, default=3, help="timed calls (the best is reported)")
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
dtype = torch.bfloat16 if a.dtype == "bf16" or (a.dtype == "auto" and dev.type == "cuda") else torch.float32

cfg = M.ModelConfig.from_hf({"max_position_embeddings": 2 * (a.prompt_len + a.new_tokens), "rms_norm_eps": 1e-6,
                             "eos_token_id": 2, "pad_token_id": 0, **SHAPES[a.shape]})
model = M.Transformer(cfg)
model.init_weights(seed=0)
ckpt = hf_io.save_pretrained(model, os.path.join(tempfile.mkdtemp(), "model"))
ours = hf_io.from_pretrained(ckpt, dtype=dtype, device=dev).eval()


def prompts(batch):
    """Left-padded prompts of P / 2 .. P tokens (the first exactly P), the same for a batch size."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(a.prompt_len // 2, a.prompt_len + 1, (batch,), generator=g)
    lengths[0] = a.prompt_len
    mask = (torch.arange(a.prompt_len)[None] >= a.prompt_len - lengths[:, None]).long()  # left padding
    ids = torch.randint(4, cfg.vocab_size, (batch, a.prompt_len), generator=g) * mask
    return ids.to(dev), mask.to(dev)


def timed(fn):
    for _ in range(a.warmup):
        fn()
    best = float("inf")
    for _ in range(a.repeats):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best, out


# what one decode step reads: the weights it multiplies (parameters() counts a tied head once) and,
# on average over the decode, the cache of P + N / 2 slots per row (prompts are left-padded to P)
weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
if not cfg.tie_word_embeddings:
    weight_bytes -= ours.model.embed_tokens.weight.numel() * ours.model.embed_tokens.weight.element_size()
kv_bytes_per_row = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * (a.prompt_len + a.new_tokens / 2) \
    * torch.finfo(dtype).bits // 8
peak_bw = hbm_bytes_per_s(dev)


def report(impl, batch, dt, out, prefill_s):
    n_new = out.shape[1] - a.prompt_len
    assert n_new == a.new_tokens, f"{impl} generated {n_new} tokens, expected {a.new_tokens}"
    step_s = (dt - prefill_s) / max(a.new_tokens - 1, 1)
    step_bytes = weight_bytes + batch * kv_bytes_per_row
    rec = {"impl": impl, "shape": a.shape, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "dtype": str(dtype).removeprefix("torch."), "batch": batch, "prompt_len": a.prompt_len,
           "new_tokens": a.new_tokens, "temperature": a.temperature, "tokens_per_s": round(batch * n_new / dt, 1),
           "seconds": round(dt, 4), "prefill_s": round(prefill_s, 4), "decode_step_s": round(step_s, 6),
           "bytes_per_step": int(step_bytes), "gb_per_s": round(step_bytes / step_s / 1e9, 2),
           "peak_gb_per_s": peak_bw / 1e9 if peak_bw else None,
           "hbm_fraction": round(step_bytes / step_s / peak_bw, 3) if peak_bw else None,
           "peak_mem_mb": peak_mem_mb(dev), "threads": torch.get_num_threads()}
    print(json.dumps(rec), flush=True)
    return rec


try:
    import transformers
except ImportError:
    transformers = None
hf = None
sampling = dict(do_sample=True, temperature=a.temperature, top_k=0, top_p=1.0) if a.temperature > 0 else dict(do_sample=False)
with torch.no_grad():
    for batch in [int(b) for b in a.batch.split(",")]:
        ids, mask = prompts(batch)

        def ours_generate(n=None):
            return engine.generate_ids(ours, ids, mask, engine.Sampling(n or a.new_tokens, a.temperature))[0]

        def hf_generate(n=None):
            return hf.generate(ids, attention_mask=mask, max_new_tokens=n or a.new_tokens,
                               min_new_tokens=n or a.new_tokens, pad_token_id=0, **sampling)

        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        mine = report("nanotrl", batch, *timed(ours_generate), timed(lambda: ours_generate(1))[0])
        if transformers is None:
            continue
        hf = hf or transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(dev).eval()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        theirs = report(f"transformers-{transformers.__version__}", batch, *timed(hf_generate), timed(lambda: hf_generate(1))[0])
        print(json.dumps({"batch": batch, "ratio_tokens_per_s": round(mine["tokens_per_s"] / theirs["tokens_per_s"], 3)}))
