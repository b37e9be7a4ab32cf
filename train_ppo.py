"""
Online RL for language models: PPO (actor-critic), the critic-free GRPO, RLOO and REINFORCE++, and
online DPO, one loop.

    torchrun --standalone --nproc_per_node 2 train_ppo.py                 # GRPO on the built-in task
    torchrun --standalone --nproc_per_node 2 train_ppo.py --algo ppo
    torchrun --standalone --nproc_per_node 2 train_ppo.py --importance-level sequence --clip-eps 3e-4 \\
        --clip-eps-high 4e-4 --loss-agg grpo --beta 0                    # GSPO
    torchrun --nproc_per_node 8 train_ppo.py --model Qwen2.5-0.5B-Instruct --data gsm8k_rl.jsonl \\
        --reward-fn data.prepare_gsm8k:gsm8k_reward --max-new-tokens 512 --lr 1e-6

Each step:

    prompts --generate (KV cache, policy unsharded)--> completions --reward fn / reward model--> scores
      |                                                                                          |
      +--> old log-probs (policy), reference log-probs, values (PPO) <-----------------------------+
                                   |
            advantages: PPO = GAE on (score - beta * KL per token), whitened
                        GRPO = group-normalised scores, RLOO = leave-one-out baseline (Ahmadian
                        et al. 2024) in the same clipped objective and k3 KL term as GRPO
                        REINFORCE++ = returns-to-go of (score - group mean, - beta * KL per
                        token), whitened over the global batch (Hu 2025)
                        online DPO = consecutive pairs of a prompt's completions, the better
                        one chosen (ties skipped), any losses.dpo_loss type (Guo et al. 2024)
                                   |
            ppo_epochs x minibatches: --loss ppo (clipped; --importance-level sequence = GSPO),
                                      cispo or sapo (+ beta * KL when not in the reward)
                                      (+ clipped value loss, PPO)

The KL to the reference goes either into the reward (--kl-in-reward: PPO and REINFORCE++ by
default; GRPO/RLOO subtract the sequence's summed KL from its score) or into the loss (GRPO and
RLOO by default), with any estimator (--kl-estimator k1|k2|k3; default k1 in the reward, k3 in
the loss).
"""
import importlib
import inspect
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

import common
import lora
import losses
import model as M
from data import batching, chat, formats, task


