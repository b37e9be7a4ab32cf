"""
The plumbing every training script shares, and nothing else: command-line configs, distributed
setup, FSDP2, autocast, the optimizer and its schedule, checkpoints, progress and metrics.

Runs as one plain process (`python train_sft.py`) or under torchrun (`torchrun --nproc_per_node N
train_sft.py`): gloo on CPU, NCCL on GPU. With more than one process the model is sharded with FSDP2
(`fully_shard` per block, then the root); a single process trains the plain module.
"""
import argparse
import atexit
import ctypes
import dataclasses
import errno
import inspect
import io
import json
import math
import os
import shutil
import signal
import time
import tokenize
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torchdist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

import lora
import losses
import model as M
import nf4


# ----------------------------------------------------------------------------- config

@dataclass
class TrainConfig:
    """Options every script shares (same names everywhere). Scripts extend this with their own."""
    model: str = ""           # HF model directory; empty = the built-in task's tiny model
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
    dtype: str = "auto"       # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    grad_ckpt: bool = False   # activation checkpointing per block
    log_every: int = 10       # progress line and metrics.jsonl every N steps
    eval_every: int = 100     # evaluate every N steps; 0 = only at the end
    save_every: int = 0       # sharded checkpoint every N steps; 0 = only on SIGTERM
    stop_after: int = 0       # checkpoint and exit after this step (time-boxed jobs); 0 = off
    resume: bool = False      # continue from the latest checkpoint in out/checkpoints
    overwrite: bool = False   # start afresh in an --out that holds another run (deletes its checkpoints and model)
    chunk_size: int = 256     # positions per chunk for log-probs over the vocabulary ([256, V] fp32 buffer)
    chat_format: str = ""     # empty = the tokenizer's chat template; chatml | llama3 | plain = a built-in format
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
    report_to: str = ""       # wandb and/or tensorboard (comma list): metrics.jsonl's records there too, from rank 0

    # Allowed values of the numeric flags as intervals; a numeric flag not listed must be >= 0.
    # Scripts extend it: RANGES = {**common.TrainConfig.RANGES, "beta": "(0, inf)"}.
    RANGES = {"max_steps": "[1, inf)", "batch_size": "[1, inf)", "grad_accum": "[1, inf)", "lr": "(0, inf)",
              "min_lr_ratio": "[0, 1]", "max_length": "[1, inf)", "log_every": "[1, inf)", "chunk_size": "[1, inf)"}


def parse_config(cls, argv=None):
    """Build a dataclass from `--field-name value` flags, each checked against cls.RANGES; `--help`
    lists every field with its default and the comment that follows it in the class."""
    p = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        about = comments.get(f.name, "").replace("%", "%%")
        if f.type in (bool, "bool"):
            p.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=f.default, metavar="BOOL",
                           help=f"{about} (default: %(default)s)")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            rng = f"in {_range(cls, f.name)}; " if typ in (int, float) else ""
            p.add_argument(flag, type=typ, default=f.default, help=f"{about} ({rng}default: %(default)r)")
    cfg = cls(**vars(p.parse_args(argv)))
    for f in dataclasses.fields(cls):
        v = getattr(cfg, f.name)
        if type(v) in (int, float) and not _in_range(v, _range(cls, f.name)):
            p.error(f"--{f.name.replace('_', '-')} {v}: expected a value in {_range(cls, f.name)}")
    return cfg


def _range(cls, name):
    return getattr(cls, "RANGES", {}).get(name, "[0, inf)")


