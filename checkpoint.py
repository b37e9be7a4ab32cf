"""
Everything that outlives a process: the run's identity in --out (which run it is, and what a
--resume may change), sharded resumable checkpoints (torch.distributed.checkpoint), preemption
(SIGTERM), and the final export as a Hugging Face directory (and a PEFT adapter with LoRA).

Nothing here is written in place: a checkpoint is written to `step_N.tmp` and renamed when
complete, the HF directory through hf_io.atomic_dir, config.json and metrics.jsonl through a
temp file and os.replace. Depends on torch, model and lora only: every function takes the
script's `dist` (rank, world, main).
"""
import dataclasses
import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule

import collectives
import config
import lora
import hf_io


class RunError(ValueError):
    """A mistake in how the run was started (--out, --resume): one line for the user, no traceback."""


# ----------------------------------------------------------------------------- the run's identity

# What a --resume may change: where and how often the run reports, evaluates and saves, memory
# placement and layout (activation checkpointing, CPU offload, --hsdp: DCP reshards a checkpoint
# onto any mesh; with another world size the per-rank RNG is not restored), and the optimisation
# settings a run is resumed to change (a lower lr after a divergence, a longer schedule). Every
# other field defines the model, the data, the algorithm or the batch shape: it must match.
# --max-steps may grow, or shrink down to the checkpoint's step.
RESUME_MAY_CHANGE = ("out", "resume", "overwrite", "stop_after", "save_every", "log_every", "eval_every",
                     "eval_samples", "record_rollout", "grad_ckpt", "cpu_offload", "hsdp", "report_to", "data_cache",
                     "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "max_steps", "value_lr",
                     "dist_timeout")


def check_out(cfg, main=True):
    """Runs never mix in one --out (read-only; every rank checks, before anything is loaded). A
    fresh run refuses a directory holding another run's checkpoints or model unless --overwrite
    (start_out deletes them once the inputs have been validated); --resume refuses a checkpoint
    whose saved config differs in a field that defines the run, naming the field, and prints
    (on rank 0) the settings it changes."""
    if cfg.resume and cfg.overwrite:
        raise RunError("--resume continues the run in --out, --overwrite deletes it: pass one of them")
    ckpt = latest_checkpoint(cfg.out, quiet=True)
    if not (cfg.resume and ckpt):
        held = [n for n, there in (("checkpoints/", ckpt), ("model/", os.path.isdir(os.path.join(cfg.out, "model"))))
                if there]
        if held and not cfg.overwrite:
            how = "it has no checkpoint to resume from" if cfg.resume else "continue it with --resume"
            raise RunError(f"{cfg.out} holds another run ({' and '.join(held)}): {how}; start afresh with "
                           "--overwrite (deletes them), or choose another --out")
        return
    with open(os.path.join(ckpt, "state.json")) as f:
        state = json.load(f)
    saved, mine = state.get("config", {}), dataclasses.asdict(cfg)
    if cfg.max_steps < state["step"]:
        raise RunError(f"--resume: {ckpt} is at step {state['step']}, past --max-steps {cfg.max_steps}")
    changed = []
    for k in sorted(set(saved) | set(mine)):
        was, now = saved.get(k, "(not set)"), mine.get(k, "(not set)")
        if was == now:
            continue
        if k not in RESUME_MAY_CHANGE:
            raise RunError(f"--resume: {ckpt} belongs to a run with {config.flag(k)} {was!r}; this one has {now!r}. "
                           "Pass the same value to continue it, or start afresh with --overwrite or another --out")
        if k not in ("out", "resume", "overwrite"):
            changed.append(f"{config.flag(k)} {was} -> {now}")
    if changed and main:
        print(f"resuming {ckpt} with changed settings: {', '.join(changed)}", flush=True)


def start_out(cfg, start_step):
    """Prepare --out for this run (rank 0, once every input is validated). A fresh run with
    --overwrite deletes the previous run's files (only those nanotrl writes). config.json, the
    run's identity, and metrics.jsonl are replaced atomically: a fresh run starts an empty log; a
    resumed one keeps the lines logged up to its checkpoint, dropping a partial last line (a run
    killed mid-write)."""
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
                raise RunError(f"{path}:{n}: not a metrics record (a JSON object with a 'step'); delete the "
                               "line, or the file, to resume") from None
            print(f"{path}:{n}: dropping a partial last line (the run was stopped while writing it)", flush=True)
            continue
        if step <= start_step:
            kept.append(line)
    return kept


# ----------------------------------------------------------------------------- sharded checkpoints

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
        if not quiet and collectives.is_main():
            print(f"skipping checkpoint {path}: {problem}", flush=True)
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


