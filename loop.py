"""
The training loop every script shares, so that a script's loop body holds only its algorithm:

    loop = Loop(cfg, dist, {"model": (model, opt)}, evaluate)   # resumes with --resume
    for step in loop:                  # from 0, or from the checkpoint's step
        metrics = accumulate(model, micro_batches, dist, step, count, loss)
        metrics["grad_norm"] = common.optimizer_step(model, opt, step, cfg)
        loop.record(metrics, tokens=n)
    if loop.finished:                  # else preempted or --stop-after: checkpointed, resume later
        checkpoint.save_final(...)

The loop decides when things happen: evaluate(), which returns a dict of metrics, runs before
the first step of a fresh run, every --eval-every steps and after the last; the recorded metrics
are logged every --log-every steps (and after the first); a checkpoint is written every
--save-every steps, and on SIGTERM or at --stop-after, after which the loop ends.

`accumulate` is nanotrl's one rule for normalising a loss across micro-batches and ranks.
"""
import atexit
import dataclasses
import json
import os
import time

import torch
import torch.distributed as torchdist

import checkpoint
import common


class Loop:
    def __init__(self, cfg, dist, parts: dict, evaluate=None):
        """parts: {"policy": (model, optimizer), ...}, what a checkpoint holds and a resume restores."""
        self.cfg, self.dist, self.parts, self.evaluate = cfg, dist, parts, evaluate
        self.start = checkpoint.resume(cfg, dist, parts)
        self.log = Logger(cfg, dist, self.start)
        self.finished = False
        self.metrics, self.tokens = {}, 0

    def record(self, metrics: dict, tokens=0):
        """This step's metrics (global values: the same on every rank) and the tokens this rank
        processed in it, for tokens/s."""
        self.metrics = metrics
        self.tokens += tokens

    def _evaluate(self, step):
        if self.evaluate is not None:
            self.log.log(step, self.evaluate())

    def __iter__(self):
        cfg, dist = self.cfg, self.dist
        if self.start == 0:
            self._evaluate(0)
        preempt = checkpoint.Preemption()  # from here on SIGTERM means: checkpoint after this step, then exit
        for step in range(self.start, cfg.max_steps):
            self.metrics = {}
            yield step
            done = step + 1
            if done % cfg.log_every == 0 or step == self.start:
                self.log.log(done, self.metrics, tokens=common.all_sum(self.tokens, dist))
                self.tokens = 0
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
                self._evaluate(done)
            stop = preempt.requested(dist) or done == cfg.stop_after
            if (cfg.save_every and done % cfg.save_every == 0) or stop:
                checkpoint.save_checkpoint(cfg.out, done, dist, self.parts, {"config": dataclasses.asdict(cfg)})
            if stop:
                common.print0(f"stopping after step {done} with a checkpoint; continue with --resume")
                return
        self._evaluate(cfg.max_steps)
        self.finished = True


def sum_over_ranks(values: dict, dist) -> dict:
    """{name: number} summed over ranks, in one collective (every rank passes the same names)."""
    if dist.world == 1 or not values:
        return {k: float(v) for k, v in values.items()}
    names = sorted(values)
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=dist.device)
    torchdist.all_reduce(t)
    return dict(zip(names, t.tolist()))


def accumulate(model, micro, dist, step, count, loss, what="loss"):
    """Forward and backward over one optimizer step's micro-batches, under the one normalisation
    rule: the step's loss is the sum over all its units (tokens, pairs, sequences) divided by
    their number over all micro-batches and all ranks (torchtitan's rule), so every unit weighs the
    same however the step is split into micro-batches and processes.

      count(mb) -> {unit: how many the micro-batch holds}, e.g. {"tokens": 812}
      loss(mb, totals) -> (loss, metrics): the micro-batch's sums divided by `totals`, those
                          counts summed over the step's micro-batches and ranks (at least 1)

    Summed over micro-batches (here) and ranks (the gradient reduction) that is the step's mean.
    FSDP averages gradients over ranks, so each loss is multiplied by the world size to make the
    reduction a sum; gradients are reduced once, after the last micro-batch. Returns {"loss",
    **metrics}, each summed over micro-batches and ranks, having stopped on a non-finite loss."""
    counts = {}
    for mb in micro:
        for k, v in count(mb).items():
            counts[k] = counts.get(k, 0.0) + float(v)
    totals = {k: max(v, 1.0) for k, v in sum_over_ranks(counts, dist).items()}
    sums = {}
    for i, mb in enumerate(micro):
        if dist.world > 1:
            model.set_requires_gradient_sync(i == len(micro) - 1)
        value, metrics = loss(mb, totals)
        (value * dist.world).backward()
        for k, v in {"loss": value.detach(), **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    sums = sum_over_ranks(sums, dist)
    common.check_finite(sums["loss"], step, what)
    return sums


def micro_batches(rows, n):
    """Split a step's rows (a list or a 1-D index tensor) into n micro-batches of equal size."""
    size = len(rows) // n
    return [rows[i * size:(i + 1) * size] for i in range(n)]


# ----------------------------------------------------------------------------- progress and metrics

class Logger:
    """Progress lines (step, metrics, tokens/s, ETA) and metrics.jsonl (one JSON object per line with
    a "step" field). Does nothing off rank 0; a record with no metrics is not written."""

    def __init__(self, cfg, dist, start_step=0):
        self.main, self.max_steps, self.start_step = dist.main, cfg.max_steps, start_step
        self.start = self.tick = time.time()
        self.file = None
        if self.main:  # the first bytes of the run written to --out: every input is validated by now
            self.path = os.path.join(cfg.out, "metrics.jsonl")
            with checkpoint.writing(cfg.out):
                checkpoint.start_out(cfg, start_step)
            self.file = open(self.path, "a", encoding="utf-8")
        self.writers = _report_writers(cfg, start_step) if self.main else []

    def log(self, step, metrics: dict, tokens=0):
        """`tokens`: tokens processed by all ranks since the last call that passed tokens."""
        if not self.main or not metrics:
            return
        now = time.time()
        record = {"step": step, **{k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}}
        if tokens:
            record["tokens_per_s"] = round(tokens / max(now - self.tick, 1e-9), 1)
            self.tick = now
        with checkpoint.writing(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        for write in self.writers:
            write(step, {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
        shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "step")
        done = step - self.start_step
        eta = int((now - self.start) / done * (self.max_steps - step)) if done > 0 else 0
        print(f"step {step}/{self.max_steps}  {shown}  eta {eta // 60}m{eta % 60:02d}s", flush=True)


def _report_writers(cfg, start_step):
    """--report-to: one write(step, scalars) function per service. The libraries are imported only
    here, when asked for; they are not dependencies of nanotrl."""
    writers = []
    for name in filter(None, cfg.report_to.split(",")):  # names checked by parse_config
        if name == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise common.UsageError(f"--report-to tensorboard needs the tensorboard package (pip install tensorboard): {e}") from e
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
                raise common.UsageError(f"--report-to wandb needs the wandb package (pip install wandb): {e}") from e
            # project, entity and WANDB_MODE=offline come from wandb's own environment variables
            run = wandb.init(name=os.path.basename(os.path.normpath(cfg.out)), dir=cfg.out, config=dataclasses.asdict(cfg))
            writers.append(lambda step, scalars, run=run: run.log(scalars, step=step))
            atexit.register(run.finish)
    return writers
