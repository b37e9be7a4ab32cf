"""
The plumbing every training script shares: the entry point, process and distributed setup, model building (streamed loading, LoRA, NF4, FSDP2), the optimizer and its schedule, and
progress/metrics logging. Checkpoints and the final export are in checkpoint.py, the forward
helpers in forward.py, the loop skeleton in loop.py, the command-line config in config.py.

Runs as one plain process (`python train_sft.py`) or under torchrun (gloo on CPU, NCCL on GPU); with
more than one process the model is sharded with FSDP2 (`fully_shard` per block, then the root).
"""
import atexit
import ctypes
import datetime
import errno
import math
import os
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torchdist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

import checkpoint
import collectives
import config
import lora
import hf_io
import model as M
import nf4
from data import cache, chat, formats

# Flags naming files or directories that must exist (checked before anything is loaded or written).
PATH_FLAGS = ("model", "ref_model", "teacher", "reward_model", "value_model", "data", "eval_data")


class UsageError(ValueError):
    """A user's mistake (a flag, a missing file or prerequisite): `run` prints it as one line."""


def run(main, cls):
    """A script's entry point. A user's mistake (a flag, a file, a missing prerequisite, bad data,
    a diverged run, a full disk) is one line on stderr, exit status 2; our bugs keep their traceback."""
    cfg = config.parse_config(cls)
    try:
        main(cfg)
    except KeyboardInterrupt:  # Ctrl-C before the loop, or twice in it (checkpoint.Preemption)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a third one must not interrupt this line
        collectives.print0("error: interrupted: stopped without a checkpoint of this step (one Ctrl-C during "
                           "training checkpoints first; --resume continues from the last checkpoint)", file=sys.stderr)
        sys.exit(130)
    except (UsageError, checkpoint.RunError, formats.DataError, FloatingPointError, OSError) as e:
        full_disk = isinstance(e, OSError) and e.errno == errno.ENOSPC
        if isinstance(e, OSError) and not (full_disk or isinstance(e, FileNotFoundError)):
            raise
        collectives.print0(f"error: {e.strerror if full_disk else e}", file=sys.stderr)
        sys.exit(2)
    finally:  # the run is over: a late Ctrl-C must not turn a clean exit into a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 compute where wanted, None = fp32
    offload: bool = False  # --cpu-offload
    mesh: object = None    # --hsdp: the (replicate, shard) DeviceMesh; None = one flat group

    @property
    def main(self):
        return self.rank == 0

    @property
    def sharded(self):
        """Models are FSDP2-sharded: several ranks, or one with --cpu-offload."""
        return self.world > 1 or self.offload

    @property
    def shard(self):
        """(index, count) of this rank's dim-0 parameter shard: FSDP2 shards within a replica group."""
        shards = self.world // self.mesh.size(0) if self.mesh is not None else self.world
        return self.rank % shards, shards


