"""
On-policy distillation, GKD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"): the
student matches the teacher's next-token distribution at every completion position, on its own
samples (a fraction --lmbda of the steps) or on the data's completions (the rest).

    torchrun --standalone --nproc_per_node 2 train_distill.py   # built-in task: GRPO model -> SFT model
    torchrun --standalone --nproc_per_node 2 train_distill.py --student-layers 2 --out runs/distill-small
    torchrun --nproc_per_node 8 train_distill.py --teacher Qwen2.5-7B-Instruct --model Qwen2.5-0.5B-Instruct \\
        --data sft.jsonl --lr 1e-5 --max-new-tokens 256

Per step:

    prompts --(lmbda: student samples, KV cache)--> completions     (else: the data's completions)
      |
      +--> student and teacher forwards over [prompt; completion] --> last hidden states
                                   |
            losses.generalized_jsd_from_hidden, a chunk of positions at a time (both models'
            [chunk, V] logits, recomputed in the backward): --beta 0 = KL(teacher || student)
            (supervised KD), 1 = KL(student || teacher), in between the generalized JSD;
            token mean over all ranks' completion tokens

Teacher and student may differ in size but must share the tokenizer (the vocabulary size is
checked). --lmbda 0 --beta 0 is plain word-level knowledge distillation on the data; --lmbda 1
--beta 1 is on-policy reverse KL (Thinking Machines' "on-policy distillation", MiniLLM).
"""
import os
import engine
import random
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

import checkpoint
import collectives
import common
import config
import forward
import losses
import hf_io
from data import batching, formats, task
from loop import Loop, accumulate, micro_batches



@dataclass
class DistillConfig(config.TrainConfig):
    """On-policy distillation (GKD)."""
    model: str = config.arg("", "student init (HF dir); default: the built-in task's SFT model (runs/sft)")
    teacher: str = config.arg("", "teacher (HF dir, same tokenizer); default: the built-in task's GRPO model "
                                  "(runs/ppo)")
    student_layers: int = config.arg(0, "keep only the student's first N layers (a smaller student); 0 = all")
    out: str = config.arg("runs/distill", "output directory: metrics.jsonl, checkpoints/, final HF model")
    lmbda: float = config.arg(0.5, "fraction of steps whose completions the student samples itself (GKD's lambda)")
    beta: float = config.arg(0.5, "generalized JSD: 0 = KL(teacher||student), 1 = KL(student||teacher)")
    temperature: float = config.arg(1.0, "of the student's samples and of both distributions in the loss")
    max_steps: int = config.arg(200, "optimizer steps")
    batch_size: int = config.arg(32, "prompts per micro-batch per process")
    lr: float = config.arg(5e-4, "peak learning rate, reached after warmup")
    warmup_steps: int = config.arg(10, "linear warmup from 0 to lr over N steps")
    eval_every: int = config.arg(50, "evaluate every N steps; 0 = only at the start and the end")
    eval_samples: int = config.arg(256, "built-in task: held-out prompts for eval/accuracy")
    max_new_tokens: int = config.arg(16, "length cap of the student's sampled completions (and of eval answers)")
    max_prompt_length: int = config.arg(128, "prompt tokens kept (from the end)")
    RANGES = {**config.TrainConfig.RANGES, "lmbda": "[0, 1]", "beta": "[0, 1]", "temperature": "(0, inf)",
              "max_new_tokens": "[1, inf)", "max_prompt_length": "[1, inf)"}
    REAL_MODEL = {"lr": 2e-5, "batch_size": 8, "max_new_tokens": 128, "max_prompt_length": 512,  # TRL's GKDConfig
                  "temperature": 0.9}


def student_rows(student, prompts, tok, dist, cfg, step):
    """SFT rows ({"input_ids", "loss_mask"}) of the student's own completions to `prompts`,
    sampled at --temperature; a function of (seed, step, rank), so the same on resume."""
    g = torch.Generator(dist.device).manual_seed((cfg.seed * 100_003 + step) * 1009 + dist.rank)
    with common.unsharded(student):
        out = engine.Engine(student, tok, dist).generate(prompts, engine.Sampling(cfg.max_new_tokens, cfg.temperature), g)
    rows = []
    for p, row, m in zip(prompts, out.seqs[:, out.prompt_len:].tolist(), out.mask.tolist()):
        comp = [t for t, k in zip(row, m) if k]
        rows.append({"input_ids": list(p) + comp, "loss_mask": [0] * len(p) + [1] * len(comp)})
    return rows


