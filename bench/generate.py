"""
Batched sampling throughput: model.generate (preallocated KV cache) against transformers'
`generate` on the same checkpoint, the same prompts and the same settings.

    python bench/generate.py                                          # CPU: the tiny shape
    python bench/generate.py --shape qwen2.5-0.5b --batch 64 --prompt-len 256 --new-tokens 256   # GPU

A random-init model of --shape is saved as a Hugging Face directory and loaded by both. Every
sequence generates exactly --new-tokens tokens (no EOS stop; transformers gets min_new_tokens), so
the work is identical. tokens_per_s = batch * new_tokens / wall time of the generate call (after
--warmup untimed calls), prompts left-padded to different lengths as in an RL rollout.
Prints one JSON line per implementation, then their ratio when transformers is installed.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from shapes import SHAPES  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
p.add_argument("--batch", type=int, default=16)
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
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

cfg = M.ModelConfig.from_hf({"max_position_embeddings": 2 * (a.prompt_len + a.new_tokens), "rms_norm_eps": 1e-6,
                             "eos_token_id": 2, "pad_token_id": 0, **SHAPES[a.shape]})
model = M.Transformer(cfg)
model.init_weights(seed=0)
ckpt = M.save_pretrained(model, os.path.join(tempfile.mkdtemp(), "model"))
ours = M.from_pretrained(ckpt, dtype=dtype, device=dev).eval()

g = torch.Generator().manual_seed(0)
lengths = torch.randint(a.prompt_len // 2, a.prompt_len + 1, (a.batch,), generator=g)
lengths[0] = a.prompt_len
mask = (torch.arange(a.prompt_len)[None] >= a.prompt_len - lengths[:, None]).long()  # left padding
ids = torch.randint(4, cfg.vocab_size, (a.batch, a.prompt_len), generator=g) * mask
ids, mask = ids.to(dev), mask.to(dev)


def timed(fn):
    for _ in range(a.warmup):
        fn()
    best = float("inf")
    for _ in range(a.repeats):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def report(impl, dt, out):
    n_new = out.shape[1] - a.prompt_len
    assert n_new == a.new_tokens, f"{impl} generated {n_new} tokens, expected {a.new_tokens}"
    rec = {"impl": impl, "shape": a.shape, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "dtype": str(dtype).removeprefix("torch."), "batch": a.batch, "prompt_len": a.prompt_len,
           "new_tokens": a.new_tokens, "temperature": a.temperature, "tokens_per_s": round(a.batch * n_new / dt, 1),
           "seconds": round(dt, 4), "threads": torch.get_num_threads()}
    print(json.dumps(rec), flush=True)
    return rec


def ours_generate():
    return M.generate(ours, ids, mask, a.new_tokens, temperature=a.temperature, eos_ids=(), pad_id=0)[0]


with torch.no_grad():
    mine = report("nanotrl", *timed(ours_generate))
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        hf = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=dtype).to(dev).eval()
        sampling = dict(do_sample=True, temperature=a.temperature, top_k=0, top_p=1.0) if a.temperature > 0 else dict(do_sample=False)

        def hf_generate():
            return hf.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                               pad_token_id=0, **sampling)

        theirs = report(f"transformers-{transformers.__version__}", *timed(hf_generate))
        print(json.dumps({"ratio_tokens_per_s": round(mine["tokens_per_s"] / theirs["tokens_per_s"], 3)}))