def _in_range(v, interval):
    """v in an interval written "[lo, hi)", "(0, 1]"...; inf bounds are open; NaN is never in."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    above = lo <= v if interval[0] == "[" else lo < v
    below = v <= hi if interval[-1] == "]" else v < hi
    return math.isfinite(v) and above and below


def _field_comments(cls):
    """{field: the comment on its line} over the class and its bases (a subclass's own comment
    wins): the one-line descriptions of --help, kept where a reader of the code sees them."""
    out = {}
    for c in reversed(cls.__mro__):
        try:
            src = inspect.getsource(c)
        except (OSError, TypeError):  # builtins, or classes defined where no source is kept
            continue
        line_start = None
        for t in tokenize.generate_tokens(io.StringIO(src).readline):
            if t.type == tokenize.NAME and line_start is None:
                line_start = t
            elif t.type == tokenize.COMMENT and line_start is not None and line_start.start[0] == t.start[0]:
                out[line_start.string] = t.string.lstrip("#").strip()
            if t.type in (tokenize.NEWLINE, tokenize.NL):
                line_start = None
            elif line_start is None:
                line_start = False  # this logical line starts with something else
    return out


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


# ----------------------------------------------------------------------------- distributed

@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 compute where wanted, None = fp32
    offload: bool = False  # --cpu-offload

    @property
    def main(self):
        return self.rank == 0


def _malloc_mmap_threshold(nbytes=1 << 20):
    """Host tensors of 1 MiB and more get their own mmap, returned to the OS when freed. glibc's
    default raises this threshold to 32 MiB after the first large free; from then on activations
    and per-block temporaries come from the heap, and freed between long-lived tensors (saved block
    inputs, NF4 codes) they leave holes that stay resident. Measured on a Llama-3.2-1B-shaped QLoRA
    DPO step: 45 MiB more peak RSS per block, and ~40 MiB per block of a streamed Llama-3-8B load.
    Elsewhere than glibc (or with MALLOC_MMAP_THRESHOLD_ set), nothing."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def setup(cfg: TrainConfig) -> Dist:
    """One plain process, or one of torchrun's; seeds every RNG with the same seed on all ranks so
    fresh weights are identical before sharding."""
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
    if cfg.dtype not in ("auto", "bf16", "fp32"):
        raise ValueError(f"--dtype must be auto, bf16 or fp32, got {cfg.dtype!r}")
    if not set(filter(None, cfg.report_to.split(","))) <= {"wandb", "tensorboard"}:
        raise ValueError(f"--report-to must be a comma list of wandb, tensorboard; got {cfg.report_to!r}")
    check_out(cfg)
    # bf16 on CPUs without native bf16 is ~70x slower than fp32 (measured on the 2-core EPYC dev box),
    # so "auto" means fp32 there.
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    if bf16 and device.type == "cuda":
        # the fp32 matmuls left (the chunked LM head, losses.logprobs_from_hidden) on tensor cores
        # as TF32: 10 mantissa bits, more than the bf16 the rest of the model runs in
        torch.set_float32_matmul_precision("high")
    torch.manual_seed(cfg.seed)
    if cfg.quantize not in ("", "nf4"):
        raise ValueError(f"--quantize must be nf4 or empty, got {cfg.quantize!r}")
    if cfg.quantize and cfg.lora_r <= 0:
        # a quantized reference beside a full-precision policy would start the KL away from zero
        raise ValueError(f"--quantize {cfg.quantize} freezes the base weights: it needs --lora-r > 0 (QLoRA)")
    if cfg.double_quant and not cfg.quantize:
        raise ValueError("--double-quant quantizes the NF4 constants: it needs --quantize nf4")
    if cfg.cpu_offload and device.type != "cuda":
        raise ValueError("--cpu-offload moves FSDP2's parameters, gradients and optimizer state from the GPU to host "
                         "memory: it needs a GPU (on a CPU they are in host memory already)")
    if cfg.cpu_offload and world == 1:
        raise ValueError("--cpu-offload is FSDP2's: start the script with torchrun (--nproc_per_node 1 is fine)")
    return Dist(rank, world, device, torch.bfloat16 if bf16 else None, cfg.cpu_offload)


def _leave_process_group():
    """At exit: a gloo worker thread may still be releasing the last collective's tensors, which
    takes the GIL; if the interpreter is already finalizing, that aborts the process ("terminate
    called without an active exception", ~1 run in 10 of a 2-process job here; pytorch issue
    190489). Destroy the group while Python is alive and let those threads finish first."""
    torchdist.destroy_process_group()
    time.sleep(0.1)  # releases the GIL to any worker thread still waiting for it


def print0(*args, **kw):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kw, flush=True)


