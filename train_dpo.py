"""
Direct preference optimisation and its family: DPO (sigmoid) and every losses.dpo_loss type,
SimPO and ORPO (reference-free: no reference model is loaded), and KTO (unpaired data).

    torchrun --standalone --nproc_per_node 2 train_dpo.py       # built-in task, from the SFT model
    torchrun --standalone --nproc_per_node 2 train_dpo.py --loss ipo --beta 0.5
    torchrun --nproc_per_node 8 train_dpo.py --model runs/sft/model --data hh.jsonl --lr 5e-7 --beta 0.1

Per step: one forward of the policy over [chosen; rejected] concatenated (and one of the frozen
reference, or a lookup when --precompute-ref), sequence log-probs summed over completion tokens,
then the loss. On the built-in task with no --data, preference pairs are the SFT model's own
sampled answers judged by the task's verifier (correct = chosen, wrong = rejected).
"""
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import checkpoint
import collectives
import common
import config
import engine
import forward
import lora
import losses
import stages
from data import batching, cache, chat, formats, task
from loop import Loop, accumulate, micro_batches

REFERENCE_FREE = ("simpo", "orpo")
AVERAGED = ("ipo", "sigmoid_norm", "simpo", "orpo")  # losses defined on length-normalised log-probs


@dataclass
class DPOConfig(config.TrainConfig):
    """Preference optimisation: DPO and its family. --loss: sigmoid robust ipo hinge nca_pair bco_pair
    sppo_hard apo_zero apo_down exo_pair sigmoid_norm aot aot_pair discopop (losses.dpo_loss), simpo orpo
    (reference-free) or kto (unpaired)."""
    model: str = config.arg("", "policy init (HF dir); default: the built-in task's SFT model (runs/sft)")
    ref_model: str = config.arg("", "frozen reference; default: --model (with --lora-r: the policy with adapters off)")
    out: str = config.arg("runs/dpo", "output directory: metrics.jsonl, checkpoints/, final HF model")
    loss: str = config.arg("sigmoid", "the objective: losses.dpo_loss's types, or simpo | orpo (no reference) | kto "
                                      "(unpaired)")
    beta: float = config.arg(0.1, "strength of the KL regularisation (inverse temperature of the implicit reward)")
    label_smoothing: float = config.arg(0.0, "cDPO / robust / aot / aot_pair")
    discopop_tau: float = config.arg(0.05, "--loss discopop: temperature of the log-ratio modulation")
    rpo_alpha: float = config.arg(1.0, "+ rpo_alpha * NLL(chosen), RPO (Pang et al. 2024); 0 = plain DPO (TRL's "
                                       "default)")
    simpo_gamma_beta_ratio: float = config.arg(0.5, "SimPO's target margin gamma, as a multiple of beta")
    kto_desirable_weight: float = config.arg(1.0, "KTO: weight of desirable examples")
    kto_undesirable_weight: float = config.arg(1.0, "KTO: weight of undesirable examples")
    share_prompt: bool = config.arg(True, "one row per pair, prompt computed once (batching.collate_preference_shared)")
    precompute_ref: bool = config.arg(False, "one no-grad reference pass over the data, then free the reference")
    max_prompt_length: int = config.arg(128, "prompt tokens kept (from the end) when a pair is too long")
    max_steps: int = config.arg(150, "optimizer steps")
    batch_size: int = config.arg(16, "sequences per micro-batch per process")
    lr: float = config.arg(1e-4, "peak learning rate, reached after warmup")
    warmup_steps: int = config.arg(10, "linear warmup from 0 to lr over N steps")
    eval_data: str = config.arg("", "held-out pairs (JSONL) for the eval/ metrics")
    eval_every: int = config.arg(50, "evaluate every N steps; 0 = only at the start and the end")
    eval_samples: int = config.arg(256, "built-in task: held-out prompts for eval/accuracy")
    max_new_tokens: int = config.arg(16, "built-in task: length cap of generated answers")
    samples_per_prompt: int = config.arg(8, "built-in task: sampled answers per prompt to build pairs")
    pair_prompts: int = config.arg(2000, "built-in task: training prompts sampled to build pairs")
    RANGES = {**config.TrainConfig.RANGES, "beta": "(0, inf)", "label_smoothing": "[0, 0.5]",
              "max_prompt_length": "[1, inf)", "max_new_tokens": "[1, inf)", "samples_per_prompt": "[1, inf)"}
    CHOICES = {**config.TrainConfig.CHOICES, "loss": losses.DPO_LOSS_TYPES + REFERENCE_FREE + ("kto",)}
    REAL_MODEL = {**config.TrainConfig.REAL_MODEL, "lr": 1e-6, "beta": 0.1, "max_prompt_length": 512}  # TRL's DPOConfig


