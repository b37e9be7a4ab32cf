"""
Training-step throughput, model FLOPs utilisation (MFU) and peak memory of SFT and DPO at real
model shapes with random weights, through the training scripts' own code: common.setup / shard /
autocast / token_logps / optimizer_step and losses.sft_loss / dpo_loss.

    python bench/train_step.py                                            # CPU: the tiny shape
    python bench/train_step.py --shape qwen2.5-0.5b --seq-len 2048 --batch 4   # one GPU, bf16
    python bench/train_step.py --shape llama-3.2-1b --algo dpo --grad-ckpt true
    python bench/train_step.py --shape llama-1b-32k --algo dpo --lora-r 16   # LoRA: reference = adapters off

One JSON line per algorithm:
  tokens_per_s   SFT: batch * seq_len per step; DPO: batch * 2 * seq_len (chosen and rejected rows
                 of prompt + answer, TRL's count), over the timed steps (after --warmup steps)
  mfu_measured   model FLOPs / s over the peak this script measures on the same device with a large
                 matmul (bf16 on GPU, fp32 on CPU)
  mfu_datasheet  the same over the datasheet dense bf16 peak (GPU only, known devices)
  peak_mem_mb    max_memory_allocated on GPU; peak RSS of the process on CPU (the process's
                 peak so far: run one --algo per process for each one's own figure)

Model FLOPs are counted for the work the step does (not 6 * params * tokens): 2 FLOPs per
multiply-add of every linear layer over the positions it sees, the LM head only over positions
with a loss, attention as 4 * head_dim * heads * layers per attended (query, key) pair (read off
the mask, so causal halving and DPO's shared prompt are counted exactly), x3 for forward +
backward of the trained policy (x2 with LoRA: the frozen weights get no gradient, the adapters'
FLOPs are negligible), x1 for DPO's reference forward.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import config  # noqa: E402
import forward  # noqa: E402
import lora  # noqa: E402
import losses  # noqa: E402
import hf_io  # noqa: E402
import model as M  # noqa: E402
from data import batching  # noqa: E402
from shapes import SHAPES  # noqa: E402
from timing import DATASHEET_BF16  # noqa: E402  (dense, SXM parts)

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
p.add_argument("--algo", default="sft,dpo", help="comma-separated: sft, dpo")
p.add_argument("--seq-len", type=int, default=128, help="SFT row length; DPO prompt + answer (half each)")
p.add_argument("--batch", type=int, default=8, help="SFT rows / DPO pairs per step")
p.add_argument("--steps", type=int, default=10, help="timed steps")
p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
p.add_argument("--grad-ckpt", type=config._parse_bool, default=False)
p.add_argument("--chunk-size", type=int, default=config.TrainConfig.chunk_size)
p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default")
p.add_argument("--layers", type=int, default=0, help="override the shape's number of layers (0 = as the shape)")
p.add_argument("--model", default="", help="a Hugging Face model directory to train (its shape and weights) "
               "instead of a random --shape, e.g. ~/.cache/nanotrl/smollm2-135m-instruct")
p.add_argument("--lora-r", type=int, default=0, help="LoRA rank on every projection (alpha 16); DPO's reference is "
               "then the policy with its adapters off; 0 = full fine-tuning")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)

cfg = config.TrainConfig(dtype=a.dtype, lr=1e-5, warmup_steps=0, max_steps=10**9, grad_ckpt=a.grad_ckpt, lora_r=a.lora_r)
dist = common.setup(cfg)
dev = dist.device
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
mcfg = hf_io.read_config(a.model) if a.model else M.ModelConfig.from_hf({
    "max_position_embeddings": 4 * a.seq_len, "rms_norm_eps": 1e-6, **SHAPES[a.shape],
    **({"num_hidden_layers": a.layers} if a.layers else {})})
with torch.device("meta"):  # parameters of the linear layers between the embedding and the LM head
    BODY = sum(p.numel() for n, p in M.Transformer(mcfg).named_parameters() if p.dim() == 2 and n.startswith("model.layers"))


def measured_peak():
    """FLOP/s of a large matmul in the dtype the model's matmuls run in."""
    n = 8192 if dev.type == "cuda" else 2048
    dtype = dist.autocast_dtype or torch.float32
    x, y = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        x @ y
    sync()
    t, reps = time.perf_counter(), 10 if dev.type == "cuda" else 3
    for _ in range(reps):
        x @ y
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def new_model():
    if a.model:
        m = hf_io.from_pretrained(a.model)
    else:
        m = M.Transformer(mcfg)
        m.init_weights(seed=0)
    m.grad_checkpointing = a.grad_ckpt
    return common.shard(common.add_lora(m, cfg), dist)


