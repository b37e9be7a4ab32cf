"""Shared test utilities: run a training script as a subprocess (1 process or torchrun), read
its metrics, make a tiny model directory with the built-in task's tokenizer, and write small
synthetic preference data (train_dpo.py's and train_rm.py's tests)."""
import json
import os
import random
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_script(name, args, cwd, nproc=1, check=True, timeout=600):
    script = os.path.join(ROOT, name)
    cmd = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd + [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} {args} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def series(out, key):
    """{step: value} of one metric."""
    return {m["step"]: m[key] for m in metrics(out) if key in m}


def tiny_model_dir(path, seed=0, layers=2):
    """A random-init model with the built-in task's tokenizer and chat format, saved as HF."""
    import hf_io
    import model as M
    from data import task

    tdir = task.ensure_task(os.path.join(os.path.dirname(path), "task"))
    cfg = hf_io.read_config(tdir)
    cfg.num_layers = layers
    cfg.hf = dict(cfg.hf, num_hidden_layers=layers)
    m = M.Transformer(cfg)
    m.init_weights(seed=seed)
    return hf_io.save_pretrained(m, path, tokenizer_dir=tdir)


def write_pairs(path, n, seed):
    """Synthetic preferences learnable from scratch in a few dozen steps: for "Pick a number",
    chosen answers are made of the digits 1-4 and rejected ones of 6-9."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            x = "".join(rng.choice("1234") for _ in range(4))
            y = "".join(rng.choice("6789") for _ in range(4))
            f.write(json.dumps({"prompt": "Pick a number", "chosen": x, "rejected": y}) + "\n")
    return str(path)


def preference_setup(d):
    """A tiny model and 256 training / 64 held-out synthetic pairs (new strings) in directory d."""
    return {"model": tiny_model_dir(str(d / "init")), "train": write_pairs(d / "train.jsonl", 256, 0),
            "eval": write_pairs(d / "eval.jsonl", 64, 1), "dir": d}
