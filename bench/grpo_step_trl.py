"""
TRL's GRPOTrainer on the work of bench/grpo_step.py (bench/grpo_work.py: the same prompts, reward,
8 x 8 completions of exactly 24 new tokens, beta 0, one optimizer step per rollout, fp32, no
gradient checkpointing), timed per step by a callback.

TRL is not a dependency of nanotrl: it lives in a separate venv that reuses the main environment's
torch and transformers (check with `pip install --dry-run trl` that it changes neither):

    python -m venv --system-site-packages /work/benchenv && /work/benchenv/bin/pip install trl
    /work/benchenv/bin/python bench/grpo_step_trl.py

Prints one JSON line: the median step time (generation, scoring and the update: TRL does all of it
inside a training step) and the settings.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from grpo_work import PROMPTS, SETTINGS, reward  # noqa: E402
from timing import DEFAULT_MODEL, machine  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
p.add_argument("--model", default=DEFAULT_MODEL, help="a Hugging Face model directory")
p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
p.add_argument("--warmup", type=int, default=1)
p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = torch's default")
a = p.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)

import datasets  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402

n_steps = a.warmup + a.steps
S = SETTINGS
data = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for _ in range(n_steps) for q in PROMPTS])
args = trl.GRPOConfig(
    output_dir=tempfile.mkdtemp(), max_steps=n_steps, per_device_train_batch_size=S["prompts_per_step"] * S["group_size"],
    gradient_accumulation_steps=1, num_generations=S["group_size"], max_completion_length=S["max_new_tokens"],
    generation_kwargs={"min_new_tokens": S["max_new_tokens"]},  # EOS suppressed, as ours
    beta=S["beta"], num_iterations=S["ppo_epochs"], learning_rate=S["lr"], temperature=S["temperature"],
    epsilon=S["clip_eps"], loss_type=S["loss_agg"], gradient_checkpointing=S["grad_ckpt"], bf16=False, use_cpu=True,
    lr_scheduler_type="constant", logging_steps=1, report_to="none", save_strategy="no", seed=0,
    dataloader_num_workers=0, shuffle_dataset=False)


class Timer(transformers.TrainerCallback):
    def __init__(self):
        self.times, self.t = [], None

    def on_step_begin(self, *_, **__):
        self.t = time.perf_counter()

    def on_step_end(self, *_, **__):
        self.times.append(time.perf_counter() - self.t)


timer = Timer()
t = time.perf_counter()
trainer = trl.GRPOTrainer(model=a.model, reward_funcs=reward, args=args, train_dataset=data, callbacks=[timer])
load_s = time.perf_counter() - t
trainer.train()
steps = timer.times[a.warmup:]
lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
print(json.dumps({"impl": f"trl-{trl.__version__}", "step_s": round(statistics.median(steps), 3),
                  "steps_all_s": [round(x, 3) for x in steps], "load_s": round(load_s, 3),
                  "mean_completion_length": lengths[-1] if lengths else None,
                  "settings": {**SETTINGS, "steps_per_generation": args.steps_per_generation,
                               "transformers": transformers.__version__, "torch": torch.__version__},
                  "threads": torch.get_num_threads(), "machine": machine()}), flush=True)