def forward_flops(batch, n_head_positions):
    """FLOPs of one forward over `batch`: linear layers on every position, the LM head on the
    loss positions, attention per attended (query, key) pair."""
    c, n_pos = mcfg, batch["input_ids"].numel()
    mask = batch["attention_mask"]
    pairs = mask.sum().item() if mask.dim() == 4 else sum(n * (n + 1) // 2 for n in mask.gt(0).sum(-1).tolist())
    return 2 * BODY * n_pos + 2 * c.vocab_size * c.hidden_size * n_head_positions + 4 * c.head_dim * c.num_heads * c.num_layers * pairs


def random_batch(algo, g):
    V, T = mcfg.vocab_size, a.seq_len
    if algo == "sft":  # every token trained, as a {"text"} record
        ids = torch.randint(4, V, (a.batch, T), generator=g).tolist()
        return batching.collate_sft([{"input_ids": r, "loss_mask": [1] * T} for r in ids], pad_id=0)
    P = T // 2
    prompt, answers = (torch.randint(4, V, (n, k), generator=g).tolist() for n, k in ((a.batch, P), (2 * a.batch, T - P)))
    return batching.collate_preference_shared([{"prompt_ids": prompt[i], "chosen_ids": answers[i],
                                                "rejected_ids": answers[a.batch + i]} for i in range(a.batch)], pad_id=0)


def step(algo, batch):
    """One optimizer step, as train_sft.py / train_dpo.py do it; returns its model FLOPs."""
    n_loss = batch["loss_mask"].sum().item()
    logps, mask = forward.token_logps(policy, batch, dist, a.chunk_size)
    if algo == "sft":
        loss = losses.sft_loss(logps, mask, n_loss)
        flops = (2 if a.lora_r else 3) * forward_flops(batch, n_loss)
    else:
        with torch.no_grad(), lora.adapters_disabled(ref):
            ref_logps, _ = forward.token_logps(ref, batch, dist, a.chunk_size)
        seq, ref_seq = (logps * mask).sum(-1), (ref_logps * mask).sum(-1)
        loss = losses.dpo_loss(seq[:a.batch], seq[a.batch:], ref_seq[:a.batch], ref_seq[a.batch:])[0].mean()
        flops = (3 if a.lora_r else 4) * forward_flops(batch, n_loss)
    loss.backward()
    common.optimizer_step(policy, opt, 0, cfg)
    return flops


peak = measured_peak()
# the real shape's own matmul (SmolLM2-135M's MLP over 4,096 tokens): the peak that shape can reach
from timing import matmul_flops_per_s  # noqa: E402
peak_mlp = matmul_flops_per_s() if dev.type == "cpu" else None
datasheet = next((v for k, v in DATASHEET_BF16.items() if dev.type == "cuda" and k in torch.cuda.get_device_name()), None)
for algo in a.algo.split(","):
    policy = new_model()
    ref = None
    if algo == "dpo" and a.lora_r:
        ref = policy  # no second copy
    elif algo == "dpo":
        ref = new_model()
        ref.requires_grad_(False).eval()
    opt = common.make_optimizer(policy, cfg)
    g = torch.Generator().manual_seed(0)
    batches = [random_batch(algo, g) for _ in range(a.warmup + a.steps)]
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for b in batches[:a.warmup]:
        step(algo, b)
    sync()
    t, flops = time.perf_counter(), 0
    for b in batches[a.warmup:]:
        flops += step(algo, b)
    sync()
    dt = time.perf_counter() - t
    tokens = a.steps * a.batch * a.seq_len * (2 if algo == "dpo" else 1)
    mem = torch.cuda.max_memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "algo": algo, "shape": a.model or a.shape, "layers": mcfg.num_layers, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "dtype": str(dist.autocast_dtype or torch.float32).removeprefix("torch."), "seq_len": a.seq_len, "batch": a.batch,
        "grad_ckpt": a.grad_ckpt, "params_m": round(sum(p.numel() for p in policy.parameters()) / 1e6, 2),
        "lora_r": a.lora_r, "trainable_m": round(sum(p.numel() for p in policy.parameters() if p.requires_grad) / 1e6, 2),
        "tokens_per_s": round(tokens / dt, 1), "step_s": round(dt / a.steps, 4),
        "model_tflops_per_s": round(flops / dt / 1e12, 4), "peak_tflops_measured": round(peak / 1e12, 3),
        "mfu_measured": round(flops / dt / peak, 4),
        "mfu_vs_4096x576x1536_matmul": round(flops / dt / peak_mlp, 4) if peak_mlp else None,
        "peak_tflops_4096x576x1536": round(peak_mlp / 1e12, 3) if peak_mlp else None,
        "mfu_datasheet": round(flops / dt / datasheet, 4) if datasheet else None,
        "peak_mem_mb": round(mem / 2**20, 1), "threads": torch.get_num_threads(),
    }), flush=True)
    del policy, ref, opt
