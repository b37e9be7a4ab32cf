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
import random
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

import common
import losses
import model as M
from data import batching, chat, formats, task

TEACHER_DIR = "runs/ppo"  # the built-in task's default teacher: train_ppo.py's GRPO model


@dataclass
class DistillConfig(common.TrainConfig):
    """On-policy distillation (GKD)."""
    model: str = ""              # student init (HF dir); default: the built-in task's SFT model
    teacher: str = ""            # teacher (HF dir, same tokenizer); default: runs/ppo/model, trained first if missing
    student_layers: int = 0      # keep only the student's first N layers (a smaller student); 0 = all
    out: str = "runs/distill"
    lmbda: float = 0.5           # fraction of steps whose completions the student samples itself (GKD's lambda)
    beta: float = 0.5            # generalized JSD: 0 = KL(teacher||student), 1 = KL(student||teacher)
    temperature: float = 1.0     # of the student's samples and of both distributions in the loss
    max_steps: int = 200
    batch_size: int = 32         # prompts per micro-batch per process
    lr: float = 5e-4
    warmup_steps: int = 10
    eval_every: int = 50
    eval_samples: int = 256      # built-in task: held-out prompts for eval/accuracy
    max_new_tokens: int = 16     # length cap of the student's sampled completions (and of eval answers)
    max_prompt_length: int = 128  # prompt tokens kept (from the end)
    RANGES = {**common.TrainConfig.RANGES, "lmbda": "[0, 1]", "beta": "[0, 1]", "temperature": "(0, inf)",
              "max_new_tokens": "[1, inf)", "max_prompt_length": "[1, inf)"}


def ensure_teacher(dist, seed):
    """The built-in task's GRPO model (runs/ppo/model), trained here with train_ppo.py's defaults
    first if it does not exist."""
    path = os.path.join(TEACHER_DIR, "model")
    if not os.path.exists(os.path.join(path, "config.json")):
        import train_ppo

        common.print0(f"no teacher at {path}: training it first (train_ppo.py defaults)")
        train_ppo.main(train_ppo.PPOConfig(out=TEACHER_DIR, seed=seed))
    return path


def drop_layers(model, n):
    """Keep the first n transformer blocks (a smaller student initialised from a bigger model,
    as DistilBERT does); the saved config says n layers."""
    if not 0 < n <= model.cfg.num_layers:
        raise ValueError(f"--student-layers {n}: the student has {model.cfg.num_layers} layers")
    model.model.layers = model.model.layers[:n]
    model.cfg.num_layers = n
    model.cfg.hf = dict(model.cfg.hf, **{"n_layer" if model.cfg.gpt2 else "num_hidden_layers": n})
    return model


def student_rows(student, prompts, tok, dist, cfg, step):
    """SFT rows ({"input_ids", "loss_mask"}) of the student's own completions to `prompts`,
    sampled at --temperature; a function of (seed, step, rank), so the same on resume."""
    ids, pmask = batching.collate_prompts(prompts, tok.pad_id)
    g = torch.Generator(dist.device).manual_seed((cfg.seed * 100_003 + step) * 1009 + dist.rank)
    student.eval()
    with torch.no_grad(), common.unsharded(student), common.autocast(dist):
        seqs, cmask = M.generate(student, ids.to(dist.device), pmask.to(dist.device), cfg.max_new_tokens,
                                 cfg.temperature, eos_ids=tok.stop_ids, pad_id=tok.pad_id, generator=g)
    student.train()
    rows = []
    for p, row, m in zip(prompts, seqs[:, ids.shape[1]:].tolist(), cmask.tolist()):
        comp = [t for t, k in zip(row, m) if k]
        rows.append({"input_ids": list(p) + comp, "loss_mask": [0] * len(p) + [1] * len(comp)})
    return rows


def distill_loss(student, teacher, batch, dist, cfg):
    """Per-position generalized JSD [n] at the batch's n loss positions (those whose labels are
    completion tokens). The teacher's last hidden states at those positions come first, without
    gradient; then the student's forward computes the divergence inside its head, where FSDP has
    the student's head gathered. The teacher's head weight is all-gathered once (one [V, D]
    matrix, not the model)."""
    b = {k: v.to(dist.device) for k, v in batch.items()}
    sel = b["loss_mask"] > 0
    with torch.no_grad(), common.autocast(dist):
        t_hidden = teacher(b["input_ids"], None, b["position_ids"], head_fn=lambda h, w: h[sel])
    t_weight = teacher.lm_head.weight
    t_weight = t_weight.full_tensor() if isinstance(t_weight, DTensor) else t_weight

    def head(h, w):
        return losses.generalized_jsd_from_hidden(h[sel], w, t_hidden, t_weight, cfg.beta, cfg.temperature,
                                                  cfg.chunk_size)

    with common.autocast(dist):  # right-padded rows: causal attention needs no mask (see common.token_logps)
        return student(b["input_ids"], None, b["position_ids"], head_fn=head)


