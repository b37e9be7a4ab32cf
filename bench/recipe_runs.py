"""
Measure the SmolLM2-135M-Instruct recipes of recipes/smollm2.sh: each recipe's own lines, read from
its arm of the script's `case` with the variables filled in (the data preparation, then the one
torchrun training command), around them the held-out metric before and after training (greedy,
in this process), the training's wall time and peak RSS per process, the machine and the git state.
Prints one JSON object on stdout (progress goes to stderr) and writes it to <run>/result.json:

    python bench/recipe_runs.py grpo --seed 1         # GRPO, full fine-tuning, one-digit + and *
    python bench/recipe_runs.py qlora-grpo --seed 1   # the same with QLoRA (--lora-r 16 --quantize nf4)
    python bench/recipe_runs.py dpo --seed 0          # DPO with LoRA on HH-RLHF harmless pairs
    python bench/recipe_runs.py rm --seed 0           # a reward model on the same pairs
    python bench/recipe_runs.py sft --seed 0          # SFT on GSM8K worked solutions (--packing)
    python bench/recipe_runs.py agent --seed 1        # GRPO with the calculator tool, two-digit +

Options: --seed N (training seed, default 0), --nproc N (processes, default 2), --out DIR (default
runs/recipes, as the script's: data in DIR/data, each run in DIR/<recipe>-s<seed>), --dry-run
(print the recipe's lines and stop).

The model directory is made if missing, from ../shared/models/smollm2-135m-instruct/to_hf.py (needs
the gguf package), into $NANOTRL_CACHE/smollm2-135m-instruct (default ~/.cache/nanotrl/...).
Results, the machine and what each figure means: docs/real-models.md ("SmolLM2-135M-Instruct").
"""
import argparse
import gc
import json
import os
import re
import resource
import shlex
import string
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import common  # noqa: E402
import engine  # noqa: E402
import hf_io  # noqa: E402
import nf4  # noqa: E402
from data import chat, formats, prepare_arith, prepare_gsm8k  # noqa: E402

SCRIPT = os.path.join(ROOT, "recipes", "smollm2.sh")
SHARED = os.path.join(ROOT, "..", "shared")
MODEL_NAME = "smollm2-135m-instruct"
RECIPES = ("grpo", "qlora-grpo", "dpo", "rm", "sft", "agent")
GSM8K_TRAIN = 1000      # the script's `head -n 1000` of GSM8K's train split
GSM8K_HELD_OUT = 200    # its `head -n 200` of the test split: format rate, accuracy and NLL on these
GSM8K_MAX_NEW = 256     # generation cap for GSM8K answers (cut answers are counted and reported)
ARITH_MAX_NEW = 8       # the answer is a number: "The answer is 14." is 7 tokens


# ----------------------------------------------------------------------------- the recipe's lines

def recipe_lines(a):
    """(data preparation lines, training command as argv) of recipe a.recipe in recipes/smollm2.sh,
    with this run's values for its variables: the lines a user runs, not a copy of them."""
    with open(SCRIPT) as f:
        text = f.read()
    arm = re.search(rf"^{re.escape(a.recipe)}\)\n(.*?)^\s*;;", text, re.M | re.S).group(1)
    values = {"MODEL": a.model, "SEED": a.seed, "NPROC": a.nproc, "DATA": a.data, "RUN": a.run}
    lines = [string.Template(line.strip()).substitute(values) for line in arm.replace("\\\n", " ").splitlines()
             if line.strip() and not line.strip().startswith("#")]
    assert lines[-1].startswith("torchrun ") and not any(x.startswith("torchrun ") for x in lines[:-1]), lines
    return lines[:-1], shlex.split(lines[-1])


def prepare(lines):
    """The recipe's data lines, in bash as the script runs them (each makes its output once)."""
    # the prepare scripts under this interpreter, as when the harness called them itself
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    for line in lines:
        log(f"$ {line}")
        subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, check=True, stdout=sys.stderr)


# ----------------------------------------------------------------------------- the measurements

