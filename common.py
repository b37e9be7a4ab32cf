"""
The plumbing every training script shares: the command-line config, process and distributed
setup, model building (streamed loading, LoRA, NF4, FSDP2), the optimizer and its schedule, and
progress/metrics logging. Checkpoints and the final export are in checkpoint.py, the forward
helpers in forward.py, the loop skeleton in loop.py.

Runs as one plain process (`python train_sft.py`) or under torchrun (gloo on CPU, NCCL on GPU); with
more than one process the model is sharded with FSDP2 (`fully_shard` per block, then the root).
"""
import argparse
import atexit
import ctypes
import dataclasses
import errno
import inspect
import math
import os
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torchdist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

import checkpoint
import lora
import model as M
import nf4
from data import cache, chat, formats


# ----------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    """Options every script shares (same names everywhere). Scripts extend this with their own."""
    model: str = ""           # HF model directory; empty = the built-in task's model
    data: str = ""            # JSONL file; empty = the built-in task
    out: str = "runs/out"     # output directory: metrics.jsonl, checkpoints/, final HF model
    max_steps: int = 200      # optimizer steps
    batch_size: int = 16      # sequences per micro-batch per process
    grad_accum: int = 1       # micro-batches per optimizer step
    lr: float = 1e-3          # peak learning rate, reached after warmup
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10    # linear warmup from 0 to lr over N steps
    weight_decay: float = 0.0  # AdamW's decoupled weight decay (matrices only)
    grad_clip: float = 1.0    # max global grad norm; 0 = off
    max_length: int = 512     # tokens per sequence (longer examples are truncated, see data/)
    seed: int = 0             # model init, data order and sampling
    dtype: str = "auto"       # auto = bf16 on GPU, fp32 on CPU
    grad_ckpt: bool = False   # activation checkpointing per block
    log_every: int = 10       # progress line and metrics.jsonl every N steps
    eval_every: int = 100     # evaluate every N steps; 0 = only at the start and the end
    save_every: int = 0       # sharded checkpoint every N steps; 0 = only on SIGTERM and at --stop-after
    stop_after: int = 0       # checkpoint and exit after this step (time-boxed jobs); 0 = off
    resume: bool = False      # continue from the latest checkpoint in out/checkpoints
    overwrite: bool = False   # start afresh in an --out that holds another run (deletes its checkpoints and model)
    chunk_size: int = 256     # positions per chunk for log-probs over the vocabulary ([256, V] fp32 buffer)
    chat_format: str = ""     # empty = the tokenizer's chat template, else a built-in format
    system_prompt: str = ""   # inserted when a conversation has none
    chat_template_kwargs: str = ""  # JSON object of chat template variables, e.g. '{"enable_thinking": false}' (data/chat.py)
    lora_r: int = 0           # LoRA rank; 0 = full fine-tuning (lora.py)
    lora_alpha: float = 16.0  # scaling = alpha / r: 1 at r 16, 2 at r 8 (PEFT's default 8 is 0.5 at r 16; recipes use r..2r)
    lora_dropout: float = 0.0  # on the adapters' input (PEFT's default; >0 makes runs depend on the RNG)
    lora_targets: str = "all-linear"  # PEFT target_modules: leaf names (q_proj,v_proj; GPT-2: c_attn,c_proj,c_fc)
    use_rslora: bool = False  # scaling = alpha / sqrt(r) (rsLoRA)
    data_cache: str = ""      # tokenized-data cache directory; empty = <data file>.cache beside each file (data/cache.py)
    quantize: str = ""        # nf4: frozen base projections in 4-bit NormalFloat (QLoRA with --lora-r; nf4.py)
    double_quant: bool = False  # with nf4: the per-block absmax constants in 8 bits too (QLoRA's double quantization)
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: parameters, gradients, optimizer state in host memory
    hsdp: int = 0             # HSDP: FSDP2 on a 2-D mesh of N replica groups x world/N shards (one per node); 0 = FSDP
    report_to: str = ""       # comma list: metrics.jsonl's records there too, from rank 0

    # Allowed values of numeric flags (an unlisted one must be >= 0); scripts extend it, as CHOICES.
    RANGES = {"max_steps": "[1, inf)", "batch_size": "[1, inf)", "grad_accum": "[1, inf)", "lr": "(0, inf)",
              "min_lr_ratio": "[0, 1]", "max_length": "[1, inf)", "log_every": "[1, inf)", "chunk_size": "[1, inf)",
              "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)"}
    # The fields with a fixed set of values; a field in MULTI takes a comma list of them.
    CHOICES = {"dtype": ("auto", "bf16", "fp32"), "chat_format": ("", "chatml", "llama3", "plain"),
               "quantize": ("", "nf4"), "report_to": ("wandb", "tensorboard")}
    MULTI = ("report_to",)
    # Fields a script cannot honour, with the reason: the flag is refused, never ignored.
    NOT_USED = {}


