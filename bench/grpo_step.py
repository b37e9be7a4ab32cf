"""
One GRPO step on a real checkpoint through train_ppo.py's own stages (rollout -> score ->
advantages -> update; "sample" below is the rollout), timed stage by stage; compare
bench/grpo_step_trl.py (TRL's GRPOTrainer on the same work, bench/grpo_work.py: 8 prompts x 8
completions of exactly 24 new tokens, beta 0, one optimizer step per rollout, fp32 on a CPU and
bf16 autocast on a GPU, no gradient checkpointing).

    python bench/grpo_step.py                      # SmolLM2-135M-Instruct, 3 timed steps after 1 warmup
    python bench/grpo_step.py --minibatches 2      # a second optimizer step per rollout: old log-probs need their own forward
    python bench/grpo_step.py --shape qwen2.5-0.5b # random weights of a shape (bench/shapes.py): nothing to download

Prints one JSON line: the median step time and each stage's median, the settings, and the MFU:
the FLOPs the step executes (2 x non-embedding parameters per token processed: sampling's prefill
and decode, the update's forward x 3 for its backward, with each group's prompt counted once where
--share-prompt computes it once; plus the LM head where logits are taken; attention, ~2% at this
shape, left out) over a 4096 x 576 x 1536 matmul's FLOP/s measured in the same process, on the same
device in the model's dtype (fp32 on a CPU, bf16 on a GPU; there also over the datasheet peak).
Stage times are read after a synchronize on a GPU; peak_mem_mb is max_memory_allocated there, the
process's peak RSS on a CPU. --shape: the built-in task's character tokenizer (any ASCII prompt is
tokens; ids past its vocabulary decode to nothing), so the prompts are ~60 tokens, not ~40.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import engine  # noqa: E402
import hf_io  # noqa: E402
import model as M  # noqa: E402
import train_ppo  # noqa: E402
from data import chat, task  # noqa: E402
from grpo_work import PROMPTS, SETTINGS, reward  # noqa: E402
from shapes import SHAPES  # noqa: E402
import timing  # noqa: E402
from timing import DEFAULT_MODEL, machine, sync  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--model", default=DEFAULT_MODEL, help="a Hugging Face model directory")
p.add_argument("--shape", default="", choices=["", *sorted(SHAPES)],
               help="random weights of this shape with the built-in task's tokenizer, instead of --model")
p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--minibatches", type=int, default=SETTINGS["minibatches"])
p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default")
p.add_argument("--share-prompt", type=int, default=1, help="1: each group's prompt computed once (train_ppo's default)")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
if a.shape:  # a Hugging Face directory of random weights, loaded as a user's checkpoint is
    tmp = tempfile.mkdtemp(prefix="grpo_step-")
    net = M.Transformer(M.ModelConfig.from_hf({"max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                                               "eos_token_id": 2, "pad_token_id": 0, **SHAPES[a.shape]}))
    net.init_weights(seed=0)
    a.model = hf_io.save_pretrained(net, os.path.join(tmp, "model"), tokenizer_dir=task.ensure_task(os.path.join(tmp, "task")))
    del net

s = {k: v for k, v in SETTINGS.items() if k != "every_completion_max_new_tokens"}
cfg = train_ppo.PPOConfig(**{**s, "minibatches": a.minibatches}, model=a.model, out="/tmp/nanotrl-bench-grpo",
                          overwrite=True, warmup_steps=0, share_prompt=bool(a.share_prompt))
dist = common.setup(cfg)
kl_in_reward, kl_estimator = False, "k3"  # GRPO's defaults (beta 0: no KL at all)
tok = common.load_tokenizer(a.model, cfg)
tok.stop_ids = []  # no EOS stop: every completion is max_new_tokens long, as TRL's with min_new_tokens
picked = [{"prompt_ids": chat.tokenize_prompt({"prompt": q}, tok, cfg.max_prompt_length), "record": {"prompt": q}}
          for q in PROMPTS]
dev = dist.device
t = time.perf_counter()
policy = common.load_model(a.model, cfg, dist, adapt=True)
sync(dev)
load_s = time.perf_counter() - t
opt = common.make_optimizer(policy, cfg)
ref = None  # beta 0: no reference model
rl = train_ppo.RL(cfg, dist, tok, engine.Engine(policy, tok, dist), policy, opt, reward_fn=reward,
                  kl_in_reward=kl_in_reward, kl_estimator=kl_estimator)

times = {k: [] for k in ("step", "sample", "score", "advantages", "update")}
for step in range(a.warmup + a.steps):
    sync(dev)  # every clock read waits for the device: a stage's time is its kernels', not their launches'
    t0 = time.perf_counter()
    samples = train_ppo.rollout(rl, picked, step)
    sync(dev)
    t1 = time.perf_counter()
    scores, raw = train_ppo.score(rl, samples, picked)
    sync(dev)
    t2 = time.perf_counter()
    rollout = train_ppo.advantages(rl, samples, scores, raw)
    sync(dev)
    t3 = time.perf_counter()
    train_ppo.update(rl, rollout, step)
    sync(dev)
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
peak = timing.matmul_flops_per_s(device=dev, dtype=dist.autocast_dtype or torch.float32)
datasheet = timing.datasheet_flops(dev)
step_s = statistics.median(times["step"])
rec = {"impl": "nanotrl", "model": a.shape or a.model, "device": timing.device_name(dev),
       "dtype": str(dist.autocast_dtype or torch.float32).removeprefix("torch."), "step_s": round(step_s, 3),
       **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items() if k != "step"},
       "steps_all_s": [round(x, 3) for x in times["step"]], "load_s": round(load_s, 3),
       "old_logps_from_update": train_ppo.old_logps_from_update(cfg, kl_in_reward, ref),
       "prompt_len": samples.prompt_len, "completion_tokens": int(samples.mask.sum().item()),
       "share_prompt": cfg.share_prompt, "step_tflop": round((sample_flops + update_flops) / 1e12, 3),
       "peak_gflops_4096x576x1536": round(peak / 1e9, 1),
       "mfu": round((sample_flops + update_flops) / step_s / peak, 3),
       "mfu_update": round(update_flops / statistics.median(times["update"]) / peak, 3),
       "mfu_sample": round(sample_flops / statistics.median(times["sample"]) / peak, 3),
       "mfu_datasheet": round((sample_flops + update_flops) / step_s / datasheet, 4) if datasheet else None,
       "peak_mem_mb": timing.peak_mem_mb(dev),
       "settings": {**SETTINGS, "minibatches": a.minibatches}, "threads": torch.get_num_threads(),
       "machine": machine()}
print(json.dumps(rec), flush=True)
if a.shape:
    shutil.rmtree(tmp, ignore_errors=True)