def measure_grpo(a, cmd, qlora=False):
    data = os.path.join(a.data, "arith")
    train, held_out = os.path.join(data, "train.jsonl"), formats.load_prompts(os.path.join(data, "test.jsonl"))
    before = arith_eval(load_lm(a.model, quantize=qlora), a.model, held_out)
    run = train_run(cmd, a)
    after = arith_eval(load_lm(os.path.join(a.run, "model")), a.model, held_out)
    rewards = [r["reward"] for r in metrics(a.run) if "reward" in r]
    return {"command": shlex.join(cmd), "data": {"train_prompts": len(formats.load_prompts(train)),
                                                 "held_out_prompts": len(held_out)},
            "metric": "held-out greedy exact match of the first integer (the reward), additions and products",
            "before": before, "after": after,
            "train_reward_first_last_3": [mean(rewards[:3]), mean(rewards[-3:])], **run}


def measure_agent(a, cmd):
    """Before and after: train_ppo.py's own greedy episodes on the held-out prompts (eval/accuracy,
    eval/tool_call_rate); the no-tool baseline: greedy answers to the same questions asked alone."""
    data = os.path.join(a.data, "arith2")
    plain = formats.load_prompts(os.path.join(data, "plain.jsonl"))
    t = time.time()
    texts, _ = greedy(load_lm(a.model), chat.load_tokenizer(a.model), plain, 16, batch_size=64)
    baseline = {"accuracy": round(mean([prepare_arith.is_correct(x, r["answer"]) for r, x in zip(plain, texts)]), 4),
                "last_integer_accuracy": round(mean([prepare_arith.last_integer(x) == r["answer"]
                                                     for r, x in zip(plain, texts)]), 4),
                "examples": texts[:3], "eval_s": round(time.time() - t, 1)}
    run = train_run(cmd, a)
    first, last = evals(a.run)
    pick = ("eval/accuracy", "eval/tool_call_rate")
    rewards = [r["reward"] for r in metrics(a.run) if "reward" in r]
    train = formats.load_prompts(os.path.join(data, "train.jsonl"))
    return {"command": shlex.join(cmd), "data": {"train_prompts": len(train), "held_out_prompts": len(plain)},
            "metric": "held-out greedy episodes: exact match of the answer's first integer, and the share "
                      "of episodes that called the calculator; no_tool: the question alone, no tool",
            "no_tool": baseline, "before": {k: first[k] for k in pick}, "after": {k: last[k] for k in pick},
            "train_reward_first_last_3": [mean(rewards[:3]), mean(rewards[-3:])], **run}


def measure_dpo(a, cmd):
    run = train_run(cmd, a)
    first, last = evals(a.run)
    keys = {"implicit_reward_accuracy": "eval/rewards/accuracies", "margin": "eval/rewards/margins",
            "chosen_logp": "eval/logps/chosen", "rejected_logp": "eval/logps/rejected"}
    before, after = ({k: round(r[v], 4) for k, v in keys.items()} for r in (first, last))
    return {"command": shlex.join(cmd), "data": count_pairs(os.path.join(a.data, "hh")),
            "metric": "train_dpo.py's eval on the held-out pairs (reference = the policy with its adapters off; "
                      "before training the two are identical, so every margin is 0 and accuracy counts no tie)",
            "before": before, "after": after,
            "chosen_logp_went_down": after["chosen_logp"] < before["chosen_logp"], **run}


def measure_rm(a, cmd):
    run = train_run(cmd, a)
    first, last = evals(a.run)
    return {"command": shlex.join(cmd), "data": count_pairs(os.path.join(a.data, "hh")),
            "metric": "held-out pairwise accuracy (score(chosen) > score(rejected)); before = the fresh score head",
            "before": {"pairwise_accuracy": round(first["eval/accuracy"], 4)},
            "after": {"pairwise_accuracy": round(last["eval/accuracy"], 4)}, **run}