def distill_loss(student, teacher, batch, dist, cfg):
    """Per-position generalized JSD [n] at the batch's n loss positions (those whose labels are
    completion tokens). The teacher's last hidden states at those positions come first, without
    gradient; then the student's forward computes the divergence inside its head, where FSDP has
    the student's head gathered. The teacher's head weight is all-gathered once (one [V, D]
    matrix, not the model)."""
    # the loss positions' flat indices, found on the host before the transfer (as forward.token_logps)
    at = (batch["loss_mask"] > 0).flatten().nonzero().squeeze(1)
    b = forward.to_device({"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "at": at},
                          dist.device)
    with torch.no_grad(), common.autocast(dist):
        t_hidden = teacher(b["input_ids"], None, b["position_ids"], head_fn=lambda h, w: h.flatten(0, 1)[b["at"]])
    t_weight = teacher.lm_head.weight
    t_weight = t_weight.full_tensor() if isinstance(t_weight, DTensor) else t_weight

    def head(h, w):
        return losses.generalized_jsd_from_hidden(h.flatten(0, 1)[b["at"]], w, t_hidden, t_weight, cfg.beta,
                                                  cfg.temperature, cfg.chunk_size)

    with common.autocast(dist):  # right-padded rows: causal attention needs no mask (see forward.token_logps)
        return student(b["input_ids"], None, b["position_ids"], head_fn=head)


def main(cfg: DistillConfig):
    # ---- setup
    dist = common.setup(cfg)
    model_dir = cfg.model or task.stage(task.SFT_MODEL, "student to start from (--model)")
    teacher_dir = cfg.teacher or task.stage(task.GRPO_MODEL, "teacher (--teacher)")

    # ---- data: prompts with completions (the data's, for the off-policy steps)
    tok = common.load_tokenizer(model_dir, cfg)
    held_out = []
    if cfg.data:
        path = cfg.data
    else:
        tdir = task.ensure_task(task.TASK_DIR)
        path = os.path.join(tdir, "train.jsonl")
        held_out = formats.load_prompts(os.path.join(tdir, "test.jsonl"))[:cfg.eval_samples]
    data_rows = common.load_data(path, "sft", tok, cfg, dist, max_length=cfg.max_length, train_on_prompt=False)
    prompts = common.load_data(path, "prompts", tok, cfg, dist, max_prompt_length=cfg.max_prompt_length, required=())
    collectives.print0(f"{len(prompts)} prompts with completions from {path}")

    # ---- models: the student trains (full, LoRA or QLoRA), the teacher is frozen
    if cfg.student_layers and not 0 < cfg.student_layers <= hf_io.read_config(model_dir).num_layers:
        raise common.UsageError(f"--student-layers {cfg.student_layers}: {model_dir} has "
                                f"{hf_io.read_config(model_dir).num_layers} layers")
    student = common.load_model(model_dir, cfg, dist, adapt=True, keep_layers=cfg.student_layers)
    teacher = common.load_model(teacher_dir, cfg, dist, train=False).eval()
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise common.UsageError(f"teacher {teacher_dir} has a vocabulary of {teacher.cfg.vocab_size} tokens, student "
                                f"{model_dir} of {student.cfg.vocab_size}: they must share the tokenizer")
    collectives.print0(f"student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters ({student.cfg.num_layers} layers), "
                  f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M")
    opt = common.make_optimizer(student, cfg)

    def evaluate():
        if not held_out:
            return {}
        return {"eval/accuracy": engine.eval_accuracy(engine.Engine(student, tok, dist), held_out, task.is_correct, cfg.max_new_tokens)}

    def loss(batch, totals):
        return distill_loss(student, teacher, batch, dist, cfg).sum() / totals["tokens"], {}

    # ---- loop
    loop = Loop(cfg, dist, {"model": (student, opt)}, evaluate)
    student.train()
    for step in loop:
        # the same choice on every rank, and on resume
        on_policy = random.Random(cfg.seed * 1_000_003 + step).random() < cfg.lmbda
        idx = batching.batch_indices(len(prompts), cfg.batch_size * cfg.grad_accum, cfg.seed, step, dist.rank, dist.world)
        micro = []
        for i, mb in enumerate(micro_batches(idx, cfg.grad_accum)):
            rows = student_rows(student, [prompts[j]["prompt_ids"] for j in mb], tok, dist, cfg, step * cfg.grad_accum + i) \
                if on_policy else [data_rows[j] for j in mb]
            micro.append(batching.collate_sft(rows, tok.pad_id))
        metrics = accumulate(student, micro, dist, step, lambda b: {"tokens": b["loss_mask"].sum().item()}, loss)
        metrics.update(on_policy=float(on_policy), lr=common.lr_at(step, cfg))
        metrics["grad_norm"] = common.optimizer_step(student, opt, step, cfg)
        loop.record(metrics, tokens=sum(b["attention_mask"].gt(0).sum().item() for b in micro))

    # ---- save
    if loop.finished:
        checkpoint.save_final(student, cfg, dist, model_dir, model_dir)


if __name__ == "__main__":
    common.run(main, DistillConfig)
