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

With --tools or --env a rollout is multi-turn episodes (agent.py): the model's turns, the tool or
environment messages between them, one token sequence each, whose mask marks the model's sampled
tokens only; every algorithm above trains on it unchanged (docs/agents.md).
"""
import dataclasses
import importlib
import inspect
import math
import numbers
import os
import sys
import time
from dataclasses import dataclass

import torch

import agent
import checkpoint
import collectives
import common
import config
import engine
import forward
import lora
import losses
from data import batching, task
from loop import Loop, accumulate, micro_batches


@dataclass
class PPOConfig(config.TrainConfig):
    """Online RL: --algo ppo | grpo | rloo | reinforce_pp | online_dpo; --loss ppo | cispo | sapo;
    --importance-level token | sequence (GSPO); --kl-estimator k1 | k2 | k3; --kl-in-reward."""
    algo: str = config.arg("grpo", "advantages / objective")
    loss: str = config.arg("ppo", "policy surrogate: ppo (clipped), cispo or sapo")
    importance_level: str = config.arg("token", "sequence = GSPO: one ratio per sequence (--loss ppo only)")
    model: str = config.arg("", "policy init (HF dir); default: the built-in task's SFT model (runs/sft)")
    ref_model: str = config.arg("", "KL reference; default: --model (with --lora-r: the policy with adapters off)")
    out: str = config.arg("runs/ppo", "output directory: metrics.jsonl, checkpoints/, final HF model")
    reward_fn: str = config.arg("", "module:function(prompts, completions, **fields) -> floats; built-in task: its "
                                    "verifier")
    reward_model: str = config.arg("", "HF dir with a score head (overrides --reward-fn)")
    value_model: str = config.arg("", "PPO critic init; default: --reward-model, else the policy with a fresh head")
    max_steps: int = config.arg(100, "rollout steps")
    prompts_per_step: int = config.arg(16, "prompts per rollout per process")
    group_size: int = config.arg(8, "completions per prompt (GRPO/RLOO need >= 2; PPO default 8 too)")
    ppo_epochs: int = config.arg(1, "passes over each rollout")
    minibatches: int = config.arg(2, "optimizer steps per pass")
    lr: float = config.arg(2e-4, "peak learning rate, reached after warmup")
    value_lr: float = config.arg(1e-3, "PPO critic's learning rate (constant)")
    warmup_steps: int = config.arg(0, "linear warmup from 0 to lr over N steps")
    beta: float = config.arg(0.02, "KL coefficient (online DPO: DPO's beta); 0 = no reference")
    kl_estimator: str = config.arg("", "empty = k1 in the reward, k3 in the loss")
    kl_in_reward: bool = config.arg(None, "KL penalty in the reward, else in the loss; unset = PPO, REINFORCE++ in "
                                          "the reward")
    cispo_max_ratio: float = config.arg(5.0, "--loss cispo: cap of the stop-gradient importance weight")
    sapo_tau_pos: float = config.arg(1.0, "--loss sapo: gate temperature for positive advantages")
    sapo_tau_neg: float = config.arg(1.05, "--loss sapo: ... and for negative ones")
    dpo_loss: str = config.arg("sigmoid", "--algo online_dpo: a losses.dpo_loss type")
    rpo_alpha: float = config.arg(1.0, "--algo online_dpo: + rpo_alpha * NLL(chosen) (RPO, as train_dpo.py); 0 = TRL's")
    clip_eps: float = config.arg(0.2, "PPO ratio clipping")
    clip_eps_high: float = config.arg(0.0, "DAPO clip-higher; 0 = same as clip_eps")
    loss_agg: str = config.arg("dapo", "how per-token losses are averaged (losses.policy_gradient_loss)")
    scale_rewards: bool = config.arg(True, "GRPO std normalisation (False = Dr. GRPO)")
    vf_coef: float = config.arg(0.5, "weight of the value loss")
    vf_clip: float = config.arg(0.2, "value clipping around the rollout's values")
    gamma: float = config.arg(1.0, "discount")
    lam: float = config.arg(0.95, "GAE lambda")
    whiten: bool = config.arg(True, "PPO: whiten advantages over the rollout")
    temperature: float = config.arg(1.0, "sampling temperature; 0 = greedy")
    top_k: int = config.arg(0, "sample among the k likeliest tokens; 0 = all")
    top_p: float = config.arg(1.0, "nucleus sampling")
    max_new_tokens: int = config.arg(16, "response length cap")
    max_prompt_length: int = config.arg(128, "prompt tokens kept (from the end)")
    share_prompt: bool = config.arg(True, "each group's prompt computed once in sampling and log-probs (single-turn, "
                                          "not online_dpo)")
    missing_eos_penalty: float = config.arg(0.0, "subtracted from the score of completions that never emitted EOS")
    stop_tokens: str = config.arg("", "more tokens that end a completion, comma-separated (EOS and end-of-turn always "
                                      "do)")
    tools: str = config.arg("", "multi-turn: functions the model may call, module:function,... (agent.py; "
                                "agent:calculator)")
    env: str = config.arg("", "multi-turn: an environment class, module:Class (agent.py's reset/step protocol)")
    max_tool_calls: int = config.arg(4, "--tools: calls per episode; a turn asking for more ends the episode "
                                        "unanswered")
    max_turns: int = config.arg(0, "multi-turn: model turns per episode (each up to --max-new-tokens); 0 = "
                                   "--max-tool-calls + 1")
    tool_timeout: float = config.arg(5.0, "--tools: seconds a call may run; then its error message is the result")
    describe_tools: bool = config.arg(True, "--tools: list them in a system message if the template has no tools "
                                            "variable")
    eval_data: str = config.arg("", "held-out prompts for eval/accuracy (mean --reward-fn of greedy answers); "
                                    "built-in task: its test split")
    eval_every: int = config.arg(10, "evaluate every N steps; 0 = only at the start and the end")
    eval_samples: int = config.arg(256, "built-in task: held-out prompts for eval/accuracy")
    log_every: int = config.arg(1, "progress line and metrics.jsonl every N steps")
    record_rollout: str = config.arg("", "save the first rollout's tensors (rank 0) to this file: tests, debugging")
    RANGES = {**config.TrainConfig.RANGES, "prompts_per_step": "[1, inf)", "group_size": "[1, inf)",
              "ppo_epochs": "[1, inf)", "minibatches": "[1, inf)", "value_lr": "(0, inf)", "clip_eps": "(0, inf)",
              "gamma": "[0, 1]", "lam": "[0, 1]", "top_p": "(0, 1]", "max_new_tokens": "[1, inf)",
              "max_prompt_length": "[1, inf)"}
    CHOICES = {**config.TrainConfig.CHOICES, "algo": ("grpo", "rloo", "reinforce_pp", "ppo", "online_dpo"),
               "loss": ("ppo", "cispo", "sapo"), "importance_level": ("token", "sequence"),
               "kl_estimator": ("", "k1", "k2", "k3"), "loss_agg": ("dapo", "grpo", "dr_grpo"),
               "dpo_loss": losses.DPO_LOSS_TYPES}
    NOT_USED = {"batch_size": "a rollout is --prompts-per-step x --group-size sequences per process",
                "max_length": "prompts are cut at --max-prompt-length, completions at --max-new-tokens"}
    REAL_MODEL = {"lr": 1e-6, "max_new_tokens": 256, "max_prompt_length": 512}  # TRL's GRPOConfig


def check_flags(cfg: PPOConfig):
    """The flag combinations the parser cannot check one by one."""
    if cfg.importance_level == "sequence" and cfg.loss != "ppo":
        raise common.UsageError("--importance-level sequence (GSPO) clips sequence ratios: it needs --loss ppo")
    if cfg.algo != "ppo" and cfg.group_size < 2:
        raise common.UsageError(f"--algo {cfg.algo} needs --group-size >= 2 (advantages are relative to the group)")
    rows = cfg.prompts_per_step * cfg.group_size
    if rows % (cfg.minibatches * cfg.grad_accum):
        raise common.UsageError(f"--prompts-per-step x --group-size = {rows} rows must divide into --minibatches "
                                f"{cfg.minibatches} x --grad-accum {cfg.grad_accum} micro-batches")
    if cfg.algo == "online_dpo":
        if cfg.group_size % 2 or (rows // (cfg.minibatches * cfg.grad_accum)) % 2:
            raise common.UsageError("--algo online_dpo pairs consecutive completions: --group-size and the micro-batch "
                                    "(prompts x group / minibatches / grad-accum) must be even")
        if not cfg.beta:
            raise common.UsageError("--algo online_dpo needs a reference: --beta > 0 (DPO's beta)")
    if cfg.data and not (cfg.reward_fn or cfg.reward_model or cfg.env):
        # the built-in verifier on other data scores every answer 0: nothing would be learned, silently
        raise common.UsageError(f"--data {cfg.data} is not the built-in task: say how to score its completions with "
                                "--reward-fn module:function (e.g. data.prepare_gsm8k:gsm8k_reward) or --reward-model DIR")


def load_reward_fn(spec):
    """The function and the record fields it requires: its parameters after (prompts, completions)
    without a default (data.task:reward_fn requires "answer"), checked on every record at load time."""
    module, _, name = spec.partition(":")
    if not name:
        raise common.UsageError(f"--reward-fn {spec!r}: expected module:function, e.g. data.task:reward_fn")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise common.UsageError(f"--reward-fn {spec}: cannot be loaded ({e}); it names a function "
                                "fn(prompts, completions, **fields) in an importable module") from None
    params = list(inspect.signature(fn).parameters.values())[2:]
    return fn, [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


@dataclass
class RL:
    """What the stages of a step read besides their own inputs: the run's settings, models and
    optimizers, built once in main()."""
    cfg: PPOConfig
    dist: common.Dist
    tok: object
    engine: engine.Engine     # samples with the policy (engine.py)
    policy: torch.nn.Module
    opt: torch.optim.Optimizer
    ref: torch.nn.Module = None     # the KL reference; None with --beta 0; the policy itself with --lora-r (adapters off)
    critic: torch.nn.Module = None  # PPO's value model, and its optimizer
    vopt: torch.optim.Optimizer = None
    reward_fn: object = None        # --reward-fn, or
    rm: torch.nn.Module = None      # --reward-model
    make_env: object = None         # multi-turn: one environment per episode (agent.py); None = single-turn
    kl_in_reward: bool = False      # where the KL penalty goes, and
    kl_estimator: str = "k3"        # how it is estimated


@dataclass
class Rollout:
    """One step's experience: what was sampled and everything the update reads (no gradient)."""
    samples: engine.Samples   # ids, masks and the engine's sampling (behaviour) log-probs
    scores: torch.Tensor      # [N] the reward of each completion (after --missing-eos-penalty)
    raw_scores: torch.Tensor  # [N] as the reward function / model gave it
    old_logps: torch.Tensor   # [N, L] of the policy that sampled; None: the update's first forward gives them
    ref_logps: torch.Tensor   # [N, L] of the reference; None without one
    entropy: torch.Tensor     # [N, L] of the sampling policy, for the log (None with old_logps)
    advantages: torch.Tensor  # [N, L]; online DPO: zeros (its signal is `pref`)
    pref: torch.Tensor = None        # [N] online DPO: +1 on a pair's chosen row, -1 on its rejected one, 0 on a tie
    old_values: torch.Tensor = None  # [N, L] PPO's critic at rollout time
    returns: torch.Tensor = None     # [N, L] PPO's value targets