def collate(rows, pad_id, cfg):
    """A micro-batch's rows; shared-prompt rows carry segment ids, their mask is built on the
    run's device (forward.token_logps)."""
    if cfg.share_prompt:
        return batching.collate_preference_shared(rows, pad_id, segments=True)
    return batching.collate_preference(rows, pad_id)


def kto_rows(examples, idx):
    """KTO rows [target; mismatched] for examples[idx]: completion j after prompt j, then the
    dataset's next completion (j + 1) after prompt j. The mismatched rows estimate the KL baseline
    (KTO paper, sec. 4.1; TRL does the same). Fixed by dataset order, so it can be precomputed."""
    n = len(examples)
    return [{"prompt_ids": examples[j]["prompt_ids"], "chosen_ids": examples[j]["completion_ids"],
             "rejected_ids": examples[(j + 1) % n]["completion_ids"]} for j in idx]


def counts(examples, idx, cfg):
    """The units a micro-batch's loss is normalised by (loop.accumulate): pairs (KTO: examples),
    and the chosen completions' tokens for the NLL term of RPO and ORPO."""
    chosen = sum(len(examples[j]["chosen_ids" if cfg.loss != "kto" else "completion_ids"]) for j in idx)
    return {"pairs": len(idx), "chosen_tokens": chosen}


def kto_kl(pol, ref, n):
    """KTO's KL baseline from a batch's mismatched rows [n:] (KTO paper, sec. 4.1): their mean
    log-ratio, detached (a float)."""
    return (pol.sum[n:] - ref.sum[n:]).mean().item()


