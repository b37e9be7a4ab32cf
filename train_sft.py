"""
Supervised fine-tuning: next-token NLL on the completion (assistant) tokens.

    python train_sft.py                                    # built-in task, tiny model from scratch, CPU
    torchrun --standalone --nproc_per_node 2 train_sft.py  # the same on 2 processes (FSDP2, gloo)
    python train_sft.py --lora-r 16                        # LoRA on runs/sft_base (see quickstart.sh)
    torchrun --nproc_per_node 8 train_sft.py --model Qwen2.5-0.5B-Instruct --data sft.jsonl --lr 1e-5

The loss of an optimizer step is the mean over ALL its completion tokens, across micro-batches
and ranks (loop.accumulate, losses.sft_loss): every token weighs the same however the batch is split.
"""
import os
from dataclasses import dataclass

import torch

import checkpoint
import collectives
import common
import config
import engine
import forward
import losses
import hf_io
import model as M
from data import batching, formats, task
from loop import Loop, accumulate


@dataclass
class SFTConfig(config.TrainConfig):
    """Supervised fine-tuning (SFT)."""
    model: str = config.arg("", "HF model directory; built-in task: a tiny model from scratch (with --lora-r: "
                                "runs/sft_base)")
    out: str = config.arg("runs/sft", "output directory: metrics.jsonl, checkpoints/, final HF model")
    max_steps: int = config.arg(900, "optimizer steps")
    batch_size: int = config.arg(32, "per process: 64 per step on 2 processes")
    lr: float = config.arg(1e-3, "peak learning rate, reached after warmup")
    warmup_steps: int = config.arg(30, "linear warmup from 0 to lr over N steps")
    eval_data: str = config.arg("", "held-out JSONL for eval/loss; built-in task: its test split")
    eval_every: int = config.arg(200, "evaluate every N steps; 0 = only at the start and the end")
    eval_samples: int = config.arg(256, "held-out prompts for eval/accuracy (built-in task)")
    max_new_tokens: int = config.arg(16, "built-in task: length cap of generated answers (eval/accuracy)")
    packing: bool = config.arg(False, "pack short examples into rows of max_length tokens")
    train_on_prompt: bool = config.arg(False, "learn the prompt tokens too")
    RANGES = {**config.TrainConfig.RANGES, "max_new_tokens": "[1, inf)"}


def sft_batches(examples, cfg, dist, step, pad_id):
    """This rank's micro-batches for optimizer step `step` (a pure function of the step: resumable)."""
    idx = batching.batch_indices(len(examples), cfg.batch_size * cfg.grad_accum, cfg.seed, step, dist.rank, dist.world)
    for i in range(cfg.grad_accum):
        chunk = [examples[j] for j in idx[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
        yield batching.pack_sft(chunk, cfg.max_length, pad_id) if cfg.packing else batching.collate_sft(chunk, pad_id)


def main(cfg: SFTConfig):
    # ---- setup
    dist = common.setup(cfg)
    base = cfg.model
    if not base and cfg.lora_r:  # LoRA adapts a pretrained model: on the built-in task, a short full-FT run's
        base = task.stage(task.SFT_BASE, "base model for --lora-r (--model)")

    # ---- data
    tdir = "" if cfg.data and base else task.ensure_task(task.TASK_DIR)  # --model without --data: the task's data
    model_dir = base or tdir
    tok = common.load_tokenizer(model_dir, cfg)
    train_path = cfg.data or os.path.join(tdir, "train.jsonl")
    eval_path = cfg.eval_data or ("" if cfg.data else os.path.join(tdir, "test.jsonl"))
    train = common.load_data(train_path, "sft", tok, cfg, dist, max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt)
    eval_set = common.load_data(eval_path, "sft", tok, cfg, dist, max_length=cfg.max_length, train_on_prompt=False) \
        if eval_path else []
    # the built-in task also measures exact-match accuracy of greedy answers to held-out prompts
    questions = [] if cfg.data else formats.load_prompts(eval_path)[:cfg.eval_samples]
    collectives.print0(f"{len(train)} training examples from {train_path}; {len(eval_set)} held out")

    # ---- model
    if base:  # streamed: quantized (--quantize), adapted (--lora-r) and sharded block by block
        model = common.load_model(base, cfg, dist, adapt=True)
    else:  # the built-in task trains its tiny model from scratch
        with torch.device(dist.device):  # built where it trains (initialised from a CPU generator: the same weights)
            model = M.Transformer(hf_io.read_config(model_dir))
        model.init_weights(seed=cfg.seed)
        model.grad_checkpointing = cfg.grad_ckpt
        model = common.shard(model, dist)
    collectives.print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, world {dist.world}")
    opt = common.make_optimizer(model, cfg)

    def evaluate():
        metrics = {}
        if eval_set:
            nll = ntok = 0.0
            model.eval()
            # unsharded: ranks may get different numbers of eval batches, so no per-layer collectives
            with torch.no_grad(), common.unsharded(model):
                for i in range(dist.rank * cfg.batch_size, len(eval_set), cfg.batch_size * dist.world):
                    batch = batching.collate_sft(eval_set[i:i + cfg.batch_size], tok.pad_id)
                    logps, mask = forward.token_logps(model, batch, dist, cfg.chunk_size)
                    nll, ntok = nll - (logps * mask).sum().item(), ntok + mask.sum().item()
            model.train()
            metrics["eval/loss"] = collectives.all_sum(nll, dist) / max(collectives.all_sum(ntok, dist), 1)
        if questions:
            metrics["eval/accuracy"] = engine.eval_accuracy(engine.Engine(model, tok, dist), questions, task.is_correct,
                                                             cfg.max_new_tokens)
        return metrics

    def loss(batch, totals):
        logps, mask = forward.token_logps(model, batch, dist, cfg.chunk_size, cfg.packing)
        return losses.sft_loss(logps, mask, totals["tokens"]), {}

    # ---- loop
    loop = Loop(cfg, dist, {"model": (model, opt)}, evaluate)
    model.train()
    for step in loop:
        micro = list(sft_batches(train, cfg, dist, step, tok.pad_id))
        metrics = accumulate(model, micro, dist, step, lambda b: {"tokens": b["loss_mask"].sum().item()}, loss)
        metrics["lr"] = common.lr_at(step, cfg)
        metrics["grad_norm"] = common.optimizer_step(model, opt, step, cfg)
        loop.record(metrics, tokens=sum(b["attention_mask"].gt(0).sum().item() for b in micro))

    # ---- save
    if loop.finished:
        checkpoint.save_final(model, cfg, dist, model_dir, base)


if __name__ == "__main__":
    common.run(main, SFTConfig)
