"""
The command-line config every script shares: `TrainConfig` (one field per flag, the same names in
every script; scripts extend it with their own) and `parse_config`, which builds one from
`--field-name value` flags and checks every value before anything runs. Every field is declared
with its --help text, `lr: float = arg(1e-3, "peak learning rate")`; a script that overrides a
field's default declares the help again (its own words, or the shared ones).

Defaults are the built-in task's. A real checkpoint given with `--model` gets the defaults of
TRL's trainers instead for the fields a script lists in REAL_MODEL (`--help` shows both); a flag
given on the command line always wins.
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

import collectives
from data import task


def arg(default, help):
    """A config field declared with its --help text, which parse_config shows:
    `lr: float = arg(1e-3, "peak learning rate, reached after warmup")`."""
    return dataclasses.field(default=default, metadata={"help": help})


def flag(name):
    """The command-line flag of a field: max_steps -> --max-steps."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Options every script shares (same names everywhere). Scripts extend this with their own."""
    model: str = arg("", "HF model directory; empty = the built-in task's model")
    data: str = arg("", "JSONL file; empty = the built-in task")
    out: str = arg("runs/out", "output directory: metrics.jsonl, checkpoints/, final HF model")
    max_steps: int = arg(200, "optimizer steps")
    batch_size: int = arg(16, "sequences per micro-batch per process")
    grad_accum: int = arg(1, "micro-batches per optimizer step")
    lr: float = arg(1e-3, "peak learning rate, reached after warmup")
    min_lr_ratio: float = arg(0.1, "cosine decays to lr * min_lr_ratio")
    warmup_steps: int = arg(10, "linear warmup from 0 to lr over N steps")
    weight_decay: float = arg(0.0, "AdamW's decoupled weight decay (matrices only)")
    grad_clip: float = arg(1.0, "max global grad norm; 0 = off")
    max_length: int = arg(512, "tokens per sequence (longer examples are truncated, see data/)")
    seed: int = arg(0, "model init, data order and sampling")
    dtype: str = arg("auto", "auto = bf16 on GPU, fp32 on CPU")
    grad_ckpt: bool = arg(False, "activation checkpointing per block")
    log_every: int = arg(10, "progress line and metrics.jsonl every N steps")
    eval_every: int = arg(100, "evaluate every N steps; 0 = only at the start and the end")
    save_every: int = arg(0, "sharded checkpoint every N steps; 0 = only on SIGTERM and at --stop-after")
    stop_after: int = arg(0, "checkpoint and exit after this step (time-boxed jobs); 0 = off")
    resume: bool = arg(False, "continue from the latest checkpoint in out/checkpoints")
    overwrite: bool = arg(False, "start afresh in an --out that holds another run (deletes its checkpoints and model)")
    chunk_size: int = arg(256, "positions per chunk for log-probs over the vocabulary ([256, V] fp32 buffer)")
    chat_format: str = arg("", "empty = the tokenizer's chat template, else a built-in format")
    system_prompt: str = arg("", "inserted when a conversation has none")
    chat_template_kwargs: str = arg("", "JSON object of chat template variables, e.g. '{\"enable_thinking\": false}' "
                                        "(data/chat.py)")
    lora_r: int = arg(0, "LoRA rank; 0 = full fine-tuning (lora.py)")
    lora_alpha: float = arg(16.0, "scaling = alpha / r: 1 at r 16, 2 at r 8 (PEFT's default 8 is 0.5 at r 16; recipes "
                                  "use r..2r)")
    lora_dropout: float = arg(0.0, "on the adapters' input (PEFT's default; >0 makes runs depend on the RNG)")
    lora_targets: str = arg("all-linear", "PEFT target_modules: leaf names (q_proj,v_proj; GPT-2: c_attn,c_proj,c_fc)")
    use_rslora: bool = arg(False, "scaling = alpha / sqrt(r) (rsLoRA)")
    data_cache: str = arg("", "tokenized-data cache directory; empty = <data file>.cache beside each file "
                              "(data/cache.py)")
    quantize: str = arg("", "nf4: frozen base projections in 4-bit NormalFloat (QLoRA with --lora-r; nf4.py)")
    double_quant: bool = arg(False, "with nf4: the per-block absmax constants in 8 bits too (QLoRA's double "
                                    "quantization)")
    cpu_offload: bool = arg(False, "FSDP2 CPUOffloadPolicy: parameters, gradients, optimizer state in host memory")
    hsdp: int = arg(0, "HSDP: FSDP2 on a 2-D mesh of N replica groups x world/N shards (one per node); 0 = FSDP")
    report_to: str = arg("", "comma list: metrics.jsonl's records there too, from rank 0")
    dist_timeout: float = arg(60.0, "minutes a rank waits in a collective for its peers before the run fails (a dead "
                                    "peer; rank 0 alone building the data cache or exporting a 70B model must fit)")

    # Allowed values of numeric flags (an unlisted one must be >= 0); scripts extend it, as CHOICES.
    RANGES = {"dist_timeout": "(0, inf)", "max_steps": "[1, inf)", "batch_size": "[1, inf)", "grad_accum": "[1, inf)", "lr": "(0, inf)",
              "min_lr_ratio": "[0, 1]", "max_length": "[1, inf)", "log_every": "[1, inf)", "chunk_size": "[1, inf)",
              "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)"}
    # The fields with a fixed set of values; a field in MULTI takes a comma list of them.
    CHOICES = {"dtype": ("auto", "bf16", "fp32"), "chat_format": ("", "chatml", "llama3", "plain"),
               "quantize": ("", "nf4"), "report_to": ("wandb", "tensorboard")}
    MULTI = ("report_to",)
    # Fields a script cannot honour, with the reason: the flag is refused, never ignored.
    NOT_USED = {}
    # A real checkpoint's defaults (TRL's SFTConfig here; each script lists its trainer's): the
    # fields above suit the built-in 1M-parameter task, whose lr would wreck a pretrained model.
    REAL_MODEL = {"lr": 2e-5, "batch_size": 8, "max_length": 1024}