def all_sum(x: float | torch.Tensor, dist: Dist) -> float:
    """Sum a number over ranks (a plain float in one process)."""
    if dist.world == 1:
        return float(x)
    t = torch.as_tensor(x, dtype=torch.float64, device=dist.device).clone()
    torchdist.all_reduce(t)
    return t.item()


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
    offload = {"offload_policy": CPUOffloadPolicy()} if dist.offload else {}
    for m in part.modules() if not isinstance(part, M.Transformer) else ():  # the root's: sharded with their blocks
        if isinstance(m, nf4.NF4Linear):
            fully_shard(m, mp_policy=MixedPrecisionPolicy(), **offload)
    return fully_shard(part, mp_policy=mp, **offload)


def load_model(path, cfg: TrainConfig, dist: Dist, head="lm", train=True, adapt=False, modules_to_save=(), seed=0):
    """An HF checkpoint loaded streamed, ready to train or score, in place of from_pretrained +
    add_lora + shard: built on the meta device, then each block is read from the safetensors
    files (its tensors only), quantized (--quantize: a frozen model's projections, or a LoRA
    base's), given its adapters (`adapt` with --lora-r) and sharded before the next block is read,
    so a rank holds its own shards plus about one block, never the whole model. The embeddings,
    final norm and head come last."""
    lora_on = adapt and cfg.lora_r != 0  # add_lora rejects a negative rank
    if cfg.quantize and train and not lora_on:
        raise ValueError(f"--quantize {cfg.quantize}: a trained model needs adapters (adapt=True, --lora-r > 0)")
    g = torch.Generator().manual_seed(cfg.seed)  # one stream for every block's adapters: as one apply_lora call
    shard = (dist.rank, dist.world) if dist.world > 1 else None  # the root is read as its rank's rows only
    for model, part in M.load_parts(path, head, device=dist.device, seed=seed, shard=shard,
                                    frozen_embedding=not train or lora_on):
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


def add_lora(model, cfg: TrainConfig, modules_to_save=(), part=None, generator=None):
    """With --lora-r > 0: adapters on --lora-targets, everything else frozen except
    `modules_to_save` (a reward model's / critic's fresh `score` head). Call after loading the
    weights and before `shard`. With --lora-r 0 the model is returned untouched (full fine-tuning)."""
    if cfg.lora_r < 0:
        raise ValueError(f"--lora-r must be >= 0 (0 = full fine-tuning), got {cfg.lora_r}")
    if cfg.lora_r == 0:
        return model
    if cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1:
        raise ValueError(f"--lora-alpha must be > 0 and --lora-dropout in [0, 1), got {cfg.lora_alpha}, {cfg.lora_dropout}")
    return lora.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, cfg.use_rslora,
                           modules_to_save, seed=cfg.seed, part=part, generator=generator)


# ----------------------------------------------------------------------------- optimizer

def make_optimizer(model, cfg: TrainConfig, dist: Dist):
    """AdamW; no weight decay on vectors (norms, biases) as usual for transformers. Fused (CUDA and
    CPU): one kernel per tensor, faster than foreach, without its model-sized temporaries."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=True)


def lr_at(step, cfg: TrainConfig):
    """Linear warmup, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def optimizer_step(model, opt, step, cfg: TrainConfig):
    """Set this step's lr, clip, step, zero. Returns the global grad norm (before clipping)."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    norm = clip_grad_norm(model, cfg.grad_clip, step)
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
                                 "checkpoint, whose weights are finite)")


# ----------------------------------------------------------------------------- checkpoints

# Fields that may differ between a run and its --resume: where and how often it reports and saves,
# and activation checkpointing (same arithmetic, less memory), not what it computes. --max-steps may
# change too, as long as the checkpoint's step is not past it (checked in check_out).
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "stop_after", "save_every", "log_every", "eval_every",
                     "eval_samples", "record_rollout", "grad_ckpt", "report_to", "data_cache")


def check_out(cfg: TrainConfig):
    """Runs never mix in one --out (read-only; every rank checks, before anything is loaded). A
    fresh run refuses a directory holding another run's checkpoints or model unless --overwrite
    (Logger deletes them once the inputs have been validated); --resume refuses a checkpoint whose
    saved config differs from this run's in a field that defines the run, and names the field."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    ckpt = latest_checkpoint(cfg.out, quiet=True)
    if not (cfg.resume and ckpt):
        held = [n for n, there in (("checkpoints/", ckpt), ("model/", os.path.isdir(os.path.join(cfg.out, "model"))))
                if there]
        if held and not cfg.overwrite:
            how = "it has no checkpoint to resume from" if cfg.resume else "continue it with --resume"
            raise FileExistsError(f"{cfg.out} holds another run ({' and '.join(held)}): {how}; start afresh with "
                                  "--overwrite (deletes them), or choose another --out")
        return
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    saved, mine = state.get("config", {}), dataclasses.asdict(cfg)
    if cfg.max_steps < state["step"]:
        raise ValueError(f"--resume: {ckpt} is at step {state['step']}, past --max-steps {cfg.max_steps}")
    for k in sorted(set(saved) | set(mine)):
        if k not in RESUME_MAY_CHANGE and k != "max_steps" and saved.get(k, "(not set)") != mine.get(k, "(not set)"):
            raise ValueError(f"--resume: {ckpt} belongs to a run with --{k.replace('_', '-')} "
                             f"{saved.get(k, '(not set)')!r}; this one has {mine.get(k, '(not set)')!r}. Pass the same "
                             "value to continue it, or start afresh with --overwrite or another --out")


