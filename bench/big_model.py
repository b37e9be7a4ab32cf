"""
Big models on small hardware: peak memory and time of loading and of a DPO step at real model shapes
with random weights, loaded the way a user's checkpoint is (common.load_model: streamed, quantized,
adapted and sharded block by block).

    python bench/big_model.py --shape llama3-8b --quantize nf4 --lora-r 16 --algo dpo --steps 2
    python bench/big_model.py --shape llama3.2-3b --algo load --ckpt /tmp/ck3b      # whole, one process
    torchrun --standalone --nproc_per_node 2 bench/big_model.py --shape llama3.2-3b --algo load --ckpt /tmp/ck3b

The checkpoint (bf16 safetensors, one file per block, with the index) is written first, one tensor
at a time (never the whole model in memory), into --ckpt or a temp dir deleted at the end. DPO: one
pair of --prompt-len prompt + 2 x --answer-len answer tokens (the prompt computed once for both),
the reference = the policy with its adapters off (with --lora-r), activation checkpointing, AdamW.
Prints JSON lines; the last has peak_rss_mb (the max over ranks), the README's memory model's
prediction (predicted_mb, by part, one process) and its error, and for dpo s_per_step and where
the time goes (reference forward, policy forward, backward, optimizer; and the share of the NF4
dequantization, timed separately: each projection is dequantized 4 times a step).

On a GPU: every clock is read after a synchronize; peak_gpu_mb is max_memory_allocated (the max
over ranks), peak_mem_mb and the prediction's error are against it, and the prediction leaves out
the runtime (host memory: torch and Python); peak_rss_mb is the host's. The checkpoint's random
weights are drawn on the GPU by this process (the CPU's generator draws ~100M numbers a second:
80 s for 8B), and the GPU's peak is reset after writing it.
"""
import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import collectives  # noqa: E402
import common  # noqa: E402
import config  # noqa: E402
import forward  # noqa: E402
import lora  # noqa: E402
import losses  # noqa: E402
import hf_io  # noqa: E402
import model as M  # noqa: E402
import nf4  # noqa: E402
from data import batching  # noqa: E402
from timing import sync  # noqa: E402

SHAPES = {  # config.json fields of the real checkpoints
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "llama3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                        num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}

def predict_mb(hf, quantize, double_quant, lora_r, tokens, answer_tokens, chunk, algo="dpo", runtime_mb=280):
    """The README's memory model (one process, CPU, fp32 compute, a bf16 checkpoint), MiB: weights
    (4 bytes a parameter; NF4 0.5625, 0.5156 with double quantization; a frozen untied embedding
    stays bf16: 2), trainable state (weights' grads + AdamW's two moments: 12 bytes per trained
    parameter, the adapters' own weights 4 more), the DPO reference (a frozen copy for full
    fine-tuning; none with adapters), activations under --grad-ckpt (each block's input, then one
    block recomputed: T x (6 D + 2 D_kv + 3 I) x 4 bytes, twice for its backward), one projection
    dequantized (6 bytes a weight: fp32 + an int32 index per byte pair), the chunked head's [chunk,
    V] fp32 buffer, and the runtime (torch, Python: measured 277 MiB)."""
    D, I, L, V = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"], hf["vocab_size"]
    dq, dkv = hf["num_attention_heads"] * hf["head_dim"], hf["num_key_value_heads"] * hf["head_dim"]
    shapes = [(D, dq), (D, dkv), (D, dkv), (dq, D), (D, I), (D, I), (I, D)]
    P = L * sum(a * b for a, b in shapes)  # projections
    A = L * sum(lora_r * (a + b) for a, b in shapes)  # adapters
    E = V * D * (1 if hf["tie_word_embeddings"] else 2)
    emb = 4 * E if hf["tie_word_embeddings"] or not lora_r else 6 * V * D  # embedding (+ head)
    proj = (0.5 + (1 / 64 + 4 / 64 / 256 if double_quant else 4 / 64)) * P if quantize else 4 * P
    out = {"weights": proj + emb + 4 * A, "trainable": 12 * A if lora_r else 12 * (P + E)}
    if algo == "dpo":
        out["reference"] = 0 if lora_r else 4 * P + (4 * V * D if hf["tie_word_embeddings"] else 6 * V * D)
        out["activations"] = L * tokens * D * 4 + 2 * tokens * (6 * D + 2 * dkv + 3 * I) * 4
        out["dequantize"] = 6 * max(a * b for a, b in shapes) if quantize else 0
        out["head"] = min(chunk, answer_tokens) * V * 4
    out = {k: round(v / 2**20) for k, v in out.items()}
    out["runtime"] = runtime_mb
    return {**out, "peak": sum(out.values())}


p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--shape", default="llama3.2-1b", choices=sorted(SHAPES))
p.add_argument("--algo", default="dpo", choices=["dpo", "load"])
p.add_argument("--quantize", default="", help="nf4 or empty")
p.add_argument("--double-quant", type=config._parse_bool, default=False)
p.add_argument("--lora-r", type=int, default=0)
p.add_argument("--steps", type=int, default=2)
p.add_argument("--prompt-len", type=int, default=128)
p.add_argument("--answer-len", type=int, default=128)
p.add_argument("--layers", type=int, default=0, help="override the shape's number of layers (0 = as the shape)")
p.add_argument("--ckpt", default="", help="checkpoint dir: reused if it exists, else written (and kept)")
a = p.parse_args()

hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "rms_norm_eps": 1e-5,
      "max_position_embeddings": 8192, "rope_theta": 500000.0, "hidden_act": "silu", "torch_dtype": "bfloat16",
      **SHAPES[a.shape], **({"num_hidden_layers": a.layers} if a.layers else {})}