# ----------------------------------------------------------------------------- the stages of a step

def rollout(rl: RL, picked, step, greedy=False) -> engine.Samples:
    """Rollout: --group-size completions for each of this rank's prompts; with --tools or --env,
    multi-turn episodes. The samples are a function of (seed, step, rank): different on each rank,
    the same on resume."""
    cfg, dist = rl.cfg, rl.dist
    g = torch.Generator(dist.device).manual_seed((cfg.seed * 100_003 + step) * 1009 + dist.rank)
    group, temperature = (1, 0.0) if greedy else (cfg.group_size, cfg.temperature)
    sampling = engine.Sampling(cfg.max_new_tokens, temperature, cfg.top_k, cfg.top_p)
    with common.unsharded(rl.policy):
        if rl.make_env is None:
            prompts = [p["prompt_ids"] for p in picked for _ in range(group)]
            return rl.engine.generate(prompts, sampling, g, group if cfg.share_prompt else 1)
        records = [p["record"] for p in picked for _ in range(group)]
        try:
            return rl.engine.episodes(records, rl.make_env, sampling, cfg.max_turns or cfg.max_tool_calls + 1, g)
        except ValueError as e:  # a template that is not prefix-preserving
            raise common.UsageError(str(e)) from None


def held_out_accuracy(rl: RL, held_out, reward_fn):
    """eval/accuracy: the mean reward of greedy answers (episodes) to the held-out prompts, split
    over ranks; with tools, also the share of episodes that called one."""
    dist = rl.dist
    mine, total, called = held_out[dist.rank::dist.world], 0.0, 0
    greedy = dataclasses.replace(rl, cfg=dataclasses.replace(rl.cfg, group_size=1, missing_eos_penalty=0),
                                 reward_fn=reward_fn, rm=None)
    for i in range(0, len(mine), 64):
        chunk = mine[i:i + 64]
        samples = rollout(greedy, chunk, 0, greedy=True)
        total += score(greedy, samples, chunk)[1].sum().item()
        if samples.episodes is not None:
            called += sum(getattr(e, "calls", 0) > 0 for e in samples.episodes.envs)
    n = max(len(held_out), 1)
    out = {"eval/accuracy": collectives.all_sum(total, dist) / n}
    return {**out, "eval/tool_call_rate": collectives.all_sum(called, dist) / n} if rl.cfg.tools else out


