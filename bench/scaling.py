"""
Predicted scaling retention of nanotrl's FSDP2 and HSDP training on GPU clusters, from the exact
per-step collectives of bench/comm_model.py (checked against gloo in tests/test_comm_model.py), the
step's FLOPs at a stated sustained rate, stated link bandwidths and latencies, and FSDP2's overlap
of communication with compute. Prints one JSON object per configuration (and the assumptions first).

    python bench/scaling.py                       # the table of docs/scaling.md
    python bench/scaling.py --mfu 0.35 --ib-gbps 25

Retention at N GPUs = per-GPU throughput at N / per-GPU throughput on one node of 8 (where FSDP and
HSDP are the same thing). The time model of one optimizer step, per micro-batch:
  forward:  compute F, plus what the all-gathers of the blocks do not hide behind it (FSDP2
            prefetches the next unit's all-gather while the current one computes): the first
            unit's gather + max(0, sum of forward gathers - F)
  backward: compute B = 2F (full fine-tuning; LoRA/QLoRA compute no weight gradients for the
            base: B = F), plus max(0, backward gathers + reduce-scatters (every micro-batch) and
            HSDP all-reduces (the last micro-batch) - B) + the last unit's reduce-scatter (and all-reduce)
  a collective over g ranks moving b bytes per rank takes (g - 1) / g * b / bw + (g - 1) * latency
  (a ring; bw and latency of NVLink inside a node, of InfiniBand as soon as the group spans
  nodes); HSDP's all-reduce over R replicas 2 (R - 1) / R * b / bw_ib + 2 log2(R) * latency_ib.
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comm_model  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402
import nf4  # noqa: E402

LLAMA3 = dict(model_type="llama", vocab_size=128256, rope_theta=5e5, num_key_value_heads=8)
SHAPES = {"llama-3-8b": dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32),
          "llama-3-70b": dict(LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64)}
# (name, shape, algorithm, adapters, tokens per GPU per micro-batch, micro-batches per step, sequence length)
CONFIGS = [("Llama-3-8B SFT, full fine-tuning", "llama-3-8b", "sft", "", 2 * 8192, 1, 8192),
           ("Llama-3-8B DPO, full fine-tuning", "llama-3-8b", "dpo", "", 2 * 2 * 4096, 1, 4096),
           ("Llama-3-70B DPO, QLoRA r 16", "llama-3-70b", "dpo", "qlora", 2 * 2048, 4, 2048)]
GPUS = (8, 64, 256, 1024)


def build(shape, adapters):
    """The model as a script trains it, on the meta device: full, or an NF4 base with LoRA on
    every projection (QLoRA), parameters frozen as common.load_model freezes them."""
    with torch.device("meta"):
        m = M.Transformer(M.ModelConfig.from_hf(SHAPES[shape]))
    if adapters == "qlora":
        for block in m.model.layers:
            nf4.quantize_model(block)
        lora.apply_lora(m, 16, 32)
    return m


def flops_per_token(m, algo, adapters, seq):
    """Model FLOPs per trained token: 2 per parameter-token in each matmul pass (the embedding
    lookup is none) plus causal attention (PaLM's 12 * layers * width * seq for three passes, halved
    by the causal mask); backward is two passes (one without weight gradients: LoRA/QLoRA); DPO adds
    the reference's forward."""
    c = m.cfg
    # the projections (plain or NF4) and the head; the adapters' matmuls are negligible
    n = sum(mod.in_features * mod.out_features for name, mod in m.named_modules()
            if isinstance(mod, (torch.nn.Linear, nf4.NF4Linear)) and "lora_" not in name)
    per_pass = 2 * n + 2 * c.num_layers * c.hidden_size * seq  # matmuls + attention (causal: half of QK^T and AV)
    passes = 3 if adapters == "" else 2
    return per_pass * (passes + (1 if algo == "dpo" else 0))


def collective_time(op, nbytes, group, inter_node, a):
    bw = (a.ib_gbps if inter_node else a.nvlink_gbps) * 1e9
    lat = (a.ib_latency_us if inter_node else a.nvlink_latency_us) * 1e-6
    if op == "all_reduce":
        return 2 * (group - 1) / group * nbytes / bw + 2 * math.log2(group) * lat
    return (group - 1) / group * nbytes / bw + (group - 1) * lat


_COLLECTIVES, _FORWARD_GATHERS = {}, {}  # per (model, world, replicas): the same in every call of a configuration