cfg = config.TrainConfig(lr=1e-5, warmup_steps=0, max_steps=10**9, grad_ckpt=True, lora_r=a.lora_r,
                         quantize=a.quantize, double_quant=a.double_quant)
dist = common.setup(cfg)
dev, cuda = dist.device, dist.device.type == "cuda"


def max_over_ranks(x):
    # on the run's device: NCCL reduces CUDA tensors only
    peak = torch.tensor(float(x), device=dev)
    if dist.world > 1:
        torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
    return round(peak.item(), 1)


def rss_mb():
    return max_over_ranks(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def gpu_mb():
    return max_over_ranks(torch.cuda.max_memory_allocated(dev) / 2**20)


def write_checkpoint(path, device="cpu"):
    """Random bf16 weights as an HF sharded checkpoint: one file per block, written as generated
    (drawn on `device`)."""
    mcfg = M.ModelConfig.from_hf(hf)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.Transformer(mcfg).state_dict().items()}
    if mcfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    groups = {}
    for k in shapes:
        groups.setdefault(k.split(".")[2] if k.startswith("model.layers.") else "rest", []).append(k)
    os.makedirs(path, exist_ok=True)
    g, weight_map = torch.Generator(device).manual_seed(0), {}
    for i, (_, names) in enumerate(groups.items()):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in names:
            s = shapes[k]
            t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g, device=device).mul_(0.02)
            tensors[k] = t.to(torch.bfloat16).cpu()
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f)


ckpt = a.ckpt or (tempfile.mkdtemp(prefix="big_model-") if dist.main else "")
if dist.world > 1:
    box = [ckpt]
    torch.distributed.broadcast_object_list(box)
    ckpt = box[0]
t0 = time.perf_counter()
if dist.main and not os.path.exists(os.path.join(ckpt, "config.json")) and cuda:
    write_checkpoint(ckpt, dev)  # the GPU draws the weights; its peak is reset below
    torch.cuda.empty_cache()
elif dist.main and not os.path.exists(os.path.join(ckpt, "config.json")):
    pid = os.fork()  # a child writes it: its memory stays out of this process's peak RSS
    if pid == 0:
        write_checkpoint(ckpt)
        os._exit(0)
    if os.waitpid(pid, 0)[1] != 0:
        raise RuntimeError(f"writing the checkpoint into {ckpt} failed")
collectives.barrier(dist)
write_s = time.perf_counter() - t0
base_rss = rss_mb()
if cuda:
    torch.cuda.reset_peak_memory_stats(dev)