@torch.no_grad()
def score(rl: RL, samples, picked):
    """Score: the reward model's score at each completion's last token, or the reward function's
    of the decoded texts (with the record's fields). Returns (scores, raw scores) [N]."""
    cfg, dist = rl.cfg, rl.dist
    if rl.rm is not None:
        raw = forward.reward_model_scores(rl.rm, samples, dist)
        if not bool(torch.isfinite(raw).all()):  # a broken reward model, named, not a NaN loss blamed on --lr
            raise common.UsageError(f"--reward-model {cfg.reward_model} scored a completion {raw[~torch.isfinite(raw)][0]}: "
                                    "a reward must be a finite number")
    else:
        recs = [p["record"] for p in picked for _ in range(cfg.group_size)]
        keys = dict.fromkeys(k for r in recs for k in r if k != "prompt")  # every record's extra fields
        fields = {k: [r.get(k) for r in recs] for k in keys}
        ep = samples.episodes
        if ep is not None and callable(getattr(ep.envs[0], "reward", None)):  # the environment scores its episodes
            values = [env.reward(msgs, rec) for env, msgs, rec in zip(ep.envs, ep.messages, recs)]
            who = f"--env {cfg.env}: {type(ep.envs[0]).__name__}.reward"
        else:  # multi-turn: the last turn is the completion, and the whole conversation is given too
            values = rl.reward_fn([r["prompt"] for r in recs], samples.texts, **fields,
                                  **({"messages": ep.messages} if ep is not None else {}))
            who = f"--reward-fn {cfg.reward_fn or 'data.task:reward_fn'}"
        raw = torch.tensor(checked_rewards(values, len(recs), who), dtype=torch.float32, device=dist.device)
    return raw - cfg.missing_eos_penalty * (~samples.ended).float(), raw