def parse_config(cls, argv=None):
    """Build a dataclass from `--field-name value` flags, checked against cls.RANGES and CHOICES;
    `--help` lists every field with its default, allowed values and the help given to arg()."""
    p = argparse.ArgumentParser(description=(cls.__doc__ or "").strip(), allow_abbrev=False, epilog=(
        "Defaults suit the built-in task. A pretrained --model (any but the task's) takes TRL's defaults for "
        "the flags that name one ('a real --model'); a flag given always wins.") if cls.REAL_MODEL else None,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message} (--help lists every flag)\n")  # not the usage block
    for f in dataclasses.fields(cls):
        opt, about = flag(f.name), f.metadata["help"].replace("%", "%%")  # declared with arg()
        choices = cls.CHOICES.get(f.name)
        if f.name in cls.NOT_USED:
            p.add_argument(opt, help=argparse.SUPPRESS, type=_refuse(f"not used by this script: {cls.NOT_USED[f.name]}"))
        elif f.type in (bool, "bool"):
            p.add_argument(opt, type=_parse_bool, nargs="?", const=True, default=f.default, metavar="BOOL",
                           help=f"{about} (default: %(default)s)")
        elif choices:
            shown = " | ".join(repr(c) if not c else c for c in choices)
            what = f"comma list of {shown}" if f.name in cls.MULTI else f"one of {shown}"
            p.add_argument(opt, default=f.default, help=f"{about} ({what}; default: %(default)r)")
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            rng = f"in {_range(cls, f.name)}; " if typ in (int, float) else ""
            real = f"; a real --model: {cls.REAL_MODEL[f.name]!r}, TRL's" if f.name in cls.REAL_MODEL else ""
            p.add_argument(opt, type=typ, default=f.default, help=f"{about} ({rng}default: %(default)r{real})")
    argv = sys.argv[1:] if argv is None else argv
    cfg = cls(**vars(p.parse_args(argv)))
    given = {a.split("=")[0][2:].replace("-", "_") for a in argv if a.startswith("--")}
    pretrained = cfg.model and not _task_model(cfg.model)
    real = {k: v for k, v in cls.REAL_MODEL.items() if k not in given} if pretrained else {}
    cfg = dataclasses.replace(cfg, **real)
    if cfg.model:
        _check_positions(cfg, given, p.error)
    if real and collectives.is_main():
        shown = " ".join(f"{flag(k)} {v}" for k, v in real.items())
        print(f"{cfg.model} is a pretrained checkpoint: TRL's defaults {shown} (flags given win)")
    for f in dataclasses.fields(cls):
        v, opt = getattr(cfg, f.name), flag(f.name)
        if type(v) in (int, float) and not _in_range(v, _range(cls, f.name)):
            p.error(f"{opt} {v}: expected a value in {_range(cls, f.name)}")
        if f.name in cls.CHOICES:
            given = [x for x in v.split(",") if x] if f.name in cls.MULTI else [v]
            if bad := [x for x in given if x not in cls.CHOICES[f.name]]:
                p.error(f"{opt} {bad[0]!r}: expected {'a comma list of ' if f.name in cls.MULTI else 'one of '}"
                        f"{', '.join(repr(c) for c in cls.CHOICES[f.name])}")
    return cfg


def _task_model(model_dir):
    """True for a model of the built-in task (its 100-character vocabulary): the defaults suit it."""
    return _model_config(model_dir).get("vocab_size") == task.MODEL_CONFIG["vocab_size"]


def _model_config(model_dir):
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}  # a missing or broken config is reported where the model is loaded, with its path


def _check_positions(cfg, given, error):
    """Sequences must fit the model's positions: a flag asking for more is an error; a default
    that asks for more is lowered to fit (the built-in task's 256-position model)."""
    conf = _model_config(cfg.model)
    positions = conf.get("max_position_embeddings") or conf.get("n_positions")
    if not positions:
        return
    fields = ("max_length",) if "max_length" not in cfg.NOT_USED else ("max_prompt_length", "max_new_tokens")
    if not all(hasattr(cfg, f) for f in fields) or sum(getattr(cfg, f) for f in fields) <= positions:
        return
    asked = " + ".join(f"{flag(f)} {getattr(cfg, f)}" for f in fields)
    if given.intersection(fields):
        error(f"{asked}: longer than the {positions} positions of {cfg.model} "
              "(max_position_embeddings in its config.json)")
    if len(fields) == 1:
        cfg.max_length = positions
    else:
        cfg.max_prompt_length = max(1, positions - cfg.max_new_tokens)


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


def _parse_bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")

