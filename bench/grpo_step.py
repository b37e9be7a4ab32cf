"""
One GRPO step on a real checkpoint through train_ppo.py's own stages (sample -> score ->
advantages -> update), timed stage by stage; compare bench/grpo_step_trl.py (TRL's GRPOTrainer on
the same work, bench/grpo_work.py: 8 prompts x 8 completions of exactly 24 new tokens, beta 0, one
optimizer step per rollout, fp32, no gradient checkpointing).

    python bench/grpo_step.py                      # SmolLM2-135M-Instruct, 3 timed steps after 1 warmup
    python bench/grpo_step.py --minibatches 2      # a second optimizer step per rollout: old log-probs need their own forward

Prints one JSON line: the median step time and each stage's median, the settings, and the MFU:
the FLOPs the step executes (2 x non-embedding parameters per token processed: sampling's prefill
and decode, the update's forward x 3 for its backward, with each group's prompt counted once where
--share-prompt computes it once; plus the LM head where logits are taken; attention, ~2% at this
shape, left out) over a 4096 x 576 x 1536 fp32 matmul's FLOP/s measured in the same process.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import train_ppo  # noqa: E402
from data import chat  # noqa: E402
from grpo_work import PROMPTS, SETTINGS, reward  # noqa: E402
import timing  # noqa: E402
from timing import DEFAULT_MODEL, machine  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--model", default=DEFAULT_MODEL, help="a Hugging Face model directory")
p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--minibatches", type=int, default=SETTINGS["minibatches"])
p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default")
p.add_argument("--share-prompt", type=int, default=1, help="1: each group's prompt computed once (train_ppo's default)")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)

s = {k: v for k, v in SETTINGS.items() if k != "every_completion_max_new_tokens"}
cfg = train_ppo.PPOConfig(**{**s, "minibatches": a.minibatches}, model=a.model, out="/tmp/nanotrl-bench-grpo",
                          overwrite=True, warmup_steps=0, share_prompt=bool(a.share_prompt))
dist = common.setup(cfg)
kl_in_reward, kl_estimator = False, "k3"  # GRPO's defaults (beta 0: no KL at all)
tok = common.load_tokenizer(a.model, cfg)
tok.stop_ids = []  # no EOS stop: every completion is max_new_tokens long, as TRL's with min_new_tokens
picked = [{"prompt_ids": chat.tokenize_prompt({"prompt": q}, tok, cfg.max_prompt_length), "record": {"prompt": q}}
          for q in PROMPTS]
t = time.perf_counter()
policy = common.load_model(a.model, cfg, dist, adapt=True)
load_s = time.perf_counter() - t
opt = common.make_optimizer(policy, cfg)
ref = critic = vopt = None  # beta 0: no reference model

times = {k: [] for k in ("step", "sample", "score", "advantages", "update")}
for step in range(a.warmup + a.steps):
    t0 = time.perf_counter()
    samples = train_ppo.sample(policy, tok, picked, cfg, dist, step)
    t1 = time.perf_counter()
    scores, raw = train_ppo.score(samples, picked, cfg, dist, reward, None)
    t2 = time.perf_counter()
    rollout = train_ppo.advantages(samples, scores, raw, policy, ref, critic, cfg, dist, kl_in_reward, kl_estimator)
    t3 = time.perf_counter()
    train_ppo.update(rollout, policy, opt, ref, critic, vopt, cfg, dist, step, kl_in_reward, kl_estimator)
    t4 = time.perf_counter()
    assert samples.mask.sum().item() == len(PROMPTS) * cfg.group_size * cfg.max_new_tokens
    if step >= a.warmup:
        for k, v in zip(times, (t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(v)

# the FLOPs executed (see the docstring), from the last step's shapes
c, G, n_prompts = policy.cfg, cfg.group_size, len(PROMPTS)
body = sum(p.numel() for n, p in policy.named_parameters() if "embed" not in n and "lm_head" not in n)
head = 2 * c.vocab_size * c.hidden_size
P, L, n_rows = samples.prompt_len, cfg.max_new_tokens, n_prompts * G
prompt_rows = n_prompts if cfg.share_prompt else n_rows
sample_flops = 2 * body * (prompt_rows * P + n_rows * (L - 1)) + head * (prompt_rows + n_rows * (L - 1))
update_flops = 3 * (2 * body * (prompt_rows * P + n_rows * L) + head * n_rows * L)
peak = timing.matmul_flops_per_s()
step_s = statistics.median(times["step"])
rec = {"impl": "nanotrl", "step_s": round(step_s, 3),
       **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items() if k != "step"},
       "steps_all_s": [round(x, 3) for x in times["step"]], "load_s": round(load_s, 3),
       "old_logps_from_update": train_ppo.old_logps_from_update(cfg, kl_in_reward, ref),
       "prompt_len": samples.prompt_len, "completion_tokens": int(samples.mask.sum().item()),
       "share_prompt": cfg.share_prompt, "step_tflop": round((sample_flops + update_flops) / 1e12, 3),
       "peak_gflops_4096x576x1536": round(peak / 1e9, 1),
       "mfu": round((sample_flops + update_flops) / step_s / peak, 3),
       "mfu_update": round(update_flops / statistics.median(times["update"]) / peak, 3),
       "mfu_sample": round(sample_flops / statistics.median(times["sample"]) / peak, 3),
       "settings": {**SETTINGS, "minibatches": a.minibatches}, "threads": torch.get_num_threads(),
       "machine": machine()}
print(json.dumps(rec), flush=True)