@dataclass
class PPOConfig(common.TrainConfig):
    """Online RL: --algo ppo | grpo | rloo | reinforce_pp | online_dpo; --loss ppo | cispo | sapo;
    --importance-level token | sequence (GSPO); --kl-estimator k1 | k2 | k3; --kl-in-reward."""
    algo: str = "grpo"           # ppo | grpo | rloo | reinforce_pp | online_dpo (advantages / objective)
    loss: str = "ppo"            # policy surrogate: ppo (clipped) | cispo | sapo
    importance_level: str = "token"  # token | sequence (GSPO: one ratio per sequence; --loss ppo only)
    model: str = ""              # policy init (HF dir); default: the built-in task's SFT model
    ref_model: str = ""          # KL reference; default: --model (with --lora-r: the policy with adapters off)
    out: str = "runs/ppo"
    reward_fn: str = ""          # module:function(prompts, completions, **fields) -> floats; default: the task verifier
    reward_model: str = ""       # HF dir with a score head (overrides --reward-fn)
    value_model: str = ""        # PPO critic init; default: --reward-model, else the policy with a fresh head
    max_steps: int = 100         # rollout steps
    prompts_per_step: int = 16   # prompts per rollout per process
    group_size: int = 8          # completions per prompt (GRPO/RLOO need >= 2; PPO default 8 too)
    ppo_epochs: int = 1          # passes over each rollout
    minibatches: int = 2         # optimizer steps per pass
    lr: float = 2e-4
    value_lr: float = 1e-3       # PPO critic's learning rate (constant)
    warmup_steps: int = 0
    beta: float = 0.02           # KL coefficient (online DPO: DPO's beta); 0 = no reference
    kl_estimator: str = ""       # k1 | k2 | k3; empty = k1 in the reward, k3 in the loss
    kl_in_reward: bool = None    # KL penalty in the reward, else in the loss; unset = PPO, REINFORCE++ in the reward
    cispo_max_ratio: float = 5.0  # --loss cispo: cap of the stop-gradient importance weight
    sapo_tau_pos: float = 1.0    # --loss sapo: gate temperature for positive advantages
    sapo_tau_neg: float = 1.05   # --loss sapo: ... and for negative ones
    dpo_loss: str = "sigmoid"    # --algo online_dpo: a losses.DPO_LOSS_TYPES entry
    rpo_alpha: float = 1.0       # --algo online_dpo: + rpo_alpha * NLL(chosen) (RPO, as train_dpo.py); 0 = TRL's
    clip_eps: float = 0.2        # PPO ratio clipping
    clip_eps_high: float = 0.0   # DAPO clip-higher; 0 = same as clip_eps
    loss_agg: str = "dapo"       # grpo | dr_grpo | dapo
    scale_rewards: bool = True   # GRPO std normalisation (False = Dr. GRPO)
    vf_coef: float = 0.5         # weight of the value loss
    vf_clip: float = 0.2         # value clipping around the rollout's values
    gamma: float = 1.0           # discount
    lam: float = 0.95            # GAE lambda
    whiten: bool = True          # PPO: whiten advantages over the rollout
    temperature: float = 1.0     # sampling temperature; 0 = greedy
    top_k: int = 0               # sample among the k likeliest tokens; 0 = all
    top_p: float = 1.0           # nucleus sampling
    max_new_tokens: int = 16     # response length cap
    max_prompt_length: int = 128  # prompt tokens kept (from the end)
    missing_eos_penalty: float = 0.0  # subtracted from the score of completions that never emitted EOS
    stop_tokens: str = ""        # more tokens that end a completion, comma-separated (EOS and end-of-turn always do)
    eval_every: int = 10
    eval_samples: int = 256      # built-in task: held-out prompts for eval/accuracy
    log_every: int = 1
    record_rollout: str = ""     # save the first rollout's tensors (rank 0) to this file: tests, debugging
    RANGES = {**common.TrainConfig.RANGES, "prompts_per_step": "[1, inf)", "group_size": "[1, inf)",
              "ppo_epochs": "[1, inf)", "minibatches": "[1, inf)", "value_lr": "(0, inf)", "clip_eps": "(0, inf)",
              "gamma": "[0, 1]", "lam": "[0, 1]", "top_p": "(0, 1]", "max_new_tokens": "[1, inf)",
              "max_prompt_length": "[1, inf)"}


def load_reward_fn(spec):
    """The function and the record fields it requires: its parameters after (prompts, completions)
    without a default (data.task:reward_fn requires "answer"), checked on every record at load time."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--reward-fn {spec!r}: expected module:function, e.g. data.task:reward_fn")
    fn = getattr(importlib.import_module(module), name)
    params = list(inspect.signature(fn).parameters.values())[2:]
    return fn, [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def completion_logps(model, seqs, attn, P, dist, cfg, entropy=False):
    """Log-probs [N, L] of the completion tokens seqs[:, P:] under `model` (and, optionally, the
    per-token entropy [N, L]), computed in chunks over positions. Position P - 1 + i predicts
    completion token i: the one shift of this script, done here. The distribution is the one the
    rollout sampled from, softmax(logits / temperature) (hidden / T through the linear head is
    logits / T); top-k/top-p truncation is not modelled, as in TRL."""
    labels = torch.roll(seqs, -1, dims=1)
    temperature = cfg.temperature or 1.0  # greedy rollouts: the untempered distribution

    def head(h, w):
        h = h[:, P - 1:-1] / temperature
        lp = losses.logprobs_from_hidden(h, w, labels[:, P - 1:-1], cfg.chunk_size)
        return (lp, losses.entropy_from_hidden(h, w, cfg.chunk_size)) if entropy else lp

    with common.autocast(dist):
        return model(seqs, attn, head_fn=head)


def online_dpo_objective(logps, ref_logps, pref, mask, dist, cfg):
    """Online DPO's loss on a minibatch of pairs: rows (2i, 2i + 1) are two completions of one
    prompt and pref [N] is +1 on the chosen row, -1 on the rejected one, 0 on both rows of a tie.
    Each pair weighs the same wherever it is: the sum over pairs is divided by the pairs of all
    ranks per rank (FSDP averages gradients over ranks). Returns (loss, detached stats)."""
    seq = (logps * mask).sum(-1)
    ref_seq = (ref_logps * mask).sum(-1)
    if cfg.dpo_loss in ("ipo", "sigmoid_norm"):  # defined on average per-token log-probs
        n = mask.sum(-1).clamp(min=1)
        seq, ref_seq = seq / n, ref_seq / n
    first = pref.view(-1, 2)[:, :1]
    keep = first[:, 0] != 0  # ties are dropped before the loss (AOT's sorting must not see them)
    col = (first < 0).long()  # [pairs, 1]: which row of the pair is the chosen one
    chosen = [x.view(-1, 2).gather(1, col).squeeze(1)[keep] for x in (seq, ref_seq)]
    rejected = [x.view(-1, 2).gather(1, 1 - col).squeeze(1)[keep] for x in (seq, ref_seq)]
    per_pair, cr, rr = losses.dpo_loss(chosen[0], rejected[0], chosen[1], rejected[1], cfg.beta, cfg.dpo_loss)
    n_pairs = common.all_sum(keep.sum().item(), dist) / dist.world
    loss = per_pair.sum() / max(n_pairs, 1e-8)
    if cfg.rpo_alpha:  # RPO's NLL of the chosen completions, a token mean over all ranks (see train_dpo.py)
        chosen_rows = pref > 0
        n_tok = common.all_sum(mask[chosen_rows].sum().item(), dist) / dist.world
        loss = loss - cfg.rpo_alpha * (logps * mask)[chosen_rows].sum() / max(n_tok, 1e-8)
    k = max(len(per_pair), 1)
    return loss, {"pairs": float(len(per_pair)), "rewards/margins": (cr - rr).sum().item() / k,
                  "rewards/accuracies": (cr > rr).float().sum().item() / k}


def completion_values(critic, seqs, attn, P, dist):
    """Values [N, L]: the critic's estimate at the state before each completion token."""
    with common.autocast(dist):
        return critic(seqs, attn)[:, P - 1:-1].float()


