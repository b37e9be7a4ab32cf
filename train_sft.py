"""
Supervised fine-tuning: next-token NLL on the completion (assistant) tokens.

    python train_sft.py                                    # built-in task, tiny model from scratch, CPU
    torchrun --standalone --nproc_per_node 2 train_sft.py  # the same on 2 processes (FSDP2, gloo)
    python train_sft.py --lora-r 16                        # LoRA adapters on a base from a short full-FT run (runs/sft_base)
    torchrun --nproc_per_node 8 train_sft.py --model Qwen2.5-0.5B-Instruct --data sft.jsonl --lr 1e-5

The loss of an optimizer step is the mean over ALL its completion tokens, across micro-batches
and ranks (losses.sft_loss): every token weighs the same however the batch is split.
"""
import os
from dataclasses import dataclass

import torch

import common
import losses
import model as M
from data import batching, chat, formats, task


@dataclass
class SFTConfig(common.TrainConfig):
    """Supervised fine-tuning (SFT)."""
    out: str = "runs/sft"
    max_steps: int = 900
    batch_size: int = 32       # per process: 64 per step on 2 processes
    lr: float = 1e-3
    warmup_steps: int = 30
    eval_data: str = ""        # held-out JSONL for eval/loss; built-in task: its test split
    eval_every: int = 200
    eval_samples: int = 256    # held-out prompts for eval/accuracy (built-in task)
    max_new_tokens: int = 16   # built-in task: length cap of generated answers (eval/accuracy)
    packing: bool = False      # pack short examples into rows of max_length tokens
    train_on_prompt: bool = False  # learn the prompt tokens too
    lora_base_steps: int = 300  # built-in task with --lora-r: full-FT steps of the base it adapts (runs/sft_base)
    RANGES = {**common.TrainConfig.RANGES, "max_new_tokens": "[1, inf)"}


BASE_DIR = "runs/sft_base"


def sft_batches(examples, cfg, dist, step, pad_id):
    """This rank's micro-batches for optimizer step `step` (a pure function of the step: resumable)."""
    idx = batching.batch_indices(len(examples), cfg.batch_size * cfg.grad_accum, cfg.seed, step, dist.rank, dist.world)
    for i in range(cfg.grad_accum):
        chunk = [examples[j] for j in idx[i * cfg.batch_size:(i + 1) * cfg.batch_size]]
        if cfg.packing:
            yield batching.pack_sft(chunk, cfg.max_length, pad_id)
        else:
            yield batching.collate_sft(chunk, pad_id)


def main(cfg: SFTConfig):
    # ---- setup
    dist = common.setup(cfg)

    # ---- data
    tdir = "" if cfg.data and cfg.model else task.ensure_task(task.TASK_DIR)  # --model without --data: the task's data
    model_dir = cfg.model or tdir
    tok = chat.load_tokenizer(model_dir, cfg.chat_format or None, cfg.system_prompt or None, cfg.chat_template_kwargs)
    train_path = cfg.data or os.path.join(tdir, "train.jsonl")
    eval_path = cfg.eval_data or ("" if cfg.data else os.path.join(tdir, "test.jsonl"))
    train = common.load_data(train_path, "sft", tok, cfg, dist, max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt)
    eval_set = common.load_data(eval_path, "sft", tok, cfg, dist, max_length=cfg.max_length, train_on_prompt=False) \
        if eval_path else []
    # the built-in task also measures exact-match accuracy of greedy answers to held-out prompts
    questions = [] if cfg.data else formats.load_prompts(eval_path)[:cfg.eval_samples]
    common.print0(f"{len(train)} training examples from {train_path}; {len(eval_set)} held out")

    # ---- model
    base = cfg.model
    if not base and cfg.lora_r:  # LoRA adapts a pretrained model: on the built-in task, a short full-FT run's
        base = common.ensure_sft_model(dist, cfg.seed, cfg.lora_base_steps, out=BASE_DIR)
    if base:  # streamed: quantized (--quantize), adapted (--lora-r) and sharded block by block
        model = common.load_model(base, cfg, dist, adapt=True)
    else:  # the built-in task trains its tiny model from scratch
        model = M.Transformer(M.read_config(model_dir))
        model.init_weights(seed=cfg.seed)
        model.grad_checkpointing = cfg.grad_ckpt
        model = common.shard(model, dist)
    common.print0(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, world {dist.world}")
    opt = common.make_optimizer(model, cfg, dist)
    start = common.resume(cfg, dist, {"model": (model, opt)})
    log = common.Logger(cfg, dist, start)

    def evaluate(step):
        metrics = {}
        if eval_set:
            model.eval()
            nll = ntok = 0.0
            # unsharded: ranks may get different numbers of eval batches, so no per-layer collectives
            with torch.no_grad(), common.unsharded(model):
                for i in range(dist.rank * cfg.batch_size, len(eval_set), cfg.batch_size * dist.world):
                    batch = batching.collate_sft(eval_set[i:i + cfg.batch_size], tok.pad_id)
                    logps, mask = common.token_logps(model, batch, dist, cfg.chunk_size, cfg.packing)
                    nll, ntok = nll - (logps * mask).sum().item(), ntok + mask.sum().item()
            metrics["eval/loss"] = common.all_sum(nll, dist) / max(common.all_sum(ntok, dist), 1)
            model.train()
        if questions:
            metrics["eval/accuracy"] = common.eval_accuracy(model, tok, questions, dist, task.is_correct, cfg.max_new_tokens)
        log.log(step, metrics)

    # ---- loop (from here on, SIGTERM means: checkpoint at the end of this step, then exit)
    preempt = common.Preemption()
    model.train()
    tokens = 0  # processed by this rank since the last log line
    for step in range(start, cfg.max_steps):
        micro = list(sft_batches(train, cfg, dist, step, tok.pad_id))
        # Normalise by the step's global count of loss tokens, not per micro-batch (see losses.sft_loss).
        n_tokens = common.all_sum(sum(b["loss_mask"].sum().item() for b in micro), dist)
        step_loss = 0.0
        for i, b in enumerate(micro):
            if dist.world > 1:  # reduce-scatter gradients only after the last micro-batch
                model.set_requires_gradient_sync(i == len(micro) - 1)
            logps, mask = common.token_logps(model, b, dist, cfg.chunk_size, cfg.packing)
            loss = losses.sft_loss(logps, mask, n_tokens)
            # FSDP averages gradients over ranks; undo it so the step's loss is a sum over ranks.
            (loss * dist.world).backward()
            step_loss += loss.item()
        step_loss = common.all_sum(step_loss, dist)
        common.check_finite(step_loss, step)
        grad_norm = common.optimizer_step(model, opt, step, cfg)
        tokens += sum(b["attention_mask"].gt(0).sum().item() for b in micro)
        if (step + 1) % cfg.log_every == 0 or step == start:
            log.log(step + 1, {"loss": step_loss, "lr": common.lr_at(step, cfg), "grad_norm": grad_norm},
                    tokens=common.all_sum(tokens, dist))
            tokens = 0
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            evaluate(step + 1)
        if common.checkpoint_or_stop(step + 1, cfg, dist, preempt, {"model": (model, opt)}):
            return

    # ---- eval and save
    evaluate(cfg.max_steps)
    common.save_final(model, cfg, dist, model_dir, base)


if __name__ == "__main__":
    main(common.parse_config(SFTConfig))
