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

`accumulate` is nanotrl's one rule for normalising a loss across micro-batches and ranks, and for
averaging a step's metrics. Its `loss(mb, totals)` callback returns (loss, metrics):

    loss     the micro-batch's sum over its units (tokens, pairs, sequences) divided by `totals`,
             the step's counts of those units over all micro-batches and ranks (from `count(mb)`)
    metrics  {name: (mean, weight)}: the micro-batch's own mean of a metric and how many units it
             is a mean over, e.g. {"accuracy": (0.75, 16)} for 16 pairs;
             or {name: number}: the micro-batch's part of a step total, like the loss itself
             (a sum divided by totals, or a count)

and accumulate returns {"loss": the step's loss, name: sum(mean * weight) / sum(weight), or the sum
of the parts, over the step's micro-batches and ranks}: the step's weighted means are computed
once, here, so that a script never scales a mean by its micro-batch's share of the step.
"""
import atexit
import dataclasses
import json
import os
import time

import torch


import checkpoint
import collectives
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
        # from here on SIGTERM or a first Ctrl-C means: checkpoint after the next step, then exit
        # (installed before the first evaluation, so that a notice during it is not lost)
        preempt = checkpoint.Preemption()
        if self.start == 0:
            self._evaluate(0)
        for step in range(self.start, cfg.max_steps):
            self.metrics = {}
            yield step
            done = step + 1
            if done % cfg.log_every == 0 or step == self.start:
                self.log.log(done, self.metrics, tokens=collectives.all_sum(self.tokens, dist))
                self.tokens = 0
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
                self._evaluate(done)
            stop = preempt.requested(dist) or done == cfg.stop_after
            if (cfg.save_every and done % cfg.save_every == 0) or stop:
                checkpoint.save_checkpoint(cfg.out, done, dist, self.parts, {"config": dataclasses.asdict(cfg)})
            if stop:
                collectives.print0(f"stopping after step {done} with a checkpoint; continue with --resume")
                return
        self._evaluate(cfg.max_steps)
        self.finished = True


def accumulate(model, micro, dist, step, count, loss, what="loss"):
    """Forward and backward over one optimizer step's micro-batches, under the one normalisation
    rule: the step's loss is the sum over all its units (tokens, pairs, sequences) divided by
    their number over all micro-batches and all ranks (torchtitan's rule), so every unit weighs the
    same however the step is split into micro-batches and processes.

      count(mb) -> {unit: how many the micro-batch holds}, e.g. {"tokens": 812}
      loss(mb, totals) -> (loss, metrics)
        loss     the micro-batch's sum divided by `totals`, those counts summed over the step's
                 micro-batches and ranks (at least 1)
        metrics  {name: (mean, weight)}: the micro-batch's own mean of a metric and how many
                 units it is a mean over, e.g. {"accuracy": (0.75, 16)} for 16 pairs; or
                 {name: number}: its part of a step total, like the loss (summed)

    Summed over micro-batches (here) and ranks (the gradient reduction) the losses are the step's
    mean. FSDP averages gradients over ranks, so each loss is multiplied by the world size to make
    the reduction a sum. Gradients are reduce-scattered after every micro-batch, so that a rank
    never holds more than its shard of them (skipping it would keep the whole model's gradients,
    unsharded and in fp32, on every rank until the last micro-batch); with HSDP only the all-reduce
    across replica groups waits for the last one. Metric values may be 0-d tensors: they are read
    once, after the last micro-batch, so no micro-batch waits for the device.

    Returns {"loss": the step's loss, name: the step's value of each metric}, the same on every
    rank, having stopped on a non-finite loss. A mean's step value is sum(mean * weight) /
    sum(weight) over micro-batches and ranks, so no caller scales its means by its share of the
    step; a weight of 0 adds nothing (the mean of no units may be NaN), and a mean with no weight
    at all in the step is 0. A part's step value is the sum of the parts. Every micro-batch on
    every rank must return the same names, each in the same form."""
    counts = {}
    for mb in micro:
        for k, v in count(mb).items():
            counts[k] = counts.get(k, 0.0) + _f64(v)
    totals = {k: max(v, 1.0) for k, v in collectives.sum_over_ranks(counts, dist).items()}
    loss_sum, sums, weights = 0.0, {}, {}
    for i, mb in enumerate(micro):
        if dist.mesh is not None:  # HSDP: reduce-scatter within the replica group always, all-reduce once
            model.set_requires_all_reduce(i == len(micro) - 1)
        value, metrics = loss(mb, totals)
        (value * dist.world).backward()
        loss_sum = loss_sum + _f64(value)
        for k, v in metrics.items():
            if isinstance(v, tuple):  # (mean, weight); a weight of 0 adds nothing (its mean may be NaN)
                mean, weight = v
                sums[k] = sums.get(k, 0.0) + (_f64(mean) * weight if weight else 0.0)
                weights[k] = weights.get(k, 0.0) + float(weight)
            else:  # a part of a step total
                sums[k] = sums.get(k, 0.0) + _f64(v)
    # the loss, every metric's sum and every mean's weight in one collective (one read of the device)
    total = collectives.sum_over_ranks({"loss": loss_sum, **{"sum:" + k: v for k, v in sums.items()},
                                        **{"weight:" + k: v for k, v in weights.items()}}, dist)
    common.check_finite(total["loss"], step, what)
    means = {k: total["sum:" + k] / total["weight:" + k] if total["weight:" + k] else 0.0 for k in weights}
    return {"loss": total["loss"], **{k: means.get(k, total["sum:" + k]) for k in sums}}



def _f64(v):
    """A metric as fp64 (sums over micro-batches keep a float's precision), a tensor left on its device."""
    return v.detach().double() if torch.is_tensor(v) else float(v)


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