# Flags naming files or directories that must exist (checked before anything is loaded or written).
PATH_FLAGS = ("model", "ref_model", "teacher", "reward_model", "value_model", "data", "eval_data")


class UsageError(ValueError):
    """A user's mistake (a flag, a missing file or prerequisite): `run` prints it as one line."""


def parse_config(cls, argv=None):
    """Build a dataclass from `--field-name value` flags, checked against cls.RANGES and CHOICES;
    `--help` lists every field with its default, allowed values and the comment on its line."""
    p = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (--help lists every flag)\n")  # not the usage block
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        flag, about = checkpoint.flag(f.name), comments.get(f.name, "").replace("%", "%%")
        choices = cls.CHOICES.get(f.name)
        if f.name in cls.NOT_USED:
            p.add_argument(flag, help=argparse.SUPPRESS, type=_refuse(f"not used by this script: {cls.NOT_USED[f.name]}"))
        elif f.type in (bool, "bool"):
            p.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=f.default, metavar="BOOL",
                           help=f"{about} (default: %(default)s)")
        elif choices:
            shown = " | ".join(repr(c) if not c else c for c in choices)
            what = f"comma list of {shown}" if f.name in cls.MULTI else f"one of {shown}"
            p.add_argument(flag, default=f.default, help=f"{about} ({what}; default: %(default)r)")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            rng = f"in {_range(cls, f.name)}; " if typ in (int, float) else ""
            p.add_argument(flag, type=typ, default=f.default, help=f"{about} ({rng}default: %(default)r)")
    cfg = cls(**vars(p.parse_args(argv)))
    for f in dataclasses.fields(cls):
        v, flag = getattr(cfg, f.name), checkpoint.flag(f.name)
        if type(v) in (int, float) and not _in_range(v, _range(cls, f.name)):
            p.error(f"{flag} {v}: expected a value in {_range(cls, f.name)}")
        if f.name in cls.CHOICES:
            given = [x for x in v.split(",") if x] if f.name in cls.MULTI else [v]
            if bad := [x for x in given if x not in cls.CHOICES[f.name]]:
                p.error(f"{flag} {bad[0]!r}: expected {'a comma list of ' if f.name in cls.MULTI else 'one of '}"
                        f"{', '.join(repr(c) for c in cls.CHOICES[f.name])}")
    return cfg


def _refuse(reason):
    def parse(_):
        raise argparse.ArgumentTypeError(reason)
    return parse


def _range(cls, name):
    return getattr(cls, "RANGES", {}).get(name, "[0, inf)")


