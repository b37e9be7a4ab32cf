"""
Batched sampling on a real checkpoint: engine.generate_ids against transformers' `generate`, run
interleaved in one process (ours, theirs, ours, theirs, ...; medians), with the fraction of the
matmul-bound floor.

    python bench/generate_real.py                                # SmolLM2-135M-Instruct, batch 64 and 8
    python bench/generate_real.py --batch 64 --repeats 5 --threads 2

Prompts are random token ids, left-padded, of lengths prompt_len / 2 .. prompt_len (the first one
is the longest); every sequence generates exactly --new-tokens tokens (no EOS stop; transformers
gets min_new_tokens), temperature 1, no top-k / top-p, so both do the same work.

floor_s is (prefill + decode FLOPs) / the fp32 FLOP/s of a 4096 x 576 x 1536 matmul measured here:
2 FLOPs per multiply-add of every linear layer over every real position (the prefill's padding
is not work: the engine skips it, transformers computes it), the LM head over one position per
sequence per step (the prompt's last, then each new token), attention 4 * head_dim * heads * layers
per attended (query, key) pair. floor_fraction = floor_s / seconds.
One JSON line per batch size.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import engine  # noqa: E402
import hf_io  # noqa: E402
from timing import DEFAULT_MODEL, interleaved, machine, matmul_flops_per_s  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--model", default=DEFAULT_MODEL, help="a Hugging Face model directory")
p.add_argument("--batch", default="64,8", help="comma-separated batch sizes")
p.add_argument("--prompt-len", type=int, default=40, help="longest prompt; the others are up to half shorter")
p.add_argument("--new-tokens", type=int, default=24)
p.add_argument("--repeats", type=int, default=5, help="timed rounds (ours, theirs) per batch size; medians")
p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default")
p.add_argument("--no-hf", action="store_true", help="ours only")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)

ours = hf_io.from_pretrained(a.model).eval()
cfg = ours.cfg
hf = None
if not a.no_hf:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
BODY = sum(p.numel() for n, p in ours.named_parameters() if p.dim() == 2 and n.startswith("model.layers"))


def flops(lengths, N):
    c, B = cfg, len(lengths)
    att = 4 * c.head_dim * c.num_heads * c.num_layers
    prefill = 2 * BODY * sum(lengths) + 2 * c.hidden_size * c.vocab_size * B + att * sum(n * (n + 1) // 2 for n in lengths)
    decode = sum(2 * BODY * B + 2 * c.hidden_size * c.vocab_size * B + att * sum(n + t + 1 for n in lengths)
                 for t in range(N - 1))  # the last token is sampled, never fed back
    return prefill + decode


for B in [int(b) for b in a.batch.split(",")]:
    g = torch.Generator().manual_seed(0)
    P = a.prompt_len
    lengths = torch.randint(P // 2, P + 1, (B,), generator=g)
    lengths[0] = P
    mask = (torch.arange(P)[None] >= P - lengths[:, None]).long()
    ids = torch.randint(4, cfg.vocab_size, (B, P), generator=g) * mask

    def run_ours():
        out = engine.generate_ids(ours, ids, mask, engine.Sampling(a.new_tokens, 1.0))[0]
        assert out.shape[1] == P + a.new_tokens

    def run_hf():
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                              do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        assert out.shape[1] == P + a.new_tokens

    fns = {"ours": run_ours, "matmul": lambda: matmul_flops_per_s(reps=3)}
    if hf is not None:
        fns["transformers"] = run_hf
    engine.generate_ids(ours, ids[:2], mask[:2], engine.Sampling(2))  # warm-up: short calls, not a whole untimed round
    if hf is not None:
        with torch.no_grad():
            hf.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=2, do_sample=True, pad_token_id=0)
    t = interleaved(fns, a.repeats, warmup=0)
    peak = matmul_flops_per_s()
    floor = flops(lengths.tolist(), a.new_tokens) / peak
    rec = {"batch": B, "prompt_len": P, "new_tokens": a.new_tokens, "threads": torch.get_num_threads(),
           "ours_s": round(t["ours"], 3), "ours_tokens_per_s": round(B * a.new_tokens / t["ours"], 1),
           "ours_all_s": t["ours_all"], "floor_s": round(floor, 3), "ours_floor_fraction": round(floor / t["ours"], 3),
           "matmul_gflops": round(peak / 1e9, 1)}
    if hf is not None:
        rec.update({"transformers": transformers.__version__, "transformers_s": round(t["transformers"], 3),
                    "transformers_all_s": t["transformers_all"],
                    "transformers_floor_fraction": round(floor / t["transformers"], 3),
                    "speedup_vs_transformers": round(t["transformers"] / t["ours"], 3),
                    # a neighbour's burst only adds time: the best rounds are the least disturbed ones
                    "speedup_best_vs_best": round(min(t["transformers_all"]) / min(t["ours_all"]), 3),
                    "speedup_per_round": [round(h / o, 3) for o, h in zip(t["ours_all"], t["transformers_all"])]})
    rec["machine"] = machine()
    print(json.dumps(rec), flush=True)
