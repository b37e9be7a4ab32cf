"""
Online RL for language models: PPO (actor-critic) and the critic-free GRPO and RLOO, one loop.

    torchrun --standalone --nproc_per_node 2 train_ppo.py                 # GRPO on the built-in task
    torchrun --standalone --nproc_per_node 2 train_ppo.py --algo ppo
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
                                   |
            ppo_epochs x minibatches: clipped policy loss (+ beta * k3 KL for GRPO/RLOO)
                                      (+ clipped value loss, PPO)
"""
import importlib
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
    """Online RL: PPO, GRPO, RLOO."""
    algo: str = "grpo"           # ppo | grpo | rloo
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
    value_lr: float = 1e-3
    warmup_steps: int = 0
    beta: float = 0.02           # KL coefficient (PPO: in the reward; GRPO/RLOO: k3 loss term); 0 = no reference
    clip_eps: float = 0.2
    clip_eps_high: float = 0.0   # DAPO clip-higher; 0 = same as clip_eps
    loss_agg: str = "dapo"       # grpo | dr_grpo | dapo
    scale_rewards: bool = True   # GRPO std normalisation (False = Dr. GRPO)
    vf_coef: float = 0.5
    vf_clip: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True          # PPO: whiten advantages over the rollout
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 16     # response length cap
    max_prompt_length: int = 128
    missing_eos_penalty: float = 0.0  # subtracted from the score of completions that never emitted EOS
    stop_tokens: str = ""        # more tokens that end a completion, comma-separated (EOS and end-of-turn always do)
    eval_every: int = 10
    eval_samples: int = 256
    log_every: int = 1
    record_rollout: str = ""     # save the first rollout's tensors (rank 0) to this file: tests, debugging


def load_reward_fn(spec):
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"--reward-fn {spec!r}: expected module:function, e.g. data.task:reward_fn")
    return getattr(importlib.import_module(module), name)


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


def completion_values(critic, seqs, attn, P, dist):
    """Values [N, L]: the critic's estimate at the state before each completion token."""
    with common.autocast(dist):
        return critic(seqs, attn)[:, P - 1:-1].float()


def main(cfg: PPOConfig):
    # ---- setup
    dist = common.setup(cfg)
    if cfg.algo not in ("ppo", "grpo", "rloo"):
        raise ValueError(f"--algo {cfg.algo!r}: expected ppo, grpo or rloo")
    if cfg.algo != "ppo" and cfg.group_size < 2:
        raise ValueError(f"--algo {cfg.algo} needs --group-size >= 2 (advantages are relative to the group)")
    n_rollout = cfg.prompts_per_step * cfg.group_size
    if n_rollout % cfg.minibatches:
        raise ValueError(f"prompts_per_step * group_size = {n_rollout} must divide into {cfg.minibatches} minibatches")

    # ---- data
    model_dir = cfg.model or common.ensure_sft_model(dist, cfg.seed)
    tok = chat.load_tokenizer(model_dir, cfg.chat_format or None, cfg.system_prompt or None)
    for t in filter(None, cfg.stop_tokens.split(",")):
        if tok.tokenizer.token_to_id(t) is None:
            raise ValueError(f"--stop-tokens: {t!r} is not a single token of {model_dir}'s tokenizer")
        tok.stop_ids.append(tok.tokenizer.token_to_id(t))
    if cfg.data:
        prompts = formats.load_prompts(cfg.data)
        held_out = []
    else:
        tdir = task.ensure_task(task.TASK_DIR)
        prompts = formats.load_prompts(os.path.join(tdir, "train.jsonl"))
        held_out = formats.load_prompts(os.path.join(tdir, "test.jsonl"))[:cfg.eval_samples]
    prompt_ids = [chat.tokenize_prompt(p, tok, cfg.max_prompt_length) for p in prompts]
    reward_fn = load_reward_fn(cfg.reward_fn or "data.task:reward_fn") if not cfg.reward_model else None

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
    start = 0
    if cfg.resume and (ckpt := common.latest_checkpoint(cfg.out)):
        start = common.load_checkpoint(ckpt, dist, parts)["step"]
        common.print0(f"resumed from {ckpt} at step {start}")
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
        rows = [prompt_ids[i] for i in idx for _ in range(cfg.group_size)]
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
        P, L = ids.shape[1], seqs.shape[1] - ids.shape[1]
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
                recs = [prompts[i] for i in idx for _ in range(cfg.group_size)]
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
            kl = losses.kl_penalty(old_logps, ref_logps, "k1")  # per token, for the PPO reward and the log
            if cfg.algo == "ppo":
                old_values = completion_values(critic, seqs, attn, P, dist)
                rewards = -cfg.beta * kl * cmaskf
                last = cmask.sum(-1) - 1
                rewards[torch.arange(len(rows), device=dist.device), last] += scores
                advantages, returns = losses.gae(rewards, old_values, cmaskf, cfg.gamma, cfg.lam)
                if cfg.whiten:
                    advantages = losses.masked_whiten(advantages, cmaskf)
            else:
                adv = losses.group_advantages(scores, cfg.group_size, cfg.scale_rewards) if cfg.algo == "grpo" \
                    else losses.rloo_advantages(scores, cfg.group_size)
                advantages = adv[:, None] * cmaskf

        if cfg.record_rollout and step == start and dist.main:
            torch.save({"scores": scores, "old_logps": old_logps, "ref_logps": ref_logps, "mask": cmaskf,
                        "advantages": advantages, "seqs": seqs, "prompt_len": P,
                        **({"values": old_values, "returns": returns} if cfg.algo == "ppo" else {})}, cfg.record_rollout)

        # ---- policy (and value) updates over minibatches of the rollout
        stats = {}
        mb_size = len(rows) // cfg.minibatches
        for epoch in range(cfg.ppo_epochs):
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed + 7919 * step + epoch))
            for k in range(cfg.minibatches):
                mb = order[k * mb_size:(k + 1) * mb_size].to(dist.device)
                s, a, m = seqs[mb], attn[mb], cmaskf[mb]
                logps = completion_logps(policy, s, a, P, dist, cfg)
                # "dapo": the token mean over the minibatch on all ranks (FSDP then averages over ranks)
                n_tok = common.all_sum(m.sum().item(), dist) / dist.world
                agg = dict(agg=cfg.loss_agg, max_len=cfg.max_new_tokens, num_tokens=n_tok)
                pg_loss, st = losses.ppo_policy_loss(logps, old_logps[mb], advantages[mb], m, cfg.clip_eps,
                                                     cfg.clip_eps_high or None, **agg)
                loss = pg_loss
                if cfg.algo != "ppo" and ref is not None:  # GRPO's KL term, aggregated like the policy loss
                    kl_term = losses.policy_gradient_loss(losses.kl_penalty(logps, ref_logps[mb], "k3"), m, **agg)
                    loss = loss + cfg.beta * kl_term
                loss.backward()
                st = {k2: v.item() for k2, v in st.items()}
                st["policy_loss"] = pg_loss.item()
                st["grad_norm"] = common.optimizer_step(policy, opt, step, cfg)
                if critic is not None:
                    values = completion_values(critic, s, a, P, dist)
                    vf_loss, vst = losses.ppo_value_loss(values, old_values[mb], returns[mb], m, cfg.vf_clip)
                    (cfg.vf_coef * vf_loss).backward()
                    for g in vopt.param_groups:
                        g["lr"] = cfg.value_lr
                    torch.nn.utils.clip_grad_norm_([p for p in critic.parameters() if p.grad is not None],
                                                   cfg.grad_clip or float("inf"))
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
        common.check_finite(metrics["policy_loss"], step)
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