def _in_range(v, interval):
    """v in an interval written "[lo, hi)", "(0, 1]"...; inf bounds are open; NaN is never in."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = lo <= v if interval[0] == "[" else lo < v
    below = v <= hi if interval[-1] == "]" else v < hi
    return math.isfinite(v) and above and below


def _field_comments(cls):
    """{field: the comment on its line} over the class and its bases (a subclass's wins): --help's
    descriptions, kept where a reader of the code sees them. (A default holding "#" would cut its
    comment: none does.)"""
    out = {}
    for c in reversed(cls.__mro__[:-1]):  # not `object`
        out.update({m[1]: m[2].strip() for m in re.finditer(r"^    (\w+): [^#\n]*#(.*)$", inspect.getsource(c), re.M)})
    return out


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def run(main, cls):
    """A script's entry point. A user's mistake (a flag, a file, a missing prerequisite, bad data,
    a diverged run, a full disk) is one line on stderr, exit status 2; our bugs keep their traceback."""
    cfg = parse_config(cls)
    try:
        main(cfg)
    except (UsageError, checkpoint.RunError, formats.DataError, FloatingPointError, OSError) as e:
        full_disk = isinstance(e, OSError) and e.errno == errno.ENOSPC
        if isinstance(e, OSError) and not (full_disk or isinstance(e, FileNotFoundError)):
            raise
        print0(f"error: {e.strerror if full_disk else e}", file=sys.stderr)
        sys.exit(2)


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


def setup(cfg: TrainConfig) -> Dist:
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
    if world > 1 and not torchdist.is_initialized():
        torchdist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_leave_process_group)
    for name in (n for n in PATH_FLAGS if getattr(cfg, n, "") and not os.path.exists(getattr(cfg, n))):
        raise UsageError(f"{checkpoint.flag(name)} {getattr(cfg, name)}: no such file or directory")
    if cfg.hsdp > 1 and world % cfg.hsdp:
        raise UsageError(f"--hsdp {cfg.hsdp}: the {world} processes must split into {cfg.hsdp} equal replica groups")
    if cfg.quantize and cfg.lora_r <= 0:
        # a quantized reference beside a full-precision policy would start the KL away from zero
        raise UsageError(f"--quantize {cfg.quantize} freezes the base weights: it needs --lora-r > 0 (QLoRA)")
    if cfg.double_quant and not cfg.quantize:
        raise UsageError("--double-quant quantizes the NF4 constants: it needs --quantize nf4")
    if cfg.cpu_offload and (device.type != "cuda" or world == 1):
        raise UsageError("--cpu-offload moves FSDP2's state from the GPU to host memory: it needs a GPU and torchrun "
                         "(--nproc_per_node 1 is fine)")
    checkpoint.check_out(cfg, rank == 0)
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


def print0(*args, **kw):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kw, flush=True)


def all_sum(x: float | torch.Tensor, dist: Dist) -> float:
    """A number summed over ranks (a plain float in one process)."""
    if dist.world == 1:
        return float(x)
    t = torch.as_tensor(x, dtype=torch.float64, device=dist.device).clone()
    torchdist.all_reduce(t)
    return t.item()


def barrier(dist: Dist):
    if dist.world > 1:
        torchdist.barrier()


# ----------------------------------------------------------------------------- models and data

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
    if dist.world == 1:
        return part
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if dist.autocast_dtype is not None and dist.device.type == "cuda" else MixedPrecisionPolicy()
    kw = {"mesh": dist.mesh, **({"offload_policy": CPUOffloadPolicy()} if dist.offload else {})}
    for m in part.modules() if not isinstance(part, M.Transformer) else ():  # the root's: sharded with their blocks
        if isinstance(m, nf4.NF4Linear):
            fully_shard(m, mp_policy=MixedPrecisionPolicy(), **kw)
    return fully_shard(part, mp_policy=mp, **kw)


def load_model(path, cfg: TrainConfig, dist: Dist, head="lm", train=True, adapt=False, modules_to_save=(), seed=0,
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
    shard = dist.shard if dist.world > 1 else None  # the root is read as its rank's rows only
    for model, part in M.load_parts(path, head, device=dist.device, seed=seed, shard=shard,
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
        model.grad_checkpointing = cfg.grad_ckpt
        _shard_part(part, dist)
    return model


def add_lora(model, cfg: TrainConfig, modules_to_save=(), part=None, generator=None):
    """With --lora-r > 0: adapters on --lora-targets, all else frozen but `modules_to_save` (a reward
    model's / critic's fresh `score` head); after loading, before `shard`. --lora-r 0: untouched."""
    if cfg.lora_r == 0:
        return model
    try:
        return lora.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.use_rslora,
                               modules_to_save, seed=cfg.seed, part=part, generator=generator)
    except ValueError as e:  # lora.py's errors name the flag
        raise UsageError(str(e)) from None


def load_tokenizer(model_dir, cfg: TrainConfig):
    """The tokenizer and chat rendering --chat-format, --system-prompt, --chat-template-kwargs ask for."""
    try:
        return chat.load_tokenizer(model_dir, cfg.chat_format or None, cfg.system_prompt or None, cfg.chat_template_kwargs)
    except ValueError as e:  # a broken tokenizer file, a bad template variable: named in the message
        raise UsageError(str(e)) from None


def load_data(path, kind, tok, cfg: TrainConfig, dist: Dist, **settings):
    """The tokenized examples of a JSONL file, memory-mapped from the data cache (tokenized into it
    first, the ranks sharing the work, if it is missing or stale): see data/cache.py."""
    def from_rank0(obj):
        box = [obj]
        if dist.world > 1:
            torchdist.broadcast_object_list(box, src=0)
        return box[0]

    return cache.load(path, kind, tok, settings, cfg.data_cache, dist.rank, dist.world, lambda: barrier(dist), from_rank0)


def autocast(dist: Dist):
    """bf16 autocast where FSDP's mixed precision does not already provide it."""
    if dist.autocast_dtype is None or (dist.world > 1 and dist.device.type == "cuda"):
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

def make_optimizer(model, cfg: TrainConfig, lr=None):
    """AdamW; no weight decay on vectors (norms, biases), as usual. Fused (CUDA and CPU): one kernel
    per tensor, faster than foreach, without its model-sized temporaries."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=(0.9, 0.95), fused=True)


def lr_at(step, cfg: TrainConfig):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def optimizer_step(model, opt, step, cfg: TrainConfig, lr=None, what="grad_norm"):
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