def measure_sft(a, cmd):
    questions = formats.load_prompts(os.path.join(a.data, "gsm8k-test", "rl.jsonl"))[:GSM8K_HELD_OUT]
    before = gsm8k_eval(load_lm(a.model), a.model, questions)
    run = train_run(cmd, a)
    after = gsm8k_eval(load_lm(os.path.join(a.run, "model")), a.model, questions)
    first, last = evals(a.run)
    before["nll_per_answer_token"], after["nll_per_answer_token"] = (round(r["eval/loss"], 4) for r in (first, last))
    return {"command": shlex.join(cmd), "data": {"train_examples": GSM8K_TRAIN, "held_out": GSM8K_HELD_OUT},
            "metric": f"held-out GSM8K: answer ends with '#### <number>', accuracy (greedy, {GSM8K_MAX_NEW} new "
                      "tokens at most), answers cut at the cap, and train_sft.py's eval/loss (NLL per answer token)",
            "before": before, "after": after, **run}


MEASURE = {"grpo": measure_grpo, "qlora-grpo": lambda a, cmd: measure_grpo(a, cmd, qlora=True), "dpo": measure_dpo,
           "rm": measure_rm, "sft": measure_sft, "agent": measure_agent}


def count_pairs(d):
    return {k: sum(1 for _ in open(os.path.join(d, f"{k}.jsonl"))) for k in ("train", "test")}


# ----------------------------------------------------------------------------- the model

def model_dir():
    return os.path.join(os.environ.get("NANOTRL_CACHE", os.path.expanduser("~/.cache/nanotrl")), MODEL_NAME)


def ensure_model():
    """The HF directory of SmolLM2-135M-Instruct, made from the GGUF in ../shared if missing."""
    path = model_dir()
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        cmd = [sys.executable, os.path.join(SHARED, "models", MODEL_NAME, "to_hf.py"), path]
        log(f"$ {shlex.join(cmd)}")
        subprocess.run(cmd, check=True, stdout=sys.stderr)
    return path


def load_lm(path, quantize=False):
    """A model to evaluate in this process. quantize: NF4 projections, as QLoRA's policy starts."""
    m = hf_io.from_pretrained(path).eval().requires_grad_(False)
    return nf4.quantize_model(m) if quantize else m


# ----------------------------------------------------------------------------- evaluation (in this process)

def greedy(model, tok, records, max_new_tokens, batch_size):
    """Greedy completions of records' prompts, batched by prompt length (less padding); in order."""
    eng = engine.Engine(model, tok, common.Dist(0, 1, torch.device("cpu"), None))
    ids = [chat.tokenize_prompt(r, tok, 10**9) for r in records]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    texts, ended = [None] * len(ids), [None] * len(ids)
    for i in range(0, len(order), batch_size):
        part = order[i:i + batch_size]
        s = eng.generate([ids[j] for j in part], engine.Sampling(max_new_tokens, temperature=0))
        for j, text, e in zip(part, s.texts, s.ended.tolist()):
            texts[j], ended[j] = text, e
        log(f"  generated {min(i + batch_size, len(order))}/{len(order)}")
    return texts, ended


def arith_eval(model, model_dir, records):
    t = time.time()
    tok = chat.load_tokenizer(model_dir)
    texts, _ = greedy(model, tok, records, ARITH_MAX_NEW, batch_size=100)
    out = {}
    for op, name in (("+", "add"), ("*", "mul")):
        rows = [(r, x) for r, x in zip(records, texts) if r["op"] == op]
        out[f"{name}_accuracy"] = round(mean([prepare_arith.is_correct(x, r["answer"]) for r, x in rows]), 4)
        # lenient reading: the answer anywhere last ("3+5 = 8"): knowing the answer vs stating it as asked
        out[f"{name}_last_integer_accuracy"] = round(mean([prepare_arith.last_integer(x) == r["answer"] for r, x in rows]), 4)
    out["examples"] = texts[:3]
    out["eval_s"] = round(time.time() - t, 1)
    free(model)
    return out


FINAL = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")