def latest_checkpoint(out, quiet=False):
    """The newest complete, readable checkpoint in out/checkpoints (None if there is none); says
    which newer ones it skips and why, unless quiet."""
    d = os.path.join(out, "checkpoints")
    steps = [int(n.removeprefix("step_")) for n in os.listdir(d) if n.startswith("step_") and n[5:].isdigit()] \
        if os.path.isdir(d) else []
    for step in sorted(steps, reverse=True):
        path = os.path.join(d, f"step_{step:08d}")
        problem = _checkpoint_problem(path)
        if problem is None:
            return path
        if not quiet:
            print0(f"skipping checkpoint {path}: {problem}")
    return None


def _checkpoint_problem(path):
    """Why the checkpoint at `path` cannot be resumed from (None if it can), without loading it:
    state.json, every rank's RNG file, and every shard as long as DCP's metadata says it is.
    (The metadata file is a pickle of torch's: reading it is what dcp.load does too.)"""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
        world = int(state["world"])
        for r in range(world):
            with open(os.path.join(path, f"rng_rank{r}.safetensors"), "rb") as f:
                header = int.from_bytes(f.read(8), "little")
                json.loads(f.read(header))
        sizes = {}
        for info in dcp.FileSystemReader(path).read_metadata().storage_data.values():
            sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), info.offset + info.length)
        for name, size in sizes.items():
            if os.path.getsize(os.path.join(path, name)) < size:
                return f"{name} is truncated ({os.path.getsize(os.path.join(path, name))} of {size} bytes)"
    except Exception as e:  # any unreadable piece makes the checkpoint unusable; say which
        return f"{type(e).__name__}: {e}"
    return None


@contextmanager
def writing(path):
    """A full disk, however the writer reports it (OSError, or wrapped by safetensors, DCP or
    torch's zip writer: "unexpected pos"), becomes one error that names `path`."""
    try:
        yield
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        text = str(e)
        if getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in text or "os error 28" in text \
                or "unexpected pos" in text:
            raise OSError(errno.ENOSPC, f"no space left on device: {path} (free some space, or write to another "
                                        "--out; --resume continues from the last complete checkpoint)") from e
        raise


