"""
Reward model: a causal LM with a scalar `score` head, trained on preference pairs with the
Bradley-Terry loss (losses.reward_loss). Saved as `*ForSequenceClassification`, which transformers
loads as is.

    torchrun --standalone --nproc_per_node 2 train_rm.py       # built-in task, from the SFT model
    torchrun --nproc_per_node 8 train_rm.py --model runs/sft/model --data hh.jsonl --lr 1e-5

The score of a sequence is read at its last non-padding token, as transformers does.
"""
import os
from dataclasses import dataclass

import torch

import checkpoint
import collectives
import common
import config
import forward
import losses
import stages
from data import batching, chat, formats, task
from loop import Loop, accumulate, micro_batches


@dataclass
class RMConfig(config.TrainConfig):
    """Reward model (Bradley-Terry)."""
    model: str = config.arg("", "init (HF causal LM or reward model); default: the built-in task's SFT model "
                                "(runs/sft)")
    out: str = config.arg("runs/rm", "output directory: metrics.jsonl, checkpoints/, final HF model")
    center_coef: float = config.arg(0.0, "+ center_coef * mean((r_chosen + r_rejected)^2) keeps scores near 0")
    use_margin: bool = config.arg(False, "subtract the records' \"margin\" field inside the sigmoid")
    max_prompt_length: int = config.arg(128, "prompt tokens kept (from the end) when a pair is too long")
    max_steps: int = config.arg(150, "optimizer steps")
    batch_size: int = config.arg(16, "sequences per micro-batch per process")
    lr: float = config.arg(3e-4, "peak learning rate, reached after warmup")
    warmup_steps: int = config.arg(10, "linear warmup from 0 to lr over N steps")
    eval_data: str = config.arg("", "held-out pairs (JSONL) for eval/accuracy")
    eval_every: int = config.arg(50, "evaluate every N steps; 0 = only at the start and the end")
    samples_per_prompt: int = config.arg(8, "built-in task: sampled answers per prompt to build pairs")
    pair_prompts: int = config.arg(2000, "built-in task: training prompts sampled to build pairs")
    max_new_tokens: int = config.arg(16, "built-in task: length cap of the sampled answers")
    RANGES = {**config.TrainConfig.RANGES, "max_prompt_length": "[1, inf)", "samples_per_prompt": "[1, inf)",
              "max_new_tokens": "[1, inf)"}
    REAL_MODEL = {**config.TrainConfig.REAL_MODEL, "lr": 1e-4, "max_prompt_length": 512}  # TRL's RewardConfig


def main(cfg: RMConfig):
    # ---- setup
    dist = common.setup(cfg)
    model_dir = cfg.model or task.stage(task.SFT_MODEL, "SFT model to start from (--model)")

    # ---- data and model
    tok = common.load_tokenizer(model_dir, cfg)
    rm = common.load_model(model_dir, cfg, dist, head="score", adapt=True, modules_to_save=("score",), seed=cfg.seed)
    rm.cfg.pad_token_id = tok.pad_id  # transformers finds the last token through pad_token_id
    if tok.pad_id in tok.stop_ids:
        collectives.print0("warning: pad token == eos token; transformers will score the token before the final eos")
    if cfg.data:  # tokenized once into the data cache, memory-mapped
        settings = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        enc = common.load_data(cfg.data, "preference", tok, cfg, dist, **settings)
        evals = common.load_data(cfg.eval_data, "preference", tok, cfg, dist, **settings) if cfg.eval_data else []
        margins = torch.tensor(enc.column("margin"), dtype=torch.float32, device="cpu")  # NaN: the record has none
    else:  # built-in task: the SFT model's own answers judged by the verifier
        tdir = task.ensure_task(task.TASK_DIR)
        sampler = common.load_model(model_dir, cfg, dist, train=False)
        prompts = formats.load_prompts(os.path.join(tdir, "train.jsonl"))[:cfg.pair_prompts]
        pairs = stages.sample_preference_pairs(sampler, tok, prompts, dist, cfg.samples_per_prompt, cfg.seed,
                                             cfg.max_new_tokens)
        del sampler
        eval_pairs, pairs = pairs[:len(pairs) // 10], pairs[len(pairs) // 10:]
        enc = [chat.tokenize_preference(ex, tok, cfg.max_length, cfg.max_prompt_length) for ex in pairs]
        evals = [chat.tokenize_preference(ex, tok, cfg.max_length, cfg.max_prompt_length) for ex in eval_pairs]
        margins = torch.full((len(enc),), float("nan"), device="cpu")
    if cfg.use_margin and (missing := margins.isnan().nonzero().flatten().tolist()):
        where = enc[missing[0]]["where"] if cfg.data else "a built-in pair"
        raise formats.DataError(f"--use-margin: {len(missing)} records have no 'margin' field, e.g. {where}")
    margins = margins.nan_to_num(0.0)
    collectives.print0(f"{len(enc)} training pairs, {len(evals)} held out")
    opt = common.make_optimizer(rm, cfg)

    def evaluate():
        if not evals:
            return {}
        correct = total = 0.0
        rm.eval()
        with torch.no_grad(), common.unsharded(rm):  # ranks run different numbers of batches
            for i in range(dist.rank * cfg.batch_size, len(evals), cfg.batch_size * dist.world):
                chunk = evals[i:i + cfg.batch_size]
                s = forward.pair_scores(rm, batching.collate_preference(chunk, tok.pad_id), dist)
                correct += (s[:len(chunk)] > s[len(chunk):]).sum().item()
                total += len(chunk)
        rm.train()
        return {"eval/accuracy": collectives.all_sum(correct, dist) / max(collectives.all_sum(total, dist), 1)}

    def loss(mb, totals):
        """Bradley-Terry over the micro-batch's pairs, as a sum over pairs / the step's pairs; the
        metrics as means over the micro-batch's pairs (loop.accumulate weighs them)."""
        s = forward.pair_scores(rm, batching.collate_preference([enc[j] for j in mb], tok.pad_id), dist)
        c, r = s[:len(mb)], s[len(mb):]
        mean_loss, accuracy = losses.reward_loss(c, r, margins[mb].to(dist.device) if cfg.use_margin else None,
                                                 cfg.center_coef)
        return mean_loss * len(mb) / totals["pairs"], {"accuracy": (accuracy, len(mb)),
                                                       "margin": ((c - r).mean().item(), len(mb))}

    # ---- loop
    loop = Loop(cfg, dist, {"model": (rm, opt)}, evaluate)
    rm.train()
    for step in loop:
        idx = batching.batch_indices(len(enc), cfg.batch_size * cfg.grad_accum, cfg.seed, step, dist.rank, dist.world)
        metrics = accumulate(rm, micro_batches(idx, cfg.grad_accum), dist, step, lambda mb: {"pairs": len(mb)}, loss)
        metrics["grad_norm"] = common.optimizer_step(rm, opt, step, cfg)
        loop.record(metrics)

    # ---- save
    if loop.finished:
        checkpoint.save_final(rm, cfg, dist, model_dir, model_dir)


if __name__ == "__main__":
    common.run(main, RMConfig)
