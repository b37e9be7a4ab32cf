"""
Peak memory of a DPO training step at Qwen's vocabulary (151,936) as sequences grow: with the
chunked log-probs (losses.logprobs_from_hidden) it follows the chunk size, not T x vocab.

    python bench/dpo_memory.py                 # CPU, a few minutes
    python bench/dpo_memory.py --lengths 512,1024 --chunks 256 --naive-up-to 0 --no-share-prompt

Each case is a fresh `bench/dpo.py` process (peak RSS is a per-process figure) on the TRL bench's
2-layer Llama with 151,936 tokens, one pair per step (prompt and each answer T / 2 tokens), fp32,
policy + reference + AdamW. Prints bench/dpo.py's JSON line for each case, with the size of one
[chunk, V] fp32 buffer and of the full-sequence logits [2, T, V] fp32 that a naive step would
create (several times over: logits, log-softmax, their gradients); "naive" cases do just that.
"""
import argparse
import json
import os
import subprocess
import sys

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--lengths", default="512,1024,2048,4096", help="T = prompt + answer, comma-separated")
p.add_argument("--chunks", default="64,256,1024", help="chunk sizes, comma-separated")
p.add_argument("--naive-up-to", type=int, default=2048, help="also run the naive step for T up to this")
p.add_argument("--vocab", type=int, default=151936)
p.add_argument("--steps", type=int, default=2)
p.add_argument("--no-share-prompt", action="store_true", help="chosen and rejected as two full rows (bench/dpo.py's flag)")
a = p.parse_args()

bench = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dpo.py")
V = a.vocab - 4  # bench/dpo.py's model vocabulary (the TRL bench's tokenizer)
for T in map(int, a.lengths.split(",")):
    cases = [["--chunk-size", c] for c in a.chunks.split(",")] + ([["--naive-logps"]] if T <= a.naive_up_to else [])
    for case in cases:
        cmd = [sys.executable, bench, "--vocab", str(a.vocab), "--layers", "2", "--batch", "1", "--prompt-len", str(T // 2),
               "--resp-len", str(T - T // 2), "--steps", str(a.steps), *case] + (["--no-share-prompt"] if a.no_share_prompt else [])
        rec = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        rec["chunk_buffer_mb"] = round(rec["chunk_size"] * V * 4 / 2**20, 1) if rec["chunk_size"] else None
        rec["full_logits_mb"] = round(2 * T * V * 4 / 2**20, 1)
        print(json.dumps(rec), flush=True)