def checked_rewards(values, n, who):
    """The user's rewards as n floats, or one line naming the function, what it returned and what
    was expected: a scalar would broadcast to every completion, None or a string would end in a
    tensor traceback, a NaN would be blamed on the learning rate two steps later."""
    expected = f"expected a list of {n} finite numbers, one per completion"
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise common.UsageError(f"{who} returned {type(values).__name__} {values!r:.60}; {expected}")
    values = list(values)
    if len(values) != n:
        raise common.UsageError(f"{who} returned {len(values)} values for {n} completions; {expected}")
    for i, v in enumerate(values):
        if isinstance(v, (str, bytes)) or not isinstance(v, numbers.Real) and not (torch.is_tensor(v) and v.numel() == 1):
            raise common.UsageError(f"{who} returned {type(v).__name__} {v!r:.40} for completion {i}; {expected}")
        if not math.isfinite(float(v)):
            raise common.UsageError(f"{who} returned {float(v)} for completion {i}; {expected}")
    return [float(v) for v in values]


def flat_rewards(raw_scores, dist, step, streak, warn_after=3):
    """The number of rollouts in a row whose rewards were all the same on every rank; at
    `warn_after` it says so: group-relative advantages are then zero and the policy learns nothing."""
    streak = streak + 1 if collectives.all_sum((raw_scores.max() - raw_scores.min()).item(), dist) == 0 else 0
    if streak == warn_after:
        collectives.print0(f"warning: step {step + 1}: every reward of the last {warn_after} rollouts was "
                           f"{raw_scores[0].item():g}: no spread, so no advantage to learn from. Check what --reward-fn / "
                           "--reward-model gives a few completions (metrics.jsonl: reward, reward_std)", file=sys.stderr)
    return streak


def old_logps_from_update(cfg: PPOConfig, kl_in_reward, ref):
    """With one optimizer step per rollout (--ppo-epochs 1 --minibatches 1, any --grad-accum) the
    update's forward runs the very weights that sampled, so its log-probs, detached, are the old
    ones: update() takes them there instead of a forward of its own here (TRL does the same when
    num_iterations is 1 and one generation batch is one optimizer step). Exact in exact arithmetic
    (ratio 1, the same gradient); in floating point the ratio is 1 where a separate forward gives
    1 +- ~1e-7. Not when the KL goes into the reward, which needs them before the update."""
    return cfg.ppo_epochs == 1 and cfg.minibatches == 1 and not (kl_in_reward and ref is not None)


def shared_group(cfg: PPOConfig):
    """The rows that share a prompt in the log-prob forwards (forward.shared_prompt_rows): a group."""
    return cfg.group_size if cfg.share_prompt and cfg.algo != "online_dpo" else 1