def main(cfg: DistillConfig):
    # ---- setup
    dist = common.setup(cfg)
    if not 0 <= cfg.lmbda <= 1 or not 0 <= cfg.beta <= 1 or cfg.temperature <= 0:
        raise ValueError(f"--lmbda and --beta must be in [0, 1] and --temperature > 0; got {cfg.lmbda}, "
                         f"{cfg.beta}, {cfg.temperature}")

    # ---- data
    model_dir = cfg.model or common.ensure_sft_model(dist, cfg.seed)
    teacher_dir = cfg.teacher or ensure_teacher(dist, cfg.seed)
    tok = chat.load_tokenizer(model_dir, cfg.chat_format or None, cfg.system_prompt or None)
    held_out = []
    if cfg.data:
        path = cfg.data
    else:
        tdir = task.ensure_task(task.TASK_DIR)
        path = os.path.join(tdir, "train.jsonl")
        held_out = formats.load_prompts(os.path.join(tdir, "test.jsonl"))[:cfg.eval_samples]
    records = formats.load_sft(path)
    for r in records:
        if "prompt" not in r:
            raise formats.DataError(f"{r['where']}: distillation needs {{\"prompt\", \"completion\"}} records")
    data_rows = [chat.tokenize_sft(r, tok, cfg.max_length) for r in records]
    prompts = [chat.tokenize_prompt(r, tok, cfg.max_prompt_length) for r in records]
    common.print0(f"{len(records)} prompts with completions from {path}")

    # ---- models: the student trains, the teacher is frozen
    student = M.from_pretrained(model_dir)
    if cfg.student_layers:
        student = drop_layers(student, cfg.student_layers)
    student.grad_checkpointing = cfg.grad_ckpt
    teacher = M.from_pretrained(teacher_dir)
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise ValueError(f"teacher {teacher_dir} has a vocabulary of {teacher.cfg.vocab_size} tokens, student "
                         f"{model_dir} of {student.cfg.vocab_size}: they must share the tokenizer")
    common.print0(f"student {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters "
                  f"({student.cfg.num_layers} layers), teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M")
    student = common.shard(student, dist)
    teacher = common.shard(teacher, dist, train=False).eval()
    opt = common.make_optimizer(student, cfg, dist)
    start = common.resume(cfg, dist, {"model": (student, opt)})
    log = common.Logger(cfg, dist, start)

    def evaluate(step):
        if held_out:
            acc = common.eval_accuracy(student, tok, held_out, dist, task.is_correct, cfg.max_new_tokens)
            log.log(step, {"eval/accuracy": acc})

    if start == 0:
        evaluate(0)
    # ---- loop (from here on, SIGTERM means: checkpoint at the end of this step, then exit)
    preempt = common.Preemption()
    student.train()
    for step in range(start, cfg.max_steps):
        # the same choice on every rank, and on resume
        on_policy = random.Random(cfg.seed * 1_000_003 + step).random() < cfg.lmbda
        idx = batching.batch_indices(len(records), cfg.batch_size * cfg.grad_accum, cfg.seed, step, dist.rank, dist.world)
        micro = []
        for i in range(cfg.grad_accum):
            mb = idx[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            rows = student_rows(student, [prompts[j] for j in mb], tok, dist, cfg, step * cfg.grad_accum + i) \
                if on_policy else [data_rows[j] for j in mb]
            micro.append(batching.collate_sft(rows, tok.pad_id))
        # every completion token of the step weighs the same, across micro-batches and ranks
        n_tokens = common.all_sum(sum(b["loss_mask"].sum().item() for b in micro), dist)
        step_loss = 0.0
        for i, b in enumerate(micro):
            if dist.world > 1:  # reduce-scatter gradients only after the last micro-batch
                student.set_requires_gradient_sync(i == len(micro) - 1)
            per_position = distill_loss(student, teacher, b, dist, cfg)
            loss = per_position.sum() / n_tokens
            (loss * dist.world).backward()  # FSDP averages gradients over ranks: make it a sum
            step_loss += loss.item()
        step_loss = common.all_sum(step_loss, dist)
        common.check_finite(step_loss, step)
        grad_norm = common.optimizer_step(student, opt, step, cfg)
        if (step + 1) % cfg.log_every == 0 or step == start:
            log.log(step + 1, {"loss": step_loss, "on_policy": float(on_policy), "lr": common.lr_at(step, cfg),
                               "grad_norm": grad_norm, "completion_tokens": n_tokens})
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            evaluate(step + 1)
        if common.checkpoint_or_stop(step + 1, cfg, dist, preempt, {"model": (student, opt)}):
            return

    # ---- eval and save
    evaluate(cfg.max_steps)
    common.save_final(student, cfg, dist, model_dir)


if __name__ == "__main__":
    main(common.parse_config(DistillConfig))