def assert_finite_weights(models, step, dist):
    """Refuse to save non-finite weights (all ranks together: each checks its shards)."""
    bad = [n for m in models for n, p in m.named_parameters()
           if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
    if collectives.any_rank(bool(bad), dist):
        where = f" ({bad[0]} and {len(bad) - 1} more on rank {dist.rank})" if bad else ""
        raise FloatingPointError(f"after step {step}: the weights are not finite{where}; nothing saved "
                                 "(lower --lr; --resume continues from the last checkpoint)")


def save_checkpoint(out, step, dist, parts: dict, extra=None):
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
        collectives.barrier(dist)
        state = {name: _trainable_state(model, opt) for name, (model, opt) in parts.items()}
        dcp.save(state, checkpoint_id=tmp)
        # RNG state as plain tensors (safetensors): nothing in a checkpoint of ours is a pickle
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
        save_file(rng, os.path.join(tmp, f"rng_rank{dist.rank}.safetensors"))
        if dist.main:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": step, "world": dist.world, **(extra or {})}, f)
    collectives.barrier(dist)
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    collectives.barrier(dist)
    return final


def _trainable_state(model, opt):
    """The model's trainable tensors (all of them in full fine-tuning; with LoRA the adapters and
    any trained head) and the optimizer's state: what a resume needs beyond --model."""
    msd, osd = get_state_dict(model, opt)
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    return {"model": {k: v for k, v in msd.items() if k in trainable}, "optim": osd}


def load_checkpoint(path, dist, parts: dict) -> dict:
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


def resume(cfg, dist, parts: dict) -> int:
    """The step to start from: 0, or with --resume the newest usable checkpoint's, restored into
    `parts` (as save_checkpoint's). The optimizer's hyperparameters come from this run's flags,
    not the checkpoint's (the lr is set every step; weight decay here), so a resume can change them."""
    ckpt = latest_checkpoint(cfg.out) if cfg.resume else None
    if ckpt is None:
        return 0
    start = load_checkpoint(ckpt, dist, parts)["step"]
    for _, opt in parts.values():
        for group in opt.param_groups:
            # as make_optimizer groups them: matrices decay, vectors (norms, biases) do not
            group["weight_decay"] = cfg.weight_decay if any(p.dim() >= 2 for p in group["params"]) else 0.0
    if dist.main:
        print(f"resumed from {ckpt} at step {start}", flush=True)
    return start


class Preemption:
    """SIGTERM (a scheduler's preemption notice, forwarded by torchrun) or a first Ctrl-C (SIGINT)
    sets a flag; the loop checks it once per step, on all ranks together, then checkpoints and
    exits with status 0 (--resume continues). A second Ctrl-C aborts at once, without a checkpoint
    (common.run: one line, status 130)."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._interrupt)

    def _handle(self, *_):
        self.flag = True

    def _interrupt(self, *_):
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True
        if collectives.is_main():
            print("interrupted: checkpointing after this step (Ctrl-C again stops at once, without one)",
                  file=sys.stderr, flush=True)

    def requested(self, dist) -> bool:
        return collectives.any_rank(self.flag, dist)


# ----------------------------------------------------------------------------- the final export

def save_final(model, cfg, dist, tokenizer_dir, base_model=""):
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
            print(f"saved {path}", flush=True)
    chunks = hf_state_chunks(model, dist)
    if dist.main:
        with writing(os.path.join(cfg.out, "model")):
            card = {"README.md": model_card(cfg, dist, base_model or tokenizer_dir, model.head)}
            path = hf_io.save_pretrained(model, os.path.join(cfg.out, "model"), state_dict=chunks, tokenizer_dir=tokenizer_dir,
                                     extra_files=card)
        print(f"saved {path}", flush=True)
    for _ in chunks:  # the other ranks take part in each block's all-gather
        pass
    collectives.barrier(dist)


def model_card(cfg, dist, base_model, head):
    """out/model/README.md: the Hub's front matter (base model, data, library, tags), then how the
    model was made (the command, the data file's hash, the commit) and its final metrics, so the
    directory uploads as it is (`hf upload`)."""
    script = os.path.basename(sys.argv[0])
    base = _model_id(base_model)
    data = cfg.data or "the built-in task (data/task.py)"
    algo = getattr(cfg, "algo", None) or getattr(cfg, "loss", None)
    tags = ["nanotrl", script.removeprefix("train_").removesuffix(".py")] + ([algo] if algo else []) + \
        (["lora"] if cfg.lora_r else []) + (["qlora"] if cfg.quantize else [])
    launch = f"torchrun --nproc_per_node {dist.world} " if dist.world > 1 else "python "
    final = _final_metrics(os.path.join(cfg.out, "metrics.jsonl"))
    dataset = os.path.basename(data) if cfg.data else "nanotrl-task"
    pipeline = "text-generation" if head == "lm" else "text-classification"
    front = [f"base_model: {json.dumps(base)}", "datasets:", f"- {json.dumps(dataset)}", "library_name: transformers",
             f"pipeline_tag: {pipeline}", "tags:", *[f"- {t}" for t in tags]]
    digest = f" (sha256 `{_sha256(cfg.data)}`)" if cfg.data and os.path.isfile(cfg.data) else ""
    lines = ["---", *front, "---", "", f"# {os.path.basename(os.path.abspath(cfg.out))}", "",
             f"`{base}` trained with nanotrl's `{script}`. It loads with `transformers` as it is "
             f"(`AutoModelFor{'CausalLM' if head == 'lm' else 'SequenceClassification'}.from_pretrained`).", "",
             "| | |", "|---|---|",
             f"| command | `{launch}{shlex.join(sys.argv)}` |",
             f"| data | `{data}`{digest} |",
             f"| nanotrl commit | `{_commit()}` |", f"| steps | {cfg.max_steps} |",
             *[f"| {k} | {v:.6g} |" for k, v in final.items()], ""]
    return "\n".join(lines)


def _model_id(path):
    """A Hub id for the base model: its config's `_name_or_path` when that is one, else the folder name."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            name = json.load(f).get("_name_or_path", "")
    except (OSError, ValueError):
        name = ""
    return name if name.count("/") == 1 and not os.path.isabs(name) else os.path.basename(os.path.abspath(path))


def _final_metrics(path):
    """The last value of every metric in metrics.jsonl (the last step's and the final eval's)."""
    out = {}
    if os.path.exists(path):
        for line in open(path, encoding="utf-8"):
            out.update({k: v for k, v in json.loads(line).items() if isinstance(v, (int, float)) and k != "step"})
    return out


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "") if head.returncode == 0 else "unknown"


def hf_state_chunks(model, dist):
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