@torch.no_grad()
def advantages(rl: RL, samples, scores, raw_scores) -> Rollout:
    """Advantages: the old and reference log-probs (and PPO's values), the KL penalty where it
    goes into the reward, then the algorithm's advantage of every completion token. The old
    log-probs are left to the update's own forward when old_logps_from_update says so."""
    cfg, dist, mask, G = rl.cfg, rl.dist, samples.mask, shared_group(rl.cfg)
    old_logps = entropy = ref_logps = None
    if not old_logps_from_update(cfg, rl.kl_in_reward, rl.ref):
        old_logps, entropy = forward.completion_logps(rl.policy, samples, dist, cfg.chunk_size, cfg.temperature,
                                                      entropy=True, group=G)
    if rl.ref is not None:
        with lora.adapters_disabled(rl.ref):
            ref_logps = forward.completion_logps(rl.ref, samples, dist, cfg.chunk_size, cfg.temperature, group=G)
    penalty = cfg.beta * losses.kl_penalty(old_logps, ref_logps, rl.kl_estimator) * mask \
        if rl.kl_in_reward and rl.ref is not None else torch.zeros_like(mask)  # per token
    last = (torch.arange(len(mask), device=dist.device), mask.shape[1] - 1 - mask.flip(-1).argmax(-1))  # last model token
    old_values = returns = pref = None
    if cfg.algo == "ppo":  # GAE on (score at the last token - the KL per token), whitened
        old_values = forward.completion_values(rl.critic, samples, dist)
        rewards = -penalty
        rewards[last] += scores
        adv, returns = losses.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        adv = collectives.whiten_over_ranks(adv, mask, dist) if cfg.whiten else adv
    elif cfg.algo == "reinforce_pp":  # returns-to-go of (score - its group's mean, - KL per token), whitened
        rewards = -penalty
        rewards[last] += losses.group_advantages(scores, cfg.group_size, scale=False)
        adv = collectives.whiten_over_ranks(losses.discounted_returns(rewards, mask, cfg.gamma), mask, dist)
    elif cfg.algo == "online_dpo":  # pairs (0, 1), (2, 3), ... of a prompt's completions; ties: no preference
        diff = scores.view(-1, 2)[:, 0] - scores.view(-1, 2)[:, 1]
        pref, adv = torch.stack([diff.sign(), -diff.sign()], 1).view(-1), torch.zeros_like(mask)
    else:  # GRPO / RLOO: one advantage per sequence, from its group
        sequence_scores = scores - penalty.sum(-1)  # the whole sequence's KL, when in the reward
        adv = losses.group_advantages(sequence_scores, cfg.group_size, cfg.scale_rewards) \
            if cfg.algo == "grpo" else losses.rloo_advantages(sequence_scores, cfg.group_size)
        adv = adv[:, None] * mask
    return Rollout(samples, scores, raw_scores, old_logps, ref_logps, entropy, adv, pref, old_values, returns)


def online_dpo_objective(logps, ref_logps, pref, mask, totals, cfg: PPOConfig):
    """Online DPO's loss on a micro-batch of pairs: rows (2i, 2i + 1) are two completions of one
    prompt and pref [N] is +1 on the chosen row, -1 on the rejected one, 0 on both rows of a tie.
    Sums over pairs (and RPO's over chosen tokens) are divided by the step's totals["pairs"]
    (["chosen_tokens"]): every pair weighs the same wherever it is. Returns (loss, stats as
    loop.accumulate takes them)."""
    seq, ref_seq = (logps * mask).sum(-1), (ref_logps * mask).sum(-1)
    if cfg.dpo_loss in ("ipo", "sigmoid_norm"):  # defined on average per-token log-probs
        n = mask.sum(-1).clamp(min=1)
        seq, ref_seq = seq / n, ref_seq / n
    first = pref.view(-1, 2)[:, :1]
    keep = first[:, 0] != 0  # ties are dropped before the loss (AOT's sorting must not see them)
    col = (first < 0).long()  # [pairs, 1]: which row of the pair is the chosen one
    chosen = [x.view(-1, 2).gather(1, col).squeeze(1)[keep] for x in (seq, ref_seq)]
    rejected = [x.view(-1, 2).gather(1, 1 - col).squeeze(1)[keep] for x in (seq, ref_seq)]
    per_pair, cr, rr = losses.dpo_loss(chosen[0], rejected[0], chosen[1], rejected[1], cfg.beta, cfg.dpo_loss)
    loss = per_pair.sum() / totals["pairs"]
    if cfg.rpo_alpha:  # RPO's NLL of the chosen completions, a token mean over the step (see train_dpo.py)
        loss = loss - cfg.rpo_alpha * (logps * mask)[pref > 0].sum() / totals["chosen_tokens"]
    n = len(per_pair)  # loop.accumulate's metrics: (the micro-batch's mean, its weight), or a part of a sum
    return loss, {"pairs": float(n), "rewards/margins": ((cr - rr).mean().detach(), n),
                  "rewards/accuracies": ((cr > rr).float().mean(), n)}