def main(cfg: PPOConfig):
    # ---- setup
    dist = common.setup(cfg)
    if cfg.algo not in ("ppo", "grpo", "rloo", "reinforce_pp", "online_dpo"):
        raise ValueError(f"--algo {cfg.algo!r}: expected ppo, grpo, rloo, reinforce_pp or online_dpo")
    if cfg.loss not in ("ppo", "cispo", "sapo"):
        raise ValueError(f"--loss {cfg.loss!r}: expected ppo, cispo or sapo")
    if cfg.importance_level not in ("token", "sequence") or (cfg.importance_level == "sequence" and cfg.loss != "ppo"):
        raise ValueError(f"--importance-level {cfg.importance_level!r}: expected token, or sequence with --loss ppo")
    if cfg.kl_estimator not in ("", "k1", "k2", "k3"):
        raise ValueError(f"--kl-estimator {cfg.kl_estimator!r}: expected k1, k2 or k3")
    if cfg.algo != "ppo" and cfg.group_size < 2:
        raise ValueError(f"--algo {cfg.algo} needs --group-size >= 2 (advantages are relative to the group)")
    n_rollout = cfg.prompts_per_step * cfg.group_size
    if n_rollout % cfg.minibatches:
        raise ValueError(f"prompts_per_step * group_size = {n_rollout} must divide into {cfg.minibatches} minibatches")
    if cfg.algo == "online_dpo":
        if cfg.group_size % 2 or (n_rollout // cfg.minibatches) % 2:
            raise ValueError("--algo online_dpo pairs consecutive completions: --group-size and the minibatch size "
                             f"(prompts_per_step * group_size / minibatches = {n_rollout / cfg.minibatches:g}) must be even")
        if cfg.dpo_loss not in losses.DPO_LOSS_TYPES:
            raise ValueError(f"--dpo-loss {cfg.dpo_loss!r}: expected one of {', '.join(losses.DPO_LOSS_TYPES)}")
        if not cfg.beta:
            raise ValueError("--algo online_dpo needs a reference: --beta > 0 (DPO's beta)")
    # where the KL penalty goes, and how it is estimated (defaults: today's PPO / GRPO recipes)
    kl_in_reward = cfg.algo in ("ppo", "reinforce_pp") if cfg.kl_in_reward is None else cfg.kl_in_reward
    kl_estimator = cfg.kl_estimator or ("k1" if kl_in_reward else "k3")

    # ---- data
    model_dir = cfg.model or common.ensure_sft_model(dist, cfg.seed)
    tok = chat.load_tokenizer(model_dir, cfg.chat_format or None, cfg.system_prompt or None, cfg.chat_template_kwargs)
    for t in filter(None, cfg.stop_tokens.split(",")):
        if tok.tokenizer.token_to_id(t) is None:
            raise ValueError(f"--stop-tokens: {t!r} is not a single token of {model_dir}'s tokenizer")
        tok.stop_ids.append(tok.tokenizer.token_to_id(t))
    reward_fn, needs = load_reward_fn(cfg.reward_fn or "data.task:reward_fn") if not cfg.reward_model else (None, [])
    if cfg.data:
        prompt_file, held_out = cfg.data, []
    else:
        tdir = task.ensure_task(task.TASK_DIR)
        prompt_file = os.path.join(tdir, "train.jsonl")
        held_out = formats.load_prompts(os.path.join(tdir, "test.jsonl"))[:cfg.eval_samples]
    # {"prompt_ids", "record"}: tokenized once into the data cache, memory-mapped
    prompts = common.load_data(prompt_file, "prompts", tok, cfg, dist, max_prompt_length=cfg.max_prompt_length,
                              required=needs)

    # ---- models
    policy = common.load_model(model_dir, cfg, dist, adapt=True)
    ref = None
    if cfg.beta and cfg.lora_r and not cfg.ref_model:
        ref = policy  # the policy with its adapters off (lora.adapters_disabled): no second copy
    elif cfg.beta:
        ref = common.load_model(cfg.ref_model or model_dir, cfg, dist, train=False).eval()
    rm = common.load_model(cfg.reward_model, cfg, dist, head="score", train=False).eval() \
        if cfg.reward_model else None
    critic = None
    if cfg.algo == "ppo":
        # with LoRA: its own frozen copy of the base, its own adapters and a trained score head
        critic = common.load_model(cfg.value_model or cfg.reward_model or model_dir, cfg, dist, head="score",
                                   adapt=True, modules_to_save=("score",), seed=cfg.seed)
    opt = common.make_optimizer(policy, cfg, dist)
    vopt = common.make_optimizer(critic, cfg, dist) if critic is not None else None
    if vopt is not None:
        for g in vopt.param_groups:
            g["lr"] = cfg.value_lr
    parts = {"policy": (policy, opt), **({"critic": (critic, vopt)} if critic is not None else {})}
    start = common.resume(cfg, dist, parts)
    log = common.Logger(cfg, dist, start)

    def evaluate(step):
        if held_out:
            acc = common.eval_accuracy(policy, tok, held_out, dist, task.is_correct, cfg.max_new_tokens)
            log.log(step, {"eval/accuracy": acc})

    if start == 0:
        evaluate(0)
    # ---- loop (from here on, SIGTERM means: checkpoint at the end of this step, then exit)
    preempt = common.Preemption()
    for step in range(start, cfg.max_steps):
        # ---- rollout: sample group_size completions for each of this rank's prompts
        t0 = time.time()
        idx = batching.batch_indices(len(prompts), cfg.prompts_per_step, cfg.seed, step, dist.rank, dist.world)
        picked = [prompts[i] for i in idx]
        rows = [p["prompt_ids"] for p in picked for _ in range(cfg.group_size)]
        ids, pmask = batching.collate_prompts(rows, tok.pad_id)
        ids, pmask = ids.to(dist.device), pmask.to(dist.device)
        # the samples are a function of (seed, step, rank): different on each rank, the same on resume
        g = torch.Generator(dist.device).manual_seed((cfg.seed * 100_003 + step) * 1009 + dist.rank)
        policy.eval()
        with torch.no_grad(), common.unsharded(policy), common.autocast(dist):
            seqs, cmask = M.generate(policy, ids, pmask, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                                     cfg.top_p, eos_ids=tok.stop_ids, pad_id=tok.pad_id, generator=g)
        policy.train()
        t_gen = time.time() - t0
        P = ids.shape[1]
        attn = torch.cat([pmask, cmask], 1)
        cmaskf = cmask.float()
        texts = [tok.tokenizer.decode([t for t, k in zip(r, m) if k], skip_special_tokens=True)
                 for r, m in zip(seqs[:, P:].tolist(), cmask.tolist())]
        ended = torch.tensor([any(t in tok.stop_ids for t, k in zip(r, m) if k)
                              for r, m in zip(seqs[:, P:].tolist(), cmask.tolist())], device=dist.device)

        # ---- score, old log-probs, reference, values (no grad)
        with torch.no_grad():
            if rm is not None:
                last = P + cmask.sum(-1) - 1  # the last completion token (prompts are left-padded)
                with common.autocast(dist):
                    scores = rm(seqs, attn)[torch.arange(len(rows), device=dist.device), last].float()
            else:
                recs = [p["record"] for p in picked for _ in range(cfg.group_size)]
                keys = dict.fromkeys(k for r in recs for k in r if k != "prompt")  # every record's extra fields
                fields = {k: [r.get(k) for r in recs] for k in keys}
                scores = torch.tensor(reward_fn([r["prompt"] for r in recs], texts, **fields),
                                      dtype=torch.float32, device=dist.device)
            raw_scores = scores.clone()
            if cfg.missing_eos_penalty:
                scores = scores - cfg.missing_eos_penalty * (~ended).float()
            old_logps, entropy = completion_logps(policy, seqs, attn, P, dist, cfg, entropy=True)
            with lora.adapters_disabled(ref) if ref is not None else nullcontext():
                ref_logps = completion_logps(ref, seqs, attn, P, dist, cfg) if ref is not None else old_logps
            kl = losses.kl_penalty(old_logps, ref_logps, "k1")  # per token, for the log
            # per-token KL penalty for the reward (zero when the KL goes into the loss instead)
            penalty = cfg.beta * losses.kl_penalty(old_logps, ref_logps, kl_estimator) * cmaskf if kl_in_reward \
                else torch.zeros_like(cmaskf)
            last = cmask.sum(-1) - 1
            if cfg.algo == "ppo":
                old_values = completion_values(critic, seqs, attn, P, dist)
                rewards = -penalty
                rewards[torch.arange(len(rows), device=dist.device), last] += scores
                advantages, returns = losses.gae(rewards, old_values, cmaskf, cfg.gamma, cfg.lam)
                if cfg.whiten:
                    advantages = losses.masked_whiten(advantages, cmaskf)
            elif cfg.algo == "reinforce_pp":
                # REINFORCE++ with the group-mean baseline: score - mean of its group on the last
                # token, the KL per token, returns-to-go, then one normalisation over all ranks' tokens
                rewards = -penalty
                rewards[torch.arange(len(rows), device=dist.device), last] += \
                    losses.group_advantages(scores, cfg.group_size, scale=False)
                returns_to_go = losses.discounted_returns(rewards, cmaskf, cfg.gamma)
                n = common.all_sum(cmaskf.sum(), dist)
                mean = common.all_sum((returns_to_go * cmaskf).sum(), dist) / n
                var = common.all_sum(((returns_to_go - mean) ** 2 * cmaskf).sum(), dist) / max(n - 1, 1)
                advantages = losses.masked_whiten(returns_to_go, cmaskf, mean=mean, var=var)
            elif cfg.algo == "online_dpo":
                # pairs (0, 1), (2, 3), ... of each prompt's completions; +1 marks the chosen
                # completion, -1 the rejected one, 0 both of a tie (no preference, no loss)
                diff = scores.view(-1, 2)[:, 0] - scores.view(-1, 2)[:, 1]
                advantages = torch.stack([diff.sign(), -diff.sign()], 1).view(-1, 1) * cmaskf
            else:
                sequence_scores = scores - penalty.sum(-1)  # the whole sequence's KL, when in the reward
                adv = losses.group_advantages(sequence_scores, cfg.group_size, cfg.scale_rewards) \
                    if cfg.algo == "grpo" else losses.rloo_advantages(sequence_scores, cfg.group_size)
                advantages = adv[:, None] * cmaskf

        if cfg.record_rollout and step == start and dist.main:
            torch.save({"scores": scores, "old_logps": old_logps, "ref_logps": ref_logps, "mask": cmaskf,
                        "advantages": advantages, "seqs": seqs, "prompt_len": P,
                        **({"values": old_values, "returns": returns} if cfg.algo == "ppo" else {})}, cfg.record_rollout)

        # ---- policy (and value) updates over minibatches of the rollout
        stats = {}
        mb_size = len(rows) // cfg.minibatches
        for epoch in range(cfg.ppo_epochs):
            g_order = torch.Generator().manual_seed(cfg.seed + 7919 * step + epoch)
            if cfg.algo == "online_dpo":  # shuffle pairs, keeping each pair's two rows together
                order = (torch.randperm(len(rows) // 2, generator=g_order)[:, None] * 2 + torch.arange(2)).view(-1)
            else:
                order = torch.randperm(len(rows), generator=g_order)
            for k in range(cfg.minibatches):
                mb = order[k * mb_size:(k + 1) * mb_size].to(dist.device)
                s, a, m = seqs[mb], attn[mb], cmaskf[mb]
                logps = completion_logps(policy, s, a, P, dist, cfg)
                # "dapo": the token mean over the minibatch on all ranks (FSDP then averages over ranks)
                n_tok = common.all_sum(m.sum().item(), dist) / dist.world
                agg = dict(agg=cfg.loss_agg, max_len=cfg.max_new_tokens, num_tokens=n_tok)
                if cfg.algo == "online_dpo":
                    pg_loss, st = online_dpo_objective(logps, ref_logps[mb], advantages[mb, 0], m, dist, cfg)
                elif cfg.loss == "cispo":
                    pg_loss, st = losses.cispo_loss(logps, old_logps[mb], advantages[mb], m, cfg.cispo_max_ratio, **agg)
                elif cfg.loss == "sapo":
                    pg_loss, st = losses.sapo_loss(logps, old_logps[mb], advantages[mb], m, cfg.sapo_tau_pos,
                                                   cfg.sapo_tau_neg, **agg)
                else:
                    pg_loss, st = losses.ppo_policy_loss(logps, old_logps[mb], advantages[mb], m, cfg.clip_eps,
                                                         cfg.clip_eps_high or None, **agg, level=cfg.importance_level)
                loss = pg_loss
                if not kl_in_reward and ref is not None and cfg.algo != "online_dpo":
                    # GRPO's KL term, aggregated like the policy loss
                    kl_term = losses.policy_gradient_loss(losses.kl_penalty(logps, ref_logps[mb], kl_estimator), m, **agg)
                    loss = loss + cfg.beta * kl_term
                common.check_finite(common.all_sum(loss.item(), dist), step, "policy loss")
                loss.backward()
                st = {k2: float(v) for k2, v in st.items()}
                st["policy_loss"] = pg_loss.item()
                st["grad_norm"] = common.optimizer_step(policy, opt, step, cfg)
                if critic is not None:
                    values = completion_values(critic, s, a, P, dist)
                    vf_loss, vst = losses.ppo_value_loss(values, old_values[mb], returns[mb], m, cfg.vf_clip)
                    (cfg.vf_coef * vf_loss).backward()
                    for g in vopt.param_groups:
                        g["lr"] = cfg.value_lr
                    common.clip_grad_norm(critic, cfg.grad_clip, step, "value grad_norm")
                    vopt.step()
                    vopt.zero_grad(set_to_none=True)
                    st["value_loss"], st["vf_clipfrac"] = vf_loss.item(), vst["vf_clipfrac"].item()
                for k2, v in st.items():
                    stats[k2] = stats.get(k2, 0.0) + v / (cfg.ppo_epochs * cfg.minibatches)

        # ---- log (means over all ranks' rollouts)
        n_tok = cmaskf.sum()
        metrics = {
            "reward": raw_scores.mean().item(), "reward_std": raw_scores.std().item(),
            "kl": (losses.masked_mean(kl, cmaskf)).item(), "entropy": losses.masked_mean(entropy, cmaskf).item(),
            "response_length": cmaskf.sum(-1).mean().item(), "truncated": (~ended).float().mean().item(), **stats,
        }
        if cfg.algo == "ppo":
            var_r = losses.masked_mean((returns - losses.masked_mean(returns, cmaskf)) ** 2, cmaskf)
            var_e = losses.masked_mean((returns - old_values - losses.masked_mean(returns - old_values, cmaskf)) ** 2, cmaskf)
            metrics["explained_variance"] = (1 - var_e / var_r.clamp(min=1e-8)).item()
        metrics = {k: common.all_sum(v, dist) / dist.world for k, v in metrics.items()}
        t_all = time.time() - t0
        metrics["gen_tokens_per_s"] = common.all_sum(n_tok.item(), dist) / max(t_gen, 1e-9)
        metrics["train_tokens_per_s"] = common.all_sum(attn.sum().item() * cfg.ppo_epochs, dist) / max(t_all - t_gen, 1e-9)
        if (step + 1) % cfg.log_every == 0 or step == start:
            log.log(step + 1, metrics)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.max_steps:
            evaluate(step + 1)
        if common.checkpoint_or_stop(step + 1, cfg, dist, preempt, parts):
            return

    # ---- eval and save
    evaluate(cfg.max_steps)
    common.save_final(policy, cfg, dist, model_dir, model_dir)


if __name__ == "__main__":
    main(common.parse_config(PPOConfig))