def _malloc_mmap_threshold(nbytes=1 << 20):
    """Host tensors of 1 MiB and more get their own mmap, returned to the OS when freed. glibc's
    default raises this threshold to 32 MiB after the first large free; then temporaries freed
    between long-lived tensors leave resident holes (measured: 45 MiB more peak RSS per block of a
    Llama-3.2-1B QLoRA DPO step, ~40 MiB per block of a streamed 8B load). Not glibc: nothing."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def setup(cfg: config.TrainConfig) -> Dist:
    """One plain process, or one of torchrun's; checks the flags that depend on each other, the
    files they name and --out (read-only, before anything is loaded); seeds every RNG with the same
    seed on all ranks so fresh weights are identical before sharding."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    _malloc_mmap_threshold()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    # --cpu-offload keeps FSDP2's gradients in host memory, where clip_grad_norm_ all-reduces them:
    # NCCL takes only CUDA tensors, so CPU tensors get gloo in the same group
    backend = "gloo" if device.type != "cuda" else "cuda:nccl,cpu:gloo" if cfg.cpu_offload else "nccl"
    if (world > 1 or cfg.cpu_offload) and not torchdist.is_initialized():
        timeout = datetime.timedelta(minutes=cfg.dist_timeout)
        kw = {"device_id": device} if device.type == "cuda" else {}  # NCCL binds each rank to its GPU at once
        if "MASTER_ADDR" in os.environ:  # torchrun's
            torchdist.init_process_group(backend, timeout=timeout, **kw)
        else:  # one plain process (--cpu-offload still shards it with FSDP2): a group of one
            torchdist.init_process_group(backend, store=torchdist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                         **kw)
        atexit.register(_leave_process_group)
    for name in (n for n in PATH_FLAGS if getattr(cfg, n, "") and not os.path.exists(getattr(cfg, n))):
        raise UsageError(f"{config.flag(name)} {getattr(cfg, name)}: no such file or directory")
    if cfg.hsdp > 1 and world % cfg.hsdp:
        raise UsageError(f"--hsdp {cfg.hsdp}: the {world} processes must split into {cfg.hsdp} equal replica groups")
    if cfg.quantize and cfg.lora_r <= 0:
        # a quantized reference beside a full-precision policy would start the KL away from zero
        raise UsageError(f"--quantize {cfg.quantize} freezes the base weights: it needs --lora-r > 0 (QLoRA)")
    if cfg.double_quant and not cfg.quantize:
        raise UsageError("--double-quant quantizes the NF4 constants: it needs --quantize nf4")
    if cfg.cpu_offload and device.type != "cuda":
        raise UsageError("--cpu-offload moves FSDP2's state from the GPU to host memory: it needs a GPU")
    checkpoint.check_out(cfg, collectives.is_main())
    # bf16 on CPUs without native bf16 is ~70x slower than fp32 (2-core EPYC dev box): "auto" is fp32 there
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    if bf16 and device.type == "cuda":
        # the fp32 matmuls left (the chunked LM head, losses.logprobs_from_hidden) on tensor cores
        # as TF32: 10 mantissa bits, more than the bf16 the rest of the model runs in
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(cfg.seed)
    # rank = replica * shards + shard: a replica group is a node's consecutive ranks, so the
    # all-gathers and reduce-scatters stay within a node and only an all-reduce crosses nodes
    mesh = init_device_mesh(device.type, (cfg.hsdp, world // cfg.hsdp), mesh_dim_names=("replicate", "shard")) \
        if cfg.hsdp > 1 else None
    return Dist(rank, world, device, torch.bfloat16 if bf16 else None, cfg.cpu_offload, mesh)


def _leave_process_group():
    """At exit, a gloo thread releasing the last collective's tensors aborts a finalizing interpreter
    (~1 run in 10 of 2 processes; pytorch issue 190489): destroy the group while Python is alive."""
    torchdist.destroy_process_group()
    time.sleep(0.1)  # releases the GIL to any worker thread still waiting for it


def shard(model, dist: Dist, train=True):
    """FSDP2: each block, then the root (embeddings, final norm, head). On GPU, bf16 params for
    compute with fp32 master weights and fp32 gradient reduction."""
    model.to(dist.device)
    if not train:
        model.requires_grad_(False)
    for block in model.model.layers:
        _shard_part(block, dist)
    return _shard_part(model, dist)


def _shard_part(part, dist: Dist):
    """fully_shard one block or, last, the root. An NF4 layer gets an FSDP unit of its own with no
    dtype cast: its packed uint8 codes are all-gathered as bytes (FSDP2 gathers a unit of mixed
    dtypes as bytes), and a bf16 copy of its fp32 absmax would move every weight it scales."""
    if not dist.sharded:
        return part
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dist.autocast_dtype is not None and dist.device.type == "cuda" else MixedPrecisionPolicy()
    kw = {"mesh": dist.mesh, **({"offload_policy": CPUOffloadPolicy()} if dist.offload else {})}
    for m in part.modules() if not isinstance(part, M.Transformer) else ():  # the root's: sharded with their blocks
        if isinstance(m, nf4.NF4Linear):
            fully_shard(m, mp_policy=MixedPrecisionPolicy(), **kw)
    return fully_shard(part, mp_policy=mp, **kw)


def load_model(path, cfg: config.TrainConfig, dist: Dist, head="lm", train=True, adapt=False, modules_to_save=(), seed=0,
               keep_layers=0):
    """An HF checkpoint loaded streamed, ready to train or score: built on the meta device, then each
    block is read (its tensors only), quantized (--quantize: a frozen model's projections, or a
    LoRA base's), given adapters (`adapt` with --lora-r) and sharded before the next is read, so a
    rank holds its shards plus about one block, never the whole model; the root comes last.
    keep_layers > 0: only the first N blocks (a smaller student, as DistilBERT is made)."""
    lora_on = adapt and cfg.lora_r > 0
    if cfg.quantize and train and not lora_on:
        raise UsageError(f"--quantize {cfg.quantize}: a trained model needs adapters (--lora-r > 0)")
    g = torch.Generator().manual_seed(cfg.seed)  # one stream for every block's adapters: as one apply_lora call
    shard = dist.shard if dist.sharded else None  # the root is read as its rank's rows only
    for model, part in hf_io.load_parts(path, head, device=dist.device, seed=seed, shard=shard,
                                    frozen_embedding=not train or lora_on, keep_layers=keep_layers):
        if part is not model:
            if cfg.quantize:
                nf4.quantize_model(part, double_quant=cfg.double_quant)
            if lora_on:
                add_lora(model, cfg, modules_to_save, part=part, generator=g)
        elif lora_on:
            lora.freeze_base(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, modules_to_save)
        if not train:
            part.requires_grad_(False)
        if dist.autocast_dtype is not None and dist.device.type == "cuda" and not dist.sharded:
            cast_frozen(part, dist.autocast_dtype)
        model.grad_checkpointing = cfg.grad_ckpt
        _shard_part(part, dist)
    return model


def cast_frozen(module, dtype):
    """One GPU under autocast (no FSDP mixed precision): frozen floating weights (a reference, a
    teacher, a reward model, a LoRA base) stored in `dtype` once, where autocast would cast them
    again at every matmul (it caches only the casts of trainable weights). NF4's constants and
    bias keep their dtypes (the dequantization is bitsandbytes' in fp32)."""
    keep = {id(p) for m in module.modules() if isinstance(m, nf4.NF4Linear) for p in m.parameters()}
    for p in module.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype and id(p) not in keep:
            p.data = p.data.to(dtype)


def add_lora(model, cfg: config.TrainConfig, modules_to_save=(), part=None, generator=None):
    """With --lora-r > 0: adapters on --lora-targets, all else frozen but `modules_to_save` (a reward
    model's / critic's fresh `score` head); after loading, before `shard`. --lora-r 0: untouched."""
    if cfg.lora_r == 0:
        return model
    try:
        return lora.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.use_rslora,
                               modules_to_save, seed=cfg.seed, part=part, generator=generator)
    except ValueError as e:  # lora.py's errors name the flag
        raise UsageError(str(e)) from None


def load_tokenizer(model_dir, cfg: config.TrainConfig):
    """The tokenizer and chat rendering --chat-format, --system-prompt, --chat-template-kwargs ask for."""
    try:
        return chat.load_tokenizer(model_dir, cfg.chat_format or None, cfg.system_prompt or None, cfg.chat_template_kwargs)
    except ValueError as e:  # a broken tokenizer file, a bad template variable: named in the message
        raise UsageError(str(e)) from None


def load_data(path, kind, tok, cfg: config.TrainConfig, dist: Dist, **settings):
    """The tokenized examples of a JSONL file, memory-mapped from the data cache (tokenized into it
    first, the ranks sharing the work, if it is missing or stale): see data/cache.py."""
    return cache.load(path, kind, tok, settings, cfg.data_cache, dist.rank, dist.world, lambda: collectives.barrier(dist),
                      lambda obj: collectives.broadcast_object(obj, dist))


def autocast(dist: Dist):
    """bf16 autocast where FSDP's mixed precision does not already provide it."""
    if dist.autocast_dtype is None or (dist.sharded and dist.device.type == "cuda"):
        return nullcontext()
    return torch.autocast(dist.device.type, dtype=dist.autocast_dtype)


@contextmanager
def unsharded(model):
    """Gather full parameters once and keep them through many forwards (generation): otherwise
    FSDP all-gathers every layer at every decoded token, and ranks decoding different numbers of
    tokens would deadlock in those collectives."""
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()
            # as fully_shard set them: the root keeps its parameters after forward (backward needs
            # them at once), the blocks free theirs
            m.set_reshard_after_forward(m is not model, recurse=False)


# ----------------------------------------------------------------------------- optimizer

def make_optimizer(model, cfg: config.TrainConfig, lr=None):
    """AdamW; no weight decay on vectors (norms, biases), as usual. Fused (CUDA and CPU): one kernel
    per tensor, faster than foreach, without its model-sized temporaries."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=(0.9, 0.95), fused=True)


def lr_at(step, cfg: config.TrainConfig):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def optimizer_step(model, opt, step, cfg: config.TrainConfig, lr=None, what="grad_norm"):
    """Set the lr (the schedule's, or a constant `lr`), clip, step, zero; returns the grad norm before clipping."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg) if lr is None else lr
    norm = clip_grad_norm(model, cfg.grad_clip, step, what)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def clip_grad_norm(model, max_norm, step, what="grad_norm"):
    """Clip the gradients to a global norm (max_norm 0 = off) and return the norm before clipping,
    having stopped the run if it is not finite: the optimizer must never apply a NaN/inf gradient
    (AdamW would write NaN into every weight it touches, and the next checkpoint would keep them).
    clip_grad_norm_ on FSDP2's DTensor gradients reduces the norm over all shards, so every rank
    sees the same norm and stops together."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    check_finite(norm.item(), step, what)
    return norm.item()


def check_finite(value: float, step: int, what="loss"):
    """Stop on a NaN/inf `value` (a loss or grad norm summed over ranks: every rank stops) at loop
    index `step`, named as metrics.jsonl numbers it (step + 1)."""
    if not math.isfinite(value):
        raise FloatingPointError(f"step {step + 1}: {what} is {value}; stopping before the optimizer step "
                                 "(lower --lr, check the data, or use --dtype fp32; --resume continues from the last "
                                 "checkpoint, whose weights are finite, and may lower --lr)")