def assert_finite_weights(models, step, dist: Dist):
    """Refuse to save non-finite weights (all ranks together: each checks its shards)."""
    bad = [n for m in models for n, p in m.named_parameters()
           if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
    if all_sum(len(bad), dist):
        where = f" ({bad[0]} and {len(bad) - 1} more on rank {dist.rank})" if bad else ""
        raise FloatingPointError(f"after step {step}: the weights are not finite{where}; nothing saved "
                                 "(lower --lr; --resume continues from the last checkpoint)")


def save_checkpoint(out, step, dist: Dist, parts: dict, extra=None):
    """A sharded, resumable checkpoint written with torch.distributed.checkpoint into a temp dir
    that is renamed only once complete. parts: {"policy": (model, optimizer), ...}. Also saves
    the step, each rank's RNG state and the script's `extra` (JSON)."""
    final = os.path.join(out, "checkpoints", f"step_{step:08d}")
    tmp = final + ".tmp"
    assert_finite_weights([model for model, _ in parts.values()], step, dist)
    with writing(tmp):
        if dist.main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier(dist)
        state = {name: _trainable_state(model, opt) for name, (model, opt) in parts.items()}
        dcp.save(state, checkpoint_id=tmp)
        # RNG state as plain tensors (safetensors): nothing in a checkpoint of ours is a pickle
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
        save_file(rng, os.path.join(tmp, f"rng_rank{dist.rank}.safetensors"))
        if dist.main:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": step, "world": dist.world, **(extra or {})}, f)
    barrier(dist)
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    barrier(dist)
    return final


def _trainable_state(model, opt):
    """The model's trainable tensors (all of them in full fine-tuning; with LoRA the adapters and
    any trained head) and the optimizer's state: what a resume needs beyond --model."""
    msd, osd = get_state_dict(model, opt)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {"model": {k: v for k, v in msd.items() if k in trainable}, "optim": osd}


def load_checkpoint(path, dist: Dist, parts: dict) -> dict:
    """Restore what save_checkpoint wrote into `parts` (same names); returns its state.json.
    The RNG state is restored only when the world size matches (it is per rank)."""
    with open(os.path.join(path, "state.json")) as f:
        state = json.load(f)
    sd = {name: _trainable_state(model, opt) for name, (model, opt) in parts.items()}
    try:
        dcp.load(sd, checkpoint_id=path)
    except (Exception, CheckpointException) as e:  # DCP's exception is a BaseException
        raise RuntimeError(f"{path}: checkpoint cannot be read ({str(e).strip().splitlines()[0]}); delete this "
                           "directory to resume from the checkpoint before it, or start afresh with --overwrite") from e
    for name, (model, opt) in parts.items():
        set_state_dict(model, opt, model_state_dict=sd[name]["model"], optim_state_dict=sd[name]["optim"],
                       options=StateDictOptions(strict=False))  # frozen tensors come from --model
    if state["world"] == dist.world:
        rng = load_file(os.path.join(path, f"rng_rank{dist.rank}.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def resume(cfg: TrainConfig, dist: Dist, parts: dict) -> int:
    """The step to start from: 0, or with --resume the newest usable checkpoint's, restored into
    `parts` (as save_checkpoint's)."""
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    if ckpt is None:
        return 0
    start = load_checkpoint(ckpt, dist, parts)["step"]
    print0(f"resumed from {ckpt} at step {start}")
    return start


def checkpoint_or_stop(done, cfg: TrainConfig, dist: Dist, preempt, parts: dict) -> bool:
    """After `done` optimizer steps: the periodic checkpoint, and a last one on SIGTERM or at
    --stop-after. True means the run must exit now (and continue later with --resume)."""
    stop = preempt.requested(dist) or done == cfg.stop_after
    if (cfg.save_every and done % cfg.save_every == 0) or stop:
        save_checkpoint(cfg.out, done, dist, parts, {"config": dataclasses.asdict(cfg)})
    if stop:
        print0(f"stopping after step {done} with a checkpoint; continue with --resume")
    return stop


def save_final(model, cfg: TrainConfig, dist: Dist, tokenizer_dir, base_model=""):
    """The finished model as an HF directory in out/model, gathered from the shards on rank 0.
    With LoRA, out/adapter is the adapter in PEFT's format (base_model_name_or_path: `base_model`)
    and out/model the merged model (adapters folded into dequantized base weights, block by block)."""
    assert_finite_weights([model], cfg.max_steps, dist)
    if getattr(model, "lora", None):
        trainable = {n: p.full_tensor() if hasattr(p, "full_tensor") else p  # collective: every rank
                     for n, p in model.named_parameters() if p.requires_grad}
        if dist.main:
            sd = lora.peft_state_dict(model, {n: t.detach().cpu() for n, t in trainable.items()})
            path = lora.save_adapter(os.path.join(cfg.out, "adapter"), lora.peft_config(model, base_model), sd)
            print0(f"saved {path}")
    chunks = hf_state_chunks(model, dist)
    if dist.main:
        with writing(os.path.join(cfg.out, "model")):
            path = M.save_pretrained(model, os.path.join(cfg.out, "model"), state_dict=chunks, tokenizer_dir=tokenizer_dir)
        print0(f"saved {path}")
    for _ in chunks:  # the other ranks take part in each block's all-gather
        pass
    barrier(dist)


def hf_state_chunks(model, dist: Dist):
    """The model's tensors as a dense HF model has them (NF4 dequantized, LoRA merged; see
    lora.dense_state_dict), one block at a time then the root, on CPU on rank 0 (empty elsewhere).
    Each block is all-gathered, exported and freed before the next, so no rank ever holds the whole
    state dict. Every rank must iterate it (the all-gathers are collective)."""
    parts = [(b, f"model.layers.{i}.") for i, b in enumerate(model.model.layers)] + [(model, "")]
    for part, prefix in parts:
        units = [m for m in ([part] if part is model else part.modules()) if isinstance(m, FSDPModule)]
        for m in units:
            m.unshard()  # this unit's own parameters (a root's exclude its blocks')
        sd = lora.dense_state_dict(part, prefix, exclude="model.layers." if part is model else None) if dist.main else {}
        # copies: resharding frees the gathered parameters' storage; one dtype (a frozen
        # embedding may be kept narrower, see load_parts)
        dt = model.model.norm.weight.dtype
        yield {k: v.detach().to("cpu", dt if v.is_floating_point() else v.dtype, copy=True) for k, v in sd.items()}
        for m in units:
            m.reshard()


def barrier(dist: Dist):
    if dist.world > 1:
        torchdist.barrier()


def load_data(path, kind, tok, cfg: TrainConfig, dist: Dist, **settings):
    """The tokenized examples of a JSONL file, memory-mapped from the data cache (tokenized into it
    first, the ranks sharing the work, if it is missing or stale): see data/cache.py."""
    from data import cache  # local: keeps common.py importable without the data package

    def from_rank0(obj):
        box = [obj]
        if dist.world > 1:
            torchdist.broadcast_object_list(box, src=0)
        return box[0]

    return cache.load(path, kind, tok, settings, cfg.data_cache, dist.rank, dist.world, lambda: barrier(dist), from_rank0)


class Preemption:
    """SIGTERM (a scheduler's preemption notice, forwarded by torchrun) sets a flag; the loop checks
    it once per step, on all ranks together, then checkpoints and exits cleanly."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.flag = True

    def requested(self, dist: Dist) -> bool:
        return all_sum(float(self.flag), dist) > 0


# ----------------------------------------------------------------------------- logging

def start_out(cfg: TrainConfig, start_step):
    """Prepare --out for this run. A fresh run with --overwrite deletes the previous run's files
    (only those nanotrl writes). config.json, the run's identity, and metrics.jsonl are replaced
    atomically: a fresh run starts an empty log; a resumed one keeps the lines logged up to its
    checkpoint, dropping a partial last line (a run killed mid-write)."""
    os.makedirs(cfg.out, exist_ok=True)
    if cfg.overwrite and not start_step:
        for name in ("checkpoints", "model", "adapter"):
            shutil.rmtree(os.path.join(cfg.out, name), ignore_errors=True)
    path = os.path.join(cfg.out, "metrics.jsonl")
    kept = _kept_metrics(path, start_step) if start_step and os.path.exists(path) else []
    for name, text in (("config.json", json.dumps(dataclasses.asdict(cfg), indent=2)), ("metrics.jsonl", "".join(kept))):
        tmp = os.path.join(cfg.out, f".{name}.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, os.path.join(cfg.out, name))


def _kept_metrics(path, start_step):
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            if n < len(lines):
                raise ValueError(f"{path}:{n}: not a metrics record (a JSON object with a 'step'); delete the "
                                 "line, or the file, to resume") from None
            print0(f"{path}:{n}: dropping a partial last line (the run was stopped while writing it)")
            continue
        if step <= start_step:
            kept.append(line)
    return kept


class Logger:
    """Progress lines (step, metrics, tokens/s, ETA) and metrics.jsonl (one JSON object per line with
    a "step" field). Does nothing off rank 0."""

    def __init__(self, cfg: TrainConfig, dist: Dist, start_step=0):
        self.main, self.max_steps, self.start_step = dist.main, cfg.max_steps, start_step
        self.start = self.tick = time.time()
        self.file = None
        if self.main:  # the first bytes of the run written to --out: every input is validated by now
            self.path = os.path.join(cfg.out, "metrics.jsonl")
            with writing(cfg.out):
                start_out(cfg, start_step)
            self.file = open(self.path, "a", encoding="utf-8")
        self.writers = _report_writers(cfg, start_step) if self.main else []

    def log(self, step, metrics: dict, tokens=0):
        """`tokens`: tokens processed by all ranks since the last call that passed tokens."""
        if not self.main:
            return
        now = time.time()
        record = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}
        if tokens:
            record["tokens_per_s"] = round(tokens / max(now - self.tick, 1e-9), 1)
            self.tick = now
        with writing(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        for write in self.writers:
            write(step, {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "step")
        done = step - self.start_step
        eta = int((now - self.start) / done * (self.max_steps - step)) if done > 0 else 0
        print(f"step {step}/{self.max_steps}  {shown}  eta {eta // 60}m{eta % 60:02d}s", flush=True)


def _report_writers(cfg: TrainConfig, start_step):
    """--report-to: one write(step, scalars) function per service. The libraries are imported only
    here, when asked for; they are not dependencies of nanotrl."""
    writers = []
    for name in filter(None, cfg.report_to.split(",")):  # names checked in setup(), on every rank
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"--report-to tensorboard needs the tensorboard package (pip install tensorboard): {e}") from e
            # purge_step: a resumed run hides what the interrupted one logged after its checkpoint,
            # as metrics.jsonl drops those lines
            tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"), purge_step=start_step + 1 if start_step else None)

            def write(step, scalars, tb=tb):
                for k, v in scalars.items():
                    tb.add_scalar(k, v, step)
                tb.flush()  # like metrics.jsonl: a killed run keeps what it logged
            writers.append(write)
            atexit.register(tb.close)
        elif name == "wandb":
            try:
                import wandb
            except ImportError as e:
                raise ImportError(f"--report-to wandb needs the wandb package (pip install wandb): {e}") from e
            # project, entity and WANDB_MODE=offline come from wandb's own environment variables
            run = wandb.init(name=os.path.basename(os.path.normpath(cfg.out)), dir=cfg.out, config=dataclasses.asdict(cfg))
            writers.append(lambda step, scalars, run=run: run.log(scalars, step=step))
            atexit.register(run.finish)
    return writers


# ----------------------------------------------------------------------------- forward helpers

def token_logps(model, batch, dist: Dist, chunk_size, packed=False):
    """Per-token log-probs [B, T] of batch["labels"] where batch["loss_mask"] is set (0 elsewhere),
    and the mask. Only the masked positions go through the LM head, in chunks, so neither
    [B, T, V] fp32 logits nor the head's cost on prompt tokens are ever paid."""
    b = {k: v.to(dist.device) for k, v in batch.items()}
    sel = b["loss_mask"] > 0

    def head(h, w):
        out = torch.zeros(sel.shape, dtype=torch.float32, device=h.device)
        # batch["index"] (shared-prompt preference rows): where in the flattened [B * T] hidden
        # states each label's predicting position is; otherwise labels line up with positions.
        hs = h.flatten(0, 1)[b["index"][sel]] if "index" in b else h[sel]
        out[sel] = losses.logprobs_from_hidden(hs, w, b["labels"][sel], chunk_size)
        return out

    # Right-padded rows need no mask (padding comes after every real token, so causal attention
    # never reaches it) and take SDPA's fast causal path; packed and shared-prompt rows need theirs.
    mask = b["attention_mask"] if packed or "index" in b else None
    with autocast(dist):
        logps = model(b["input_ids"], mask, b["position_ids"], head_fn=head)
    return logps, b["loss_mask"]


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def eval_accuracy(model, tok, records, dist: Dist, is_correct, max_new_tokens=16, batch_size=64):
    """Exact-match accuracy of greedy answers to `records` ({"prompt", "answer"}), split over ranks."""
    from data import batching, chat  # local: keeps common.py importable without the data package

    was_training = model.training
    model.eval()
    mine, correct = records[dist.rank::dist.world], 0
    with unsharded(model), autocast(dist):
        for i in range(0, len(mine), batch_size):
            chunk = mine[i:i + batch_size]
            ids, mask = batching.collate_prompts([chat.tokenize_prompt(r, tok, 10**9) for r in chunk], tok.pad_id)
            toks, cmask = M.generate(model, ids.to(dist.device), mask.to(dist.device), max_new_tokens,
                                     temperature=0, eos_ids=tok.stop_ids, pad_id=tok.pad_id)
            for r, row, m in zip(chunk, toks[:, ids.shape[1]:].tolist(), cmask.tolist()):
                text = tok.tokenizer.decode([t for t, keep in zip(row, m) if keep], skip_special_tokens=True)
                correct += bool(is_correct(text, r["answer"]))
    model.train(was_training)
    return all_sum(correct, dist) / max(len(records), 1)


# ----------------------------------------------------------------------------- built-in task stages

SFT_DIR = "runs/sft"


def ensure_sft_model(dist: Dist, seed=0, max_steps=0, out=SFT_DIR):
    """The built-in task's SFT model (runs/sft/model), trained here first if it does not exist, so
    that `train_dpo.py` / `train_ppo.py` with no arguments work from a fresh clone."""
    path = os.path.join(out, "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        import train_sft

        print0(f"no SFT model at {path}: training it first (train_sft.py defaults)")
        sft = train_sft.SFTConfig(out=out, seed=seed, resume=True)  # continues an interrupted one
        if max_steps:
            sft.max_steps = max_steps
        train_sft.main(sft)
    return path


@torch.no_grad()
def sample_preference_pairs(policy, tok, records, dist: Dist, is_correct, samples=8, seed=0,
                            max_new_tokens=16, batch_size=256):
    """On-policy preference pairs, the way real pipelines make them: sample `samples` answers per
    prompt at temperature 1, judge each with the verifier, and pair distinct correct answers
    (chosen) with distinct wrong ones (rejected). Prompts are split over ranks and the pairs
    gathered, in prompt order, on every rank."""
    from data import batching, chat

    g = torch.Generator(dist.device).manual_seed(seed * 1000 + dist.rank)
    mine = list(range(dist.rank, len(records), dist.world))
    per_batch = max(1, batch_size // samples)
    found = []
    policy.eval()
    with unsharded(policy), autocast(dist):
        for i in range(0, len(mine), per_batch):
            chunk = mine[i:i + per_batch]
            prompts = [chat.tokenize_prompt(records[j], tok, 10**9) for j in chunk for _ in range(samples)]
            ids, mask = batching.collate_prompts(prompts, tok.pad_id)
            toks, cmask = M.generate(policy, ids.to(dist.device), mask.to(dist.device), max_new_tokens,
                                     temperature=1.0, eos_ids=tok.stop_ids, pad_id=tok.pad_id, generator=g)
            texts = [tok.tokenizer.decode([t for t, k in zip(row, m) if k], skip_special_tokens=True)
                     for row, m in zip(toks[:, ids.shape[1]:].tolist(), cmask.tolist())]
            for n, j in enumerate(chunk):
                answers = texts[n * samples:(n + 1) * samples]
                good = list(dict.fromkeys(a for a in answers if is_correct(a, records[j]["answer"])))
                bad = list(dict.fromkeys(a for a in answers if not is_correct(a, records[j]["answer"])))
                found += [(j, {"prompt": records[j]["prompt"], "chosen": c, "rejected": r}) for c, r in zip(good, bad)]
    policy.train()
    if dist.world > 1:
        gathered = [None] * dist.world
        torchdist.all_gather_object(gathered, found)
        found = [p for part in gathered for p in part]
    return [p for _, p in sorted(found, key=lambda x: x[0])]
