"""A stand-in training script for the sweep tests: takes --seed, --out, --lr, writes
metrics.jsonl with known values (final eval/accuracy = lr / 10 + seed / 100), and fails with a
worker-style traceback when --lr is negative."""
import argparse
import json
import os

p = argparse.ArgumentParser()
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default="runs/out")
p.add_argument("--lr", type=float, default=1.0)
p.add_argument("--tag", default="")
args = p.parse_args()
os.makedirs(args.out, exist_ok=True)
with open(os.path.join(args.out, "metrics.jsonl"), "w") as f:
    for step in (0, 5, 10):
        f.write(json.dumps({"step": step, "loss": 1.0 / (step + 1)}) + "\n")
        if args.lr < 0 and step == 5:
            raise ValueError(f"--lr {args.lr}: negative")
        # logged at 0, 5 and 10; the last record that has it is the final value
        f.write(json.dumps({"step": step, "eval/accuracy": args.lr / 10 * step / 10 + args.seed / 100}) + "\n")
print("done", args.tag)
