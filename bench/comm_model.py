"""
FSDP2 / HSDP communication of one optimizer step, per rank and collective by collective, as
nanotrl shards a model (common.shard / common.load_model): one FSDP unit per transformer block,
one per NF4 layer (QLoRA), and the root (embeddings, final norm, head) last.

    units(model) -> the FSDP units in forward order, each a list of parameters
    step_collectives(model, world, replicas, ...) -> Counter{(op, input bytes, output bytes, group): calls}

What FSDP2 sends (torch 2.13, fully_shard with reshard_after_forward=True for the blocks; the root
keeps its parameters from forward to backward). S = world / replicas ranks share a shard group:
  - all-gather: a unit's padded dim-0 shards (each parameter's dim 0 padded to a multiple of S)
    into the whole unit, once in forward and again in backward for every block and NF4 unit, once
    per micro-batch for the root (it stays gathered through backward); in the compute dtype (bf16
    under FSDP's mixed precision on GPU, fp32 on CPU); NF4 units as their own uint8/fp32 bytes.
  - reduce-scatter: the padded gradients of a unit's trainable parameters, once per micro-batch
    (a rank keeps only its shard of the gradients; see loop.accumulate), in fp32.
  - all-reduce (HSDP only): each reduce-scattered shard over the `replicas` groups, once per step
    (after the last micro-batch).
  - a frozen model (the DPO/PPO reference, a reward model) gathers each block once per forward;
    its root is gathered by its first forward and then stays gathered (no backward reshards it).
  - QLoRA with adapters on every projection: in block 0 the q_proj and k_proj NF4 units take no
    part in backward (their input, the frozen embedding's normed output, carries no gradient); v_proj's
    is gathered in backward all the same, by FSDP2's prefetch of the unit before o_proj.
Activation checkpointing is not modelled (its recomputed forward may gather again).
tests/test_comm_model.py checks every count and size against the collectives FSDP2 issues on gloo.
"""
import math
from collections import Counter

import torch

import model as M
import nf4


def units(model):
    """FSDP units in forward order, as common._shard_part makes them: per block, the block's own
    parameters, then each of its NF4 layers; the root (what no block holds) first."""
    blocks = []
    for block in model.model.layers:
        quantized = [m for m in block.modules() if isinstance(m, nf4.NF4Linear)]
        inner = {id(p) for m in quantized for p in m.parameters()}
        blocks.append([("block", [p for p in block.parameters() if id(p) not in inner])] +
                      [("nf4:" + name, list(m.parameters()))
                       for name, m in block.named_modules() if isinstance(m, nf4.NF4Linear)])
    in_blocks = {id(p) for b in model.model.layers for p in b.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_blocks]
    return [("root", root)] + [u for b in blocks for u in b]


def shard_bytes(params, shards, compute_bytes=None):
    """Bytes of one rank's padded dim-0 shards of `params` (FSDP2 pads dim 0 to a multiple of the
    shard count); floating-point parameters in `compute_bytes` each if given (mixed precision)."""
    total = 0
    for p in params:
        rows = math.ceil(p.shape[0] / shards) if p.dim() else 1
        per_row = math.prod(p.shape[1:]) if p.dim() else 1
        size = compute_bytes if compute_bytes and p.is_floating_point() and p.dtype != torch.uint8 else p.element_size()
        total += rows * per_row * size
    return total


def step_collectives(model, world, replicas=1, grad_accum=1, compute_bytes=4, reduce_bytes=4, frozen=(),
                     forwards_per_micro=1, reshard_after_forward=True):
    """Counter{(op, input bytes, output bytes, group size): calls} of one optimizer step of a
    trained `model` (and of each model in `frozen`, run `forwards_per_micro` times per micro-batch:
    the reference), per rank. NF4 units gather in their stored dtypes."""
    S = world // replicas
    out = Counter()

    def gather(params, nf4_unit, calls):
        inp = shard_bytes(params, S, None if nf4_unit else compute_bytes)
        out[("all_gather", inp, inp * S, S)] += calls

    for name, params in units(model):
        nf4_unit = name.startswith("nf4:")
        if name == "root":
            gather(params, False, grad_accum)
        else:
            gather(params, nf4_unit, grad_accum * (1 + reshard_after_forward))
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            rs = shard_bytes(trainable, S, reduce_bytes)
            out[("reduce_scatter", rs * S, rs, S)] += grad_accum
            if replicas > 1:
                out[("all_reduce", rs, rs, replicas)] += 1
    if reshard_after_forward and any(p.requires_grad for p in model.parameters()):
        # block 0's q_proj and k_proj NF4 units run no backward (see the module docstring)
        for name, m in model.model.layers[0].named_modules():
            if isinstance(m, nf4.NF4Linear) and {"q_proj", "k_proj"} & set(name.split(".")):  # under LoRA: q_proj.base_layer
                inp = shard_bytes(list(m.parameters()), S)
                out[("all_gather", inp, inp * S, S)] -= grad_accum
    for ref in frozen:
        for name, params in units(ref)[1:]:  # the root: gathered once per run, not per step
            gather(params, name.startswith("nf4:"), grad_accum * forwards_per_micro)
    return +out


def summary(collectives: Counter) -> dict:
    """{op: {"calls", "bytes"}}: bytes are the sizes handed to the collectives (all-gather: its
    output, reduce-scatter: its input, all-reduce: its buffer), per rank."""
    out = {}
    for (op, inp, outp, _), n in collectives.items():
        s = out.setdefault(op, {"calls": 0, "bytes": 0})
        s["calls"] += n
        s["bytes"] += n * (outp if op == "all_gather" else inp)
    return out


def meta_model(config: dict, head="lm"):
    """The transformer of an HF config dict, on the meta device (no memory)."""
    cfg = M.ModelConfig.from_hf(config)
    with torch.device("meta"):
        return M.Transformer(cfg, head)