def policy_objective(rl: RL, r: Rollout, logps, rows, totals):
    """The policy's loss on a micro-batch `rows` given its log-probs under the policy: the
    surrogate (+ beta * KL when it is not in the reward), or online DPO's pair loss. The old
    log-probs are the rollout's, or these, detached, when the update's forward is the old
    policy's (ratio 1). Returns (loss, stats as loop.accumulate takes them)."""
    cfg, m = rl.cfg, r.samples.mask[rows]
    if cfg.algo == "online_dpo":
        pg_loss, st = online_dpo_objective(logps, r.ref_logps[rows], r.pref[rows], m, totals, cfg)
        return pg_loss, {"policy_loss": pg_loss.detach(), **st}
    old = logps.detach() if r.old_logps is None else r.old_logps[rows]
    adv = r.advantages[rows]
    norm = dict(agg=cfg.loss_agg, max_len=cfg.max_new_tokens, num_tokens=totals["tokens"],
                num_sequences=totals["sequences"])
    if cfg.loss == "cispo":
        pg_loss, st = losses.cispo_loss(logps, old, adv, m, cfg.cispo_max_ratio, **norm)
    elif cfg.loss == "sapo":
        pg_loss, st = losses.sapo_loss(logps, old, adv, m, cfg.sapo_tau_pos, cfg.sapo_tau_neg, **norm)
    else:
        pg_loss, st = losses.ppo_policy_loss(logps, old, adv, m, cfg.clip_eps, cfg.clip_eps_high or None,
                                             level=cfg.importance_level, **norm)
    loss = pg_loss
    if not rl.kl_in_reward and rl.ref is not None:  # GRPO's KL term, aggregated like the policy loss
        kl = losses.kl_penalty(logps, r.ref_logps[rows], rl.kl_estimator)
        loss = loss + cfg.beta * losses.policy_gradient_loss(kl, m, **norm)
    # the surrogate is a part of the step's (a plain number, summed); the stats are micro-batch means
    return loss, {"policy_loss": pg_loss.detach(), **{k: (v.detach() if torch.is_tensor(v) else v, len(rows))
                                                     for k, v in st.items()}}