def gsm8k_eval(model, model_dir, records):
    t = time.time()
    tok = chat.load_tokenizer(model_dir)
    texts, ended = greedy(model, tok, records, GSM8K_MAX_NEW, batch_size=100)
    correct = prepare_gsm8k.gsm8k_reward(None, texts, [r["answer"] for r in records])
    free(model)
    return {"format_rate": round(mean([bool(FINAL.search(x)) for x in texts]), 4),
            "accuracy": round(mean(correct), 4), "correct": int(sum(correct)),
            "cut_at_cap": round(mean([not e for e in ended]), 4), "example": texts[0][-200:],
            "eval_s": round(time.time() - t, 1)}


def free(model):
    del model
    gc.collect()


def mean(xs):
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- training runs

def train_run(cmd, a):
    """Run the training command, its output to stderr and <run>/train.log; wall time and peak RSS
    per process (VmHWM of each torchrun worker, read every 0.5 s until it exits)."""
    os.makedirs(a.run, exist_ok=True)
    log(f"$ {shlex.join(cmd)}")
    peaks, stop = {}, threading.Event()
    t = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def watch():
        while not stop.wait(0.5):
            for pid in children(p.pid):
                rank, hwm = proc_rank_hwm(pid)
                if hwm:
                    peaks[rank] = max(peaks.get(rank, 0), hwm)

    threading.Thread(target=watch, daemon=True).start()
    with open(os.path.join(a.run, "train.log"), "w") as f:
        for line in p.stdout:
            f.write(line)
            if not line.startswith("W1") and "*****" not in line and "OMP_NUM_THREADS" not in line:
                sys.stderr.write(line)
    rc = p.wait()
    stop.set()
    wall = time.time() - t
    if rc:
        raise SystemExit(f"training failed (exit status {rc}): {a.run}/train.log")
    return {"train_wall_s": round(wall, 1),
            "peak_rss_mb_per_process": [round(peaks[r] / 1024) for r in sorted(peaks)],
            # exact (the kernel's), the max over every child process this driver has waited for
            "peak_rss_mb_max_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def children(pid):
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def proc_rank_hwm(pid):
    """(RANK from the process's environment, its peak RSS in kB) or (None, 0) once it is gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        with open(f"/proc/{pid}/status") as f:
            hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return int(env.get(b"RANK", b"-1")), hwm
    except (OSError, StopIteration, ValueError):
        return None, 0


def metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def evals(run):
    """The first and last metrics.jsonl records with eval/ metrics: before and after training."""
    rows = [r for r in metrics(run) if any(k.startswith("eval/") for k in r)]
    return rows[0], rows[-1]


def git_state():
    """The commit and the files that differ from it: the working tree is what ran."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"), "modified": git("diff", "--name-only", "HEAD").split()}


def machine():
    name = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True)
                 .stdout.splitlines() if line.startswith("Model name")), "unknown")
    return {"cpu": name, "cores": os.cpu_count(), "torch": torch.__version__}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", choices=RECIPES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/recipes")
    p.add_argument("--dry-run", action="store_true")
    a = p.parse_args()
    os.chdir(ROOT)
    # one thread: on a shared machine two intra-op threads wait on each other at every op (measured:
    # a decode step of batch 100 took 4 s with 2 threads, 0.4 s with 1, on 2 busy cores)
    torch.set_num_threads(1)
    a.data, a.run = os.path.join(a.out, "data"), os.path.join(a.out, f"{a.recipe}-s{a.seed}")
    t, load = time.time(), os.getloadavg()[0]
    a.model = model_dir() if a.dry_run else ensure_model()
    data_lines, cmd = recipe_lines(a)
    if a.dry_run:
        print(json.dumps({"recipe": a.recipe, "seed": a.seed, "prepare": data_lines, "command": shlex.join(cmd)}))
        return
    start_state = git_state()
    prepare(data_lines)
    result = {"recipe": a.recipe, "seed": a.seed, **MEASURE[a.recipe](a, cmd)}
    result.update(total_wall_s=round(time.time() - t, 1), machine=machine(),
                  load_avg_1min_start_end=[round(load, 2), round(os.getloadavg()[0], 2)], git=start_state)
    with open(os.path.join(a.run, "result.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