def step_time(m, frozen, world, replicas, tokens, accum, seq, algo, adapters, a):
    """Seconds of one optimizer step on each GPU, and its parts."""
    compute = tokens * flops_per_token(m, algo, adapters, seq) / (a.peak_tflops * 1e12 * a.mfu)
    passes = (3 if adapters == "" else 2) + (algo == "dpo")
    f = ref = compute / passes  # one forward pass of the policy, and of the reference
    ref, b = (ref, compute - 2 * f) if algo == "dpo" else (0.0, compute - f)
    inter = world // replicas > a.gpus_per_node  # the shard group spans nodes: flat FSDP beyond one node
    times = {"all_gather": 0.0, "reduce_scatter": 0.0, "all_reduce": 0.0}
    longest = {op: 0.0 for op in times}
    key = (id(m), world, replicas)
    if key not in _COLLECTIVES:
        _COLLECTIVES[key] = comm_model.step_collectives(m, world, replicas, 1, a.compute_bytes, 4, frozen)
    for (op, inp, outp, group), calls in _COLLECTIVES[key].items():
        t = collective_time(op, outp if op == "all_gather" else inp, group, inter or op == "all_reduce", a)
        times[op] += t * calls
        longest[op] = max(longest[op], t)
    # forward gathers: every unit of the policy once (the root only then), the reference's; backward: the rest
    shards = world // replicas
    if key not in _FORWARD_GATHERS:
        _FORWARD_GATHERS[key] = [comm_model.shard_bytes(params, shards, None if n.startswith("nf4:") else a.compute_bytes)
                                 * shards for model in [m, *frozen] for n, params in comm_model.units(model)
                                 if model is m or n != "root"]
    fwd = sum(collective_time("all_gather", nbytes, shards, inter, a) for nbytes in _FORWARD_GATHERS[key])
    bwd = times["all_gather"] - fwd
    rs, ar = times["reduce_scatter"], times["all_reduce"]
    exposed_fwd = longest["all_gather"] + max(0.0, fwd - f - ref)
    exposed_bwd = max(0.0, bwd + rs - b) * (accum - 1) + max(0.0, bwd + rs + ar - b) + longest["reduce_scatter"] \
        + longest["all_reduce"]
    total = accum * (compute + exposed_fwd) + exposed_bwd
    return total, {"compute_s": accum * compute, "exposed_comm_s": total - accum * compute,
                   "gather_s": accum * times["all_gather"], "reduce_s": accum * rs + ar}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peak-tflops", type=float, default=989.4, help="H100 SXM dense bf16")
    p.add_argument("--mfu", type=float, default=0.40, help="sustained fraction of the peak")
    p.add_argument("--nvlink-gbps", type=float, default=360, help="NCCL bus bandwidth inside a node, GB/s per GPU")
    p.add_argument("--ib-gbps", type=float, default=45, help="across nodes, GB/s per GPU (400 Gb/s NDR at 90%%)")
    p.add_argument("--nvlink-latency-us", type=float, default=2.0)
    p.add_argument("--ib-latency-us", type=float, default=5.0)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--compute-bytes", type=int, default=2, help="all-gathered parameters: bf16 under FSDP's mixed precision")
    a = p.parse_args()
    print(json.dumps({"assumptions": vars(a)}))
    for name, shape, algo, adapters, tokens, accum, seq in CONFIGS:
        m = build(shape, adapters)
        frozen = [m] if algo == "dpo" and adapters == "" else []  # QLoRA's reference: the adapters-off policy
        base, _ = step_time(m, frozen, 8, 1, tokens, accum, seq, algo, adapters, a)
        for world in GPUS:
            for layout, replicas in (("fsdp", 1), ("hsdp", max(1, world // a.gpus_per_node))):
                t, parts = step_time(m, frozen, world, replicas, tokens, accum, seq, algo, adapters, a)
                row = {"config": name, "gpus": world, "layout": layout, "retention": round(base / t, 4),
                       "tokens_per_gpu_per_step": tokens * accum, "step_s": round(t, 3),
                       **{k: round(v, 3) for k, v in parts.items()}}
                if base / t < 0.9:  # the smallest micro-batch per GPU that keeps 90% (memory permitting)
                    k = tokens
                    while k < 64 * tokens and step_time(m, frozen, 8, 1, k, accum, seq, algo, adapters, a)[0] / \
                            step_time(m, frozen, world, replicas, k, accum, seq, algo, adapters, a)[0] < 0.9:
                        k *= 2
                    row["micro_batch_tokens_for_90pct"] = k if k < 64 * tokens else None
                print(json.dumps(row))


if __name__ == "__main__":
    main()