def update(rl: RL, r: Rollout, step):
    """Update: --ppo-epochs passes over the rollout in --minibatches optimizer steps (each of
    --grad-accum micro-batches, loop.accumulate), the policy's objective and PPO's critic on the
    same rows. Returns the stats (means over the optimizer steps) and, when r.old_logps is None
    (old_logps_from_update: one pass of one optimizer step), the log-probs and entropy [N, L] its
    forwards computed with the sampling weights, detached: the old policy's (else None)."""
    cfg, dist, s = rl.cfg, rl.dist, r.samples
    mask, n, G = s.mask, len(s.mask), shared_group(cfg)
    # micro-batches of whole groups where they divide into them: each prompt computed once in them too
    whole = G > 1 and s.episodes is None and (n // (cfg.minibatches * cfg.grad_accum)) % G == 0
    G = G if whole else 1
    deferred = r.old_logps is None
    first = {"logps": torch.zeros_like(mask), "entropy": torch.zeros_like(mask)} if deferred else None

    def count(rows):
        # tensors: loop.accumulate reads the step's counts once, not once per micro-batch
        pairs = (r.pref[rows].view(-1, 2)[:, 0] != 0).sum() if r.pref is not None else 0
        return {"tokens": mask[rows].sum(), "sequences": len(rows), "pairs": pairs,
                "chosen_tokens": (mask[rows] * (r.pref[rows] > 0)[:, None]).sum() if r.pref is not None else 0}

    def policy_loss(rows, totals):
        if deferred:  # the sampling weights' forward: its log-probs, detached, are the old ones (one pass)
            logps, entropy = forward.completion_logps(rl.policy, s, dist, cfg.chunk_size, cfg.temperature,
                                                      entropy=True, rows=rows, group=G)
            first["logps"][rows], first["entropy"][rows] = logps.detach(), entropy
        else:
            logps = forward.completion_logps(rl.policy, s, dist, cfg.chunk_size, cfg.temperature, rows=rows, group=G)
        return policy_objective(rl, r, logps, rows, totals)

    def value_loss(rows, totals):
        values = forward.completion_values(rl.critic, s, dist, rows=rows)
        vf_loss, vst = losses.ppo_value_loss(values, r.old_values[rows], r.returns[rows], mask[rows],
                                             cfg.vf_clip, num_tokens=totals["tokens"])
        return cfg.vf_coef * vf_loss, {"vf_clipfrac": (vst["vf_clipfrac"].detach(), len(rows))}

    stats = {}
    for epoch in range(cfg.ppo_epochs):
        g = torch.Generator().manual_seed(cfg.seed + 7919 * step + epoch)
        if cfg.algo == "online_dpo":  # shuffle pairs, keeping each pair's two rows together
            order = torch.randperm(n // 2, generator=g, device="cpu")[:, None] * 2 + torch.arange(2, device="cpu")
        elif whole:
            order = torch.randperm(n // G, generator=g, device="cpu")[:, None] * G + torch.arange(G, device="cpu")
        else:
            order = torch.randperm(n, generator=g, device="cpu")
        for mb in micro_batches(order.view(-1).to(dist.device), cfg.minibatches):
            micro = micro_batches(mb, cfg.grad_accum)
            st = accumulate(rl.policy, micro, dist, step, count, policy_loss, "policy loss")
            st["grad_norm"] = common.optimizer_step(rl.policy, rl.opt, step, cfg)
            if rl.critic is not None:
                vst = accumulate(rl.critic, micro, dist, step, count, value_loss, "value loss")
                st.update(value_loss=vst["loss"], vf_clipfrac=vst["vf_clipfrac"],
                          value_grad_norm=common.optimizer_step(rl.critic, rl.vopt, step, cfg, cfg.value_lr,
                                                                "value grad_norm"))
            st.pop("loss")
            for k, v in st.items():
                stats[k] = stats.get(k, 0.0) + v / (cfg.ppo_epochs * cfg.minibatches)
    return stats, first


def rollout_metrics(rl: RL, r: Rollout, t_gen, t_all):
    """Means over all ranks' rollouts, and throughput."""
    cfg, dist, mask = rl.cfg, rl.dist, r.samples.mask
    # KL(policy || reference) per completion token, logged as k3 = exp(d) - d - 1 with d = ref - policy
    # log-prob: >= 0 on every token, unbiased like k1 = -d, whose mean goes negative on a small batch
    kl = losses.kl_penalty(r.old_logps, r.ref_logps, "k3") if r.ref_logps is not None else torch.zeros_like(mask)
    metrics = {"reward": r.raw_scores.mean().item(), "reward_std": r.raw_scores.std().item(),
               "kl": losses.masked_mean(kl, mask).item(), "entropy": losses.masked_mean(r.entropy, mask).item(),
               "response_length": mask.sum(-1).mean().item(), "truncated": (~r.samples.ended).float().mean().item()}
    if cfg.algo == "ppo":
        err = r.returns - r.old_values
        var_r = losses.masked_mean((r.returns - losses.masked_mean(r.returns, mask)) ** 2, mask)
        var_e = losses.masked_mean((err - losses.masked_mean(err, mask)) ** 2, mask)
        metrics["explained_variance"] = (1 - var_e / var_r.clamp(min=1e-8)).item()
    if r.samples.episodes is not None:
        metrics.update(agent.episode_metrics(r.samples.episodes, r.samples))
    metrics = {k: v / dist.world for k, v in collectives.sum_over_ranks(metrics, dist).items()}
    metrics["gen_tokens_per_s"] = collectives.all_sum(mask.sum(), dist) / max(t_gen, 1e-9)
    metrics["train_tokens_per_s"] = collectives.all_sum(r.samples.attn.sum() * cfg.ppo_epochs, dist) / max(t_all - t_gen, 1e-9)
    return metrics


def record(r: Rollout, path):
    """--record-rollout: the first rollout's tensors, for tests and debugging."""
    torch.save({"scores": r.scores, "old_logps": r.old_logps, "ref_logps": r.ref_logps, "mask": r.samples.mask,
                "advantages": r.advantages, "seqs": r.samples.seqs, "prompt_len": r.samples.prompt_len,
                "behaviour_logps": r.samples.logps,
                **({"values": r.old_values, "returns": r.returns} if r.old_values is not None else {})}, path)


def main(cfg: PPOConfig):
    # ---- setup
    dist = common.setup(cfg)
    check_flags(cfg)
    # where the KL penalty goes, and how it is estimated (defaults: today's PPO / GRPO recipes)
    kl_in_reward = cfg.algo in ("ppo", "reinforce_pp") if cfg.kl_in_reward is None else cfg.kl_in_reward
    kl_estimator = cfg.kl_estimator or ("k1" if kl_in_reward else "k3")
    model_dir = cfg.model or task.stage(task.SFT_MODEL, "SFT model to start from (--model)")

    # ---- data
    tok = common.load_tokenizer(model_dir, cfg)
    for t in filter(None, cfg.stop_tokens.split(",")):
        if tok.tokenizer.token_to_id(t) is None:
            raise common.UsageError(f"--stop-tokens: {t!r} is not a single token of {model_dir}'s tokenizer")
        tok.stop_ids.append(tok.tokenizer.token_to_id(t))
    reward_fn, needs = load_reward_fn(cfg.reward_fn or "data.task:reward_fn") if not cfg.reward_model else (None, [])
    try:  # multi-turn: one environment per episode (agent.py); None = single-turn
        make_env = agent.make_env_factory(cfg.tools, cfg.env, cfg.max_tool_calls, cfg.tool_timeout, tok,
                                          cfg.describe_tools)
    except ValueError as e:
        raise common.UsageError(str(e)) from None
    tdir = None if cfg.data else task.ensure_task(task.TASK_DIR)
    prompt_file = cfg.data or os.path.join(tdir, "train.jsonl")
    eval_file = cfg.eval_data or ("" if cfg.data else os.path.join(tdir, "test.jsonl"))
    if cfg.eval_data and not cfg.reward_fn:
        raise common.UsageError("--eval-data: its greedy answers are scored by --reward-fn: give one")
    eval_fn = reward_fn or load_reward_fn("data.task:reward_fn")[0]  # with --reward-model: the task's verifier
    # {"prompt_ids", "record"}: tokenized once into the data cache, memory-mapped
    prompts = common.load_data(prompt_file, "prompts", tok, cfg, dist, max_prompt_length=cfg.max_prompt_length,
                               required=needs)
    held_out = list(common.load_data(eval_file, "prompts", tok, cfg, dist, max_prompt_length=cfg.max_prompt_length,
                                     required=needs))[:cfg.eval_samples] if eval_file else []

    # ---- models
    policy = common.load_model(model_dir, cfg, dist, adapt=True)
    ref = None
    if cfg.beta and cfg.lora_r and not cfg.ref_model:
        ref = policy  # the policy with its adapters off (lora.adapters_disabled): no second copy
    elif cfg.beta:
        ref = common.load_model(cfg.ref_model or model_dir, cfg, dist, train=False).eval()
    rm = common.load_model(cfg.reward_model, cfg, dist, head="score", train=False).eval() if cfg.reward_model else None
    critic = vopt = None
    if cfg.algo == "ppo":
        # with LoRA: its own frozen copy of the base, its own adapters and a trained score head
        critic = common.load_model(cfg.value_model or cfg.reward_model or model_dir, cfg, dist, head="score",
                                   adapt=True, modules_to_save=("score",), seed=cfg.seed)
        vopt = common.make_optimizer(critic, cfg, lr=cfg.value_lr)
    opt = common.make_optimizer(policy, cfg)
    rl = RL(cfg, dist, tok, engine.Engine(policy, tok, dist), policy, opt, ref, critic, vopt, reward_fn, rm, make_env,
            kl_in_reward, kl_estimator)

    def evaluate():
        return held_out_accuracy(rl, held_out, eval_fn) if held_out else {}

    # ---- loop: rollout -> score -> advantages -> update
    loop = Loop(cfg, dist, {"policy": (policy, opt), **({"critic": (critic, vopt)} if critic else {})}, evaluate)
    flat = 0
    for step in loop:
        t0 = time.time()
        picked = [prompts[i] for i in batching.batch_indices(len(prompts), cfg.prompts_per_step, cfg.seed, step,
                                                              dist.rank, dist.world)]
        samples = rollout(rl, picked, step)
        t_gen = time.time() - t0
        scores, raw_scores = score(rl, samples, picked)
        flat = flat_rewards(raw_scores, dist, step, flat)
        r = advantages(rl, samples, scores, raw_scores)
        stats, seen = update(rl, r, step)
        if r.old_logps is None:  # the update's first forward ran the sampling weights: its log-probs are the old ones
            r = dataclasses.replace(r, old_logps=seen["logps"], entropy=seen["entropy"])
        if cfg.record_rollout and step == loop.start and dist.main:
            record(r, cfg.record_rollout)
        loop.record({**rollout_metrics(rl, r, t_gen, time.time() - t0), **stats})

    # ---- save
    if loop.finished:
        checkpoint.save_final(policy, cfg, dist, model_dir, model_dir)


if __name__ == "__main__":
    common.run(main, PPOConfig)
