"""
DPO training-step throughput and peak memory on exactly the work of ../shared/bench/trl_dpo_bench.py:
a random-init Llama of the given shape, random prompt/chosen/rejected token sequences of fixed
lengths, fp32, policy + live reference model, AdamW, `--steps` optimizer steps of `--batch` pairs.

    python bench/dpo.py                                   # small vocab (4,096)
    python bench/dpo.py --vocab 151936 --layers 2 --batch 4 --prompt-len 256 --resp-len 256 --steps 4
    python bench/dpo.py --trl-python /path/to/trl-venv/bin/python   # also run TRL, print the ratio

Prints one JSON line per implementation: tokens/s = batch * steps * 2 * (prompt + response) / wall
time of the training loop (TRL's definition), and peak RSS in MB (ru_maxrss of the process).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import config  # noqa: E402
import forward  # noqa: E402
import losses  # noqa: E402
import model as M  # noqa: E402
import train_dpo  # noqa: E402
from data import batching  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--layers", type=int, default=4)
p.add_argument("--dim", type=int, default=256)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--kv-heads", type=int, default=4)
p.add_argument("--vocab", type=int, default=4096)
p.add_argument("--prompt-len", type=int, default=64)
p.add_argument("--resp-len", type=int, default=64)
p.add_argument("--batch", type=int, default=8)
p.add_argument("--steps", type=int, default=20)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--chunk-size", type=int, default=256)
p.add_argument("--no-share-prompt", action="store_true", help="chosen and rejected as two full rows (TRL's layout)")
p.add_argument("--naive-logps", action="store_true", help="for contrast: full [rows, T, V] logits, then log-softmax (TRL's way)")
p.add_argument("--trl-python", default="", help="python of a venv with trl installed: run TRL's bench too")
p.add_argument("--trl-bench", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "bench", "trl_dpo_bench.py"),
               help="TRL's side of the comparison")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

# The TRL bench's tokenizer has 4 specials + (vocab - 8) words.
V = a.vocab - 4
cfg = M.ModelConfig(model_type="llama", vocab_size=V, hidden_size=a.dim, intermediate_size=a.dim * 8 // 3 // 64 * 64 or 64,
                    num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, head_dim=a.dim // a.heads,
                    max_position_embeddings=1024, norm_eps=1e-6)
policy = M.Transformer(cfg)
policy.init_weights(seed=0)
ref = M.Transformer(cfg)
ref.load_state_dict(policy.state_dict())
ref.requires_grad_(False).eval()

T = a.prompt_len + a.resp_len
layout = train_dpo.DPOConfig(share_prompt=not a.no_share_prompt)  # train_dpo.py's row layout
batches = []
for _ in range(a.steps):  # the same prompt for chosen and rejected, as TRL's bench
    prompt = torch.randint(4, V, (a.batch, a.prompt_len)).tolist()
    resp = torch.randint(4, V, (2 * a.batch, a.resp_len)).tolist()
    batches.append(train_dpo.collate([{"prompt_ids": prompt[i], "chosen_ids": resp[i], "rejected_ids": resp[a.batch + i]}
                                      for i in range(a.batch)], 0, layout))
dist = common.Dist(rank=0, world=1, device=torch.device("cpu"), autocast_dtype=None)
opt = common.make_optimizer(policy, config.TrainConfig(lr=1e-4))  # train_dpo.py's AdamW


def seq_logps(m, batch):  # exactly train_dpo.py's path: only answer positions go through the LM head
    if a.naive_logps:
        mask = batching.shared_prompt_mask(batch["segments"]) if "segments" in batch else None  # shared-prompt rows
        logits = m(batch["input_ids"], mask, batch["position_ids"])
        if "index" in batch:  # shared-prompt rows: the positions that predict each answer token
            logits = logits.flatten(0, 1)[batch["index"]]
        return (losses.logprobs_from_logits(logits, batch["labels"]) * batch["loss_mask"]).sum(-1)
    lp, mask = forward.token_logps(m, batch, dist, a.chunk_size)
    return (lp * mask).sum(-1)


t0 = time.perf_counter()
for ids in batches:
    with torch.no_grad():
        r = seq_logps(ref, ids)
    pl = seq_logps(policy, ids)
    loss = losses.dpo_loss(pl[:a.batch], pl[a.batch:], r[:a.batch], r[a.batch:], beta=0.1)[0].mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
dt = time.perf_counter() - t0
tokens = a.batch * a.steps * 2 * T
ours = {"impl": "nanotrl", "steps_per_s": a.steps / dt, "tokens_per_s": tokens / dt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "vocab": a.vocab,
        "params_m": sum(p.numel() for p in policy.parameters()) / 1e6, "threads": a.threads,
        "share_prompt": not a.no_share_prompt, "chunk_size": None if a.naive_logps else a.chunk_size,
        "prompt_len": a.prompt_len, "resp_len": a.resp_len, "batch": a.batch, "loss": loss.item()}
print(json.dumps(ours), flush=True)

if a.trl_python:
    args = [f"--{k.replace('_', '-')}={getattr(a, k)}" for k in
            ("layers", "dim", "heads", "kv_heads", "vocab", "prompt_len", "resp_len", "batch", "steps", "threads")]
    out = subprocess.run([a.trl_python, a.trl_bench] + args, capture_output=True, text=True,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True).stdout
    trl = json.loads(out.strip().splitlines()[-1])
    print(json.dumps(trl))
    print(json.dumps({"ratio_tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
                      "ratio_peak_rss": ours["peak_rss_mb"] / trl["peak_rss_mb"]}))
