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

import common
import losses
from data import batching, chat, formats, task


@dataclass
class RMConfig(common.TrainConfig):
    """Reward model (Bradley-Terry)."""
    model: str = ""            # init (HF causal LM or reward model); default: the built-in SFT model
    out: str = "runs/rm"
    center_coef: float = 0.0   # + center_coef * mean((r_chosen + r_rejected)^2) keeps scores near 0
    use_margin: bool = False   # subtract the records' "margin" field inside the sigmoid
    max_prompt_length: int = 128  # prompt tokens kept (from the end) when a pair is too long
    max_steps: int = 150
    batch_size: int = 16
    lr: float = 3e-4
    warmup_steps: int = 10
    eval_data: str = ""          # held-out pairs (JSONL) for eval/accuracy
    eval_every: int = 50
    samples_per_prompt: int = 8  # built-in task: sampled answers per prompt to build pairs
    pair_prompts: int = 2000     # built-in task: training prompts sampled to build pairs
    max_new_tokens: int = 16     # built-in task: length cap of the sampled answers
    RANGES = {**common.TrainConfig.RANGES, "max_prompt_length": "[1, inf)", "samples_per_prompt": "[1, inf)",
              "max_new_tokens": "[1, inf)"}


def pair_scores(model, batch, dist):
    """Scores [2n] of rows [chosen; rejected], each read at the row's last real token."""
    b = {k: v.to(dist.device) for k, v in batch.items()}
    with common.autocast(dist):
        scores = model(b["input_ids"], None, b["position_ids"])  # right padding: the causal mask suffices
    last = b["attention_mask"].gt(0).sum(-1) - 1
    return scores.float()[torch.arange(scores.shape[0], device=dist.device), last]


def main(cfg: RMConfig):
    # ---- setup
    dist = common.setup(cfg)

    # ---- data and model
    model_dir = cfg.model or common.ensure_sft_model(dist, cfg.seed)
    tok = chat.load_tokenizer(model_dir, cfg.chat_format or None, cfg.system_prompt or None, cfg.chat_template_kwargs)
    rm = common.load_model(model_dir, cfg, dist, head="score", adapt=True, modules_to_save=("score",), seed=cfg.seed)
    rm.cfg.pad_token_id = tok.pad_id  # transformers finds the last token through pad_token_id
    if tok.pad_id in tok.stop_ids:
        common.print0("warning: pad token == eos token; transformers will score the token before the final eos")
    if cfg.data:  # tokenized once into the data cache, memory-mapped
        settings = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        enc = common.load_data(cfg.data, "preference", tok, cfg, dist, **settings)
        evals = common.load_data(cfg.eval_data, "preference", tok, cfg, dist, **settings) if cfg.eval_data else []
        margins = torch.tensor(enc.column("margin"), dtype=torch.float32)  # NaN: the record has none
    else:  # built-in task: the SFT model's own answers judged by the verifier
        tdir = task.ensure_task(task.TASK_DIR)
        sampler = common.load_model(model_dir, cfg, dist, train=False)
        pairs = common.sample_preference_pairs(sampler, tok, formats.load_prompts(os.path.join(tdir, "train.jsonl"))[:cfg.pair_prompts],
                                               dist, task.is_correct, cfg.samples_per_prompt, cfg.seed, cfg.max_new_tokens)
        del sampler
        eval_pairs, pairs = pairs[:len(pairs) // 10], pairs[len(pairs) // 10:]
        enc = [chat.tokenize_preference(ex, tok, cfg.max_length, cfg.max_prompt_length) for ex in pairs]
        evals = [chat.tokenize_preference(ex, tok, cfg.max_length, cfg.max_prompt_length) for ex in eval_pairs]
        margins = torch.full((len(enc),), float("nan"))
    if cfg.use_margin and (missing := margins.isnan().nonzero().flatten().tolist()):
        where = enc[missing[0]]["where"] if cfg.data else "a built-in pair"
        raise formats.DataError(f"--use-margin: {len(missing)} records have no 'margin' field, e.g. {where}")
    margins = margins.nan_to_num(0.0)
    common.print0(f"{len(enc)} training pairs, {len(evals)} held out")

    opt = common.make_optimizer(rm, cfg, dist)
    start = common.resume(cfg, dist, {"model": (rm, opt)})
    log = common.Logger(cfg, dist, start)

    def evaluate(step):
        if not evals:
            return
        rm.eval()
        correct = total = 0.0
        with torch.no_grad(), common.unsharded(rm):
            for i in range(dist.rank * cfg.batch_size, len(evals), cfg.batch_size * dist.world):
                chunk = evals[i:i + cfg.batch_size]
                s = pair_scores(rm, batching.collate_preference(chunk, tok.pad_id), dist)
                correct += (s[:len(chunk)] > s[len(chunk):]).sum().item()
                total += len(chunk)
        rm.train()
        log.log(step, {"eval/accuracy": common.all_sum(correct, dist) / max(common.all_sum(total, dist), 1)})

    if start == 0:
        evaluate(0)
    # ---- loop (from here on, SIGTERM means: checkpoint at the end of this step, then exit)
    preempt = common.Preemption()
    rm.train()
    for step in range(start, cfg.max_steps):
        idx = batching.batch_indices(len(enc), cfg.batch_size * cfg.grad_accum, cfg.seed, step, dist.rank, dist.world)
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
        for i in range(cfg.grad_accum):
            mb = idx[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            if dist.world > 1:
                rm.set_requires_gradient_sync(i == cfg.grad_accum - 1)
            s = pair_scores(rm, batching.collate_preference([enc[j] for j in mb], tok.pad_id), dist)
            c, r = s[:len(mb)], s[len(mb):]
            margin = margins[mb].to(dist.device) if cfg.use_margin else None
            loss, accuracy = losses.reward_loss(c, r, margin, cfg.center_coef)
            (loss / cfg.grad_accum).backward()
            for k, v in (("loss", loss), ("accuracy", accuracy), ("margin", (c - r).mean())):
                sums[k] += v.item() / cfg.grad_accum
        metrics = {k: common.all_sum(v, dist) / dist.world for k, v in sums.items()}
        common.check_finite(metrics["loss"], step)
        metrics["grad_norm"] = common.optimizer_step(rm, opt, step, cfg)
        if (step + 1) % cfg.log_every == 0 or step == start:
            log.log(step + 1, metrics)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            evaluate(step + 1)
        if common.checkpoint_or_stop(step + 1, cfg, dist, preempt, {"model": (rm, opt)}):
            return

    # ---- eval and save
    evaluate(cfg.max_steps)
    common.save_final(rm, cfg, dist, model_dir, model_dir)


if __name__ == "__main__":
    main(common.parse_config(RMConfig))