def objective(cfg, pol, ref, n, totals, desirable=None, kl=None):
    """The configured loss on n pairs (or, for KTO, n unpaired examples), as sums divided by
    `totals` (counts' units over the step: loop.accumulate). pol and ref are forward.SequenceLogps
    over rows [chosen; rejected] (KTO: [target; mismatched]); ref is None for reference-free
    losses; kl is KTO's baseline (kto_kl). Returns (loss, metrics), each metric (its mean over the
    n pairs, n), as loop.accumulate takes them."""
    if cfg.loss == "kto":
        kl = torch.tensor(kl, device=pol.sum.device)
        per_row, rewards = losses.kto_loss(pol.sum[:n], ref.sum[:n], desirable, kl, cfg.beta,
                                           cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
        d = desirable.float()
        metrics = {"rewards/chosen": (rewards * d).sum() / d.sum().clamp(min=1),
                   "rewards/rejected": (rewards * (1 - d)).sum() / (1 - d).sum().clamp(min=1),
                   "kl": kl, "logps/policy": pol.sum[:n].mean()}
        return per_row.sum() / totals["pairs"], {k: (v.item(), n) for k, v in metrics.items()}
    averaged = cfg.loss in AVERAGED  # IPO, sigmoid_norm, SimPO and ORPO use length-averaged log-probs
    c, r = (pol.mean if averaged else pol.sum)[:n], (pol.mean if averaged else pol.sum)[n:]
    if cfg.loss == "simpo":
        per_pair, cr, rr = losses.simpo_loss(c, r, cfg.beta, cfg.simpo_gamma_beta_ratio)
    elif cfg.loss == "orpo":
        per_pair, cr, rr = losses.orpo_loss(c, r, cfg.beta)[:3]
    else:
        ref_c, ref_r = (ref.mean if averaged else ref.sum)[:n], (ref.mean if averaged else ref.sum)[n:]
        per_pair, cr, rr = losses.dpo_loss(c, r, ref_c, ref_r, cfg.beta, cfg.loss, cfg.label_smoothing,
                                           discopop_tau=cfg.discopop_tau)
    loss = per_pair.sum() / totals["pairs"]
    nll_weight = 1.0 if cfg.loss == "orpo" else cfg.rpo_alpha
    if nll_weight:  # NLL of the chosen completions, a token mean over the step (ORPO's L_SFT; RPO's alpha term)
        loss = loss - nll_weight * (pol.tokens[:n] * pol.mask[:n]).sum() / totals["chosen_tokens"]
    metrics = {"rewards/chosen": cr.mean(), "rewards/rejected": rr.mean(), "rewards/accuracies": (cr > rr).float().mean(),
               "rewards/margins": (cr - rr).mean(), "logps/chosen": pol.sum[:n].mean(), "logps/rejected": pol.sum[n:].mean()}
    return loss, {k: (v.item(), n) for k, v in metrics.items()}


def main(cfg: DPOConfig):
    # ---- setup
    dist = common.setup(cfg)
    model_dir = cfg.model or task.stage(task.SFT_MODEL, "SFT model to start from (--model)")

    # ---- data
    tok = common.load_tokenizer(model_dir, cfg)
    policy = common.load_model(model_dir, cfg, dist, adapt=True)
    held_out = []
    if cfg.data:  # tokenized once into the data cache, memory-mapped
        train = load(cfg.data, tok, cfg, dist)
        evals = load(cfg.eval_data, tok, cfg, dist) if cfg.eval_data else []
    else:  # built-in task: the SFT model's own answers, judged by the verifier
        tdir = task.ensure_task(task.TASK_DIR)
        held_out = formats.load_prompts(os.path.join(tdir, "test.jsonl"))[:cfg.eval_samples]
        prompts = formats.load_prompts(os.path.join(tdir, "train.jsonl"))[:cfg.pair_prompts]
        pairs = stages.sample_preference_pairs(policy, tok, prompts, dist, cfg.samples_per_prompt, cfg.seed,
                                             cfg.max_new_tokens)
        eval_pairs, pairs = pairs[:len(pairs) // 20], pairs[len(pairs) // 20:]
        train, evals = encode(pairs, tok, cfg), encode(eval_pairs, tok, cfg)
    if 0 < len(evals) < dist.world:
        raise common.UsageError(f"{len(evals)} held-out examples for {dist.world} processes: give each one at least one")
    collectives.print0(f"{len(train)} training {'examples' if cfg.loss == 'kto' else 'pairs'}, {len(evals)} held out")

    # ---- models
    ref = None
    if cfg.loss not in REFERENCE_FREE and cfg.lora_r and not cfg.ref_model:
        ref = policy  # the reference is the policy with its adapters off (lora.adapters_disabled): no second copy
    elif cfg.loss not in REFERENCE_FREE:
        ref = common.load_model(cfg.ref_model or model_dir, cfg, dist, train=False).eval()
    ref_cache = None
    if cfg.precompute_ref and ref is not None:
        ref_cache = {"train": precompute(ref, train, dist, cfg, tok.pad_id),
                     "eval": precompute(ref, evals, dist, cfg, tok.pad_id)}
        ref = None  # never needed again
    opt = common.make_optimizer(policy, cfg)

    def logps(examples, idx, split):
        """Policy and reference log-probs of examples[idx], the reference from the live model or
        the cache of `split`; and KTO's labels (desirable or not)."""
        chunk = [examples[j] for j in idx]
        batch = collate(kto_rows(examples, idx) if cfg.loss == "kto" else chunk, tok.pad_id, cfg)
        pol = forward.sequence_logps(policy, batch, dist, cfg.chunk_size)
        ref_lp = None
        if ref_cache is not None:
            sums, means = (torch.cat([t[idx, 0], t[idx, 1]]) for t in ref_cache[split])  # on dist.device
            ref_lp = forward.SequenceLogps(sums, means, None, None)
        elif ref is not None:
            with torch.no_grad(), lora.adapters_disabled(ref):
                ref_lp = forward.sequence_logps(ref, batch, dist, cfg.chunk_size)
        desirable = torch.tensor([e["label"] for e in chunk], device=dist.device) if cfg.loss == "kto" else None
        return pol, ref_lp, desirable

    def train_loss(idx, totals):
        pol, ref_lp, desirable = logps(train, idx, "train")
        kl = None
        if cfg.loss == "kto":  # a baseline per micro-batch, averaged over ranks: every rank runs each micro-batch
            kl = collectives.all_sum(kto_kl(pol, ref_lp, len(idx)), dist) / dist.world
        return objective(cfg, pol, ref_lp, len(idx), totals, desirable, kl)

    def evaluate():
        metrics = {}
        if evals:
            sums = {}
            policy.eval()
            # unsharded: ranks may run different numbers of batches, so no collectives inside
            with torch.no_grad(), common.unsharded(policy), \
                    common.unsharded(ref) if ref not in (None, policy) else nullcontext():
                mine = list(range(dist.rank, len(evals), dist.world))  # every rank has one example at least
                for i in range(0, len(mine), cfg.batch_size):
                    idx = mine[i:i + cfg.batch_size]
                    pol, ref_lp, desirable = logps(evals, idx, "eval")
                    kl = kto_kl(pol, ref_lp, len(idx)) if cfg.loss == "kto" else None  # this batch's own
                    _, m = objective(cfg, pol, ref_lp, len(idx), counts(evals, idx, cfg), desirable, kl)
                    for k, (mean, n) in m.items():
                        sums[k] = sums.get(k, 0.0) + mean * n
            policy.train()
            # means over all held-out pairs, which the ranks' slices share out
            metrics.update({f"eval/{k}": v / len(evals) for k, v in collectives.sum_over_ranks(sums, dist).items()})
        if held_out:
            metrics["eval/accuracy"] = engine.eval_accuracy(engine.Engine(policy, tok, dist), held_out, task.is_correct,
                                                             cfg.max_new_tokens)
        return metrics

    # ---- loop
    loop = Loop(cfg, dist, {"model": (policy, opt)}, evaluate)
    policy.train()
    for step in loop:
        idx = batching.batch_indices(len(train), cfg.batch_size * cfg.grad_accum, cfg.seed, step, dist.rank, dist.world)
        micro = micro_batches(idx, cfg.grad_accum)
        metrics = accumulate(policy, micro, dist, step, lambda mb: counts(train, mb, cfg), train_loss)
        metrics["grad_norm"] = common.optimizer_step(policy, opt, step, cfg)
        metrics["lr"] = common.lr_at(step, cfg)
        loop.record(metrics, tokens=sum(tokens(train[j]) for j in idx))

    # ---- save
    if loop.finished:
        checkpoint.save_final(policy, cfg, dist, model_dir, model_dir)


def tokens(example):
    """Tokens of a training row: the prompt twice (once per answer), then both answers."""
    chosen = example.get("chosen_ids", example.get("completion_ids"))
    return len(example["prompt_ids"]) * 2 + len(chosen) + len(example.get("rejected_ids", chosen))


def load(path, tok, cfg, dist):
    """Tokenised pairs of a JSONL file, from the data cache; with --loss kto, unpaired
    {"prompt", "completion", "label"} records too (told apart by the first record's "label"
    field), and pairs become unpaired examples as in encode()."""
    unpaired = cfg.loss == "kto" and "label" in next(formats.iter_jsonl(path))[1]
    out = common.load_data(path, "unpaired" if unpaired else "preference", tok, cfg, dist,
                           max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
    return cache.Unpaired(out) if cfg.loss == "kto" and not unpaired else out


def encode(examples, tok, cfg):
    """Tokenised pairs; for KTO, unpaired examples, each pair giving a desirable and an
    undesirable one (TRL's unpair_preference_dataset)."""
    out = [chat.tokenize_preference(ex, tok, cfg.max_length, cfg.max_prompt_length) for ex in examples]
    return cache.Unpaired(out) if cfg.loss == "kto" else out


@torch.no_grad()
def precompute(ref, examples, dist, cfg, pad_id):
    """Reference log-probs of every example, rows as the training batches lay them out: a pair of
    tensors (sums, means), each [N, 2] = (chosen, rejected) or, for KTO, (target, mismatched).
    Each rank scores a strided slice (unsharded: no collectives); slices are summed over ranks.
    On the run's device: the all-reduce needs it there (NCCL takes no CPU tensors), and every
    micro-batch reads its rows there (a few bytes a pair)."""
    n = len(examples)
    sums, means = (torch.zeros(n, 2, dtype=torch.float64, device=dist.device) for _ in range(2))
    with common.unsharded(ref), lora.adapters_disabled(ref):
        for i in range(dist.rank * cfg.batch_size, n, cfg.batch_size * dist.world):
            idx = list(range(i, min(i + cfg.batch_size, n)))
            rows = kto_rows(examples, idx) if cfg.loss == "kto" else [examples[j] for j in idx]
            lp, k = forward.sequence_logps(ref, collate(rows, pad_id, cfg), dist, cfg.chunk_size), len(idx)
            sums[i:i + k] = torch.stack([lp.sum[:k], lp.sum[k:]], 1).double()
            means[i:i + k] = torch.stack([lp.mean[:k], lp.mean[k:]], 1).double()
    if dist.world > 1:
        torch.distributed.all_reduce(sums)
        torch.distributed.all_reduce(means)
    return sums.float(), means.float()


if __name__ == "__main__":
    common.run(main, DPOConfig)