t0 = time.perf_counter()
policy = common.load_model(ckpt, cfg, dist, adapt=True, train=a.algo == "dpo")
sync(dev)
load_s = time.perf_counter() - t0
out = {"shape": a.shape, "layers": hf["num_hidden_layers"], "algo": a.algo, "world": dist.world, "quantize": a.quantize,
       "double_quant": a.double_quant, "lora_r": a.lora_r, "params_b": round(sum(
           p.numel() for p in hf_io.from_pretrained(ckpt, device="meta").parameters()) / 1e9, 3),
       "write_ckpt_s": round(write_s, 1), "load_s": round(load_s, 1), "rss_before_load_mb": base_rss,
       "peak_rss_after_load_mb": rss_mb(), **({"peak_gpu_after_load_mb": gpu_mb()} if cuda else {})}
if dist.main:
    print(json.dumps(out), flush=True)

if a.algo == "dpo":
    ref = policy if a.lora_r else common.load_model(ckpt, cfg, dist, train=False).eval()
    opt = common.make_optimizer(policy, cfg)
    g = torch.Generator().manual_seed(0)
    V, P, A = hf["vocab_size"], a.prompt_len, a.answer_len
    phases = {"ref_forward": 0.0, "policy_forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    for step in range(a.steps):
        prompt, ch, rj = (torch.randint(4, V, (n,), generator=g).tolist() for n in (P, A, A))
        batch = batching.collate_preference_shared([{"prompt_ids": prompt, "chosen_ids": ch, "rejected_ids": rj}], pad_id=0)
        sync(dev)  # every clock read waits for the GPU's queued kernels
        t = time.perf_counter()
        with torch.no_grad(), lora.adapters_disabled(ref):
            ref_lp, mask = forward.token_logps(ref, batch, dist, cfg.chunk_size)
        sync(dev)
        t1 = time.perf_counter()
        lp, mask = forward.token_logps(policy, batch, dist, cfg.chunk_size)
        seq, ref_seq = (lp * mask).sum(-1), (ref_lp * mask).sum(-1)
        loss = losses.dpo_loss(seq[:1], seq[1:], ref_seq[:1], ref_seq[1:])[0].mean()
        sync(dev)
        t2 = time.perf_counter()
        loss.backward()
        sync(dev)
        t3 = time.perf_counter()
        common.optimizer_step(policy, opt, step, cfg)
        sync(dev)
        t4 = time.perf_counter()
        for k, dt in zip(phases, (t1 - t, t2 - t1, t3 - t2, t4 - t3)):
            phases[k] += dt
        peak = rss_mb()
        if dist.main:
            print(json.dumps({"step": step, "s": round(t4 - t, 1), "peak_rss_mb": peak,
                              **({"peak_gpu_mb": gpu_mb()} if cuda else {})}), flush=True)
    out["s_per_step"] = round(sum(phases.values()) / a.steps, 2)
    out.update({k + "_s": round(v / a.steps, 2) for k, v in phases.items()})
    if a.quantize:  # one dequantization of every projection (local shards' layers as one process sees them)
        layers = [m for m in policy.modules() if isinstance(m, nf4.NF4Linear)]
        sync(dev)
        t = time.perf_counter()
        for m in layers if dist.world == 1 else ():
            m.dequantize()
        sync(dev)
        out["dequantize_all_s"] = round(time.perf_counter() - t, 2)
        out["dequantize_share"] = round(4 * out["dequantize_all_s"] / out["s_per_step"], 3)  # ref, policy, recompute, backward
    out["tokens"] = P + 2 * A
    out["trainable_m"] = round(sum(p.numel() for p in policy.parameters() if p.requires_grad) / 1e6, 2)
out["peak_rss_mb"] = rss_mb()
if cuda:
    out["peak_gpu_mb"] = gpu_mb()
out["peak_mem_mb"] = out["peak_gpu_mb"] if cuda else out["peak_rss_mb"]
model_mb = predict_mb(hf, a.quantize, a.double_quant, a.lora_r, a.prompt_len + 2 * a.answer_len, 2 * a.answer_len,
                      cfg.chunk_size, a.algo, **({"runtime_mb": 0} if cuda else {}))  # the runtime is host memory
out["predicted_mb"] = model_mb
out["predicted_error"] = round(model_mb["peak"] / out["peak_mem_mb"] - 1, 3)
if dist.main:
    print(json.dumps(out), flush=True)
    if not a.ckpt:
        shutil.rmtree(ckpt)
