"""
The tokenized-data cache at scale (data/cache.py): first-run tokenization time with 1 and 2
processes, cached start time, and peak RSS per process, on synthetic two-turn conversations
written by this script (~525 bytes and ~310 Llama-3 tokens each, the shape of issue 17's
measurement), with the real Llama-3 tokenizer when ../shared/tokenizers/llama3 is present (else
the built-in task's character-level one).

    python bench/data.py                                   # 200,000 and 1,000,000 records (~2 GB of disk)
    python bench/data.py --records 20000 --procs 1,2 --dir /tmp/bench_data

One JSON line per (records, procs): first_run_s / first_run_cpu_s (wall and CPU seconds, all
threads of all processes, to tokenize into the cache), cached_start_s / cached_start_cpu_s (a
fresh run's time to key and memory-map it; CPU seconds are what load on the machine inflates
least), peak_rss_mb_per_proc (the larger of the two runs), baseline_rss_mb (the same process
before any data is touched: torch, numpy and the tokenizer loaded), batch_ms (one SFT batch of
32 read from the cache). today_cpu_s_per_1k is the in-memory path the scripts had before
(formats.load_sft + chat.tokenize_sft per record) on the first --today-records records,
speedup_per_core its CPU time per record over the cache build's, today_rss_mb_per_1k its memory
(--today-root: that path as another checkout has it, e.g. the code issue 17 measured).
Each worker is a fresh process (peak RSS is per process); 2 processes run under torchrun (gloo),
as the training scripts do.
"""
import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
LLAMA3 = os.path.join(ROOT, "..", "shared", "tokenizers", "llama3")
SETTINGS = {"max_length": 4096, "train_on_prompt": False}


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def write_conversations(path, n, seed=0):
    """n two-turn conversations of random numbers and words (a pool of 20,000): ~525 bytes and
    ~310 Llama-3 tokens each."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    pool = [str(rng.randint(0, 99)) if i % 5 else "".join(rng.choices(letters, k=rng.randint(2, 7))) for i in range(20000)]
    with open(path, "w") as f:
        for _ in range(n):
            user, answer = (" ".join(rng.choices(pool, k=rng.randint(a, b))) for a, b in ((20, 60), (60, 130)))
            f.write(json.dumps({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}) + "\n")


def tokenizer(chat_format=""):
    from data import chat, task

    if os.path.exists(LLAMA3):
        return chat.load_tokenizer(LLAMA3, chat_format or None), "llama3"
    return chat.load_tokenizer(task.ensure_task(os.path.join(tempfile.gettempdir(), "nanotrl_task"))), "task"


def worker(a):
    """One process: key + load (building the cache if needed), then read a few batches."""
    import torch.distributed as dist

    if a.worker == "today" and a.today_root:  # an older checkout's data/ (git worktree add DIR REV)
        sys.path.insert(0, os.path.abspath(a.today_root))
    from data import chat, formats

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    tok, _ = tokenizer(a.chat_format)
    base = rss_mb()
    c0, t0 = cpu_s(), time.time()
    if a.worker == "today":
        out = [chat.tokenize_sft(ex, tok, SETTINGS["max_length"]) for ex in formats.load_sft(a.data)]
        rec = {"records": len(out)}
    else:
        from data import cache

        ex = cache.load(a.data, "sft", tok, SETTINGS, a.cache, rank, world, dist.barrier if world > 1 else lambda: None)
        rec = {"records": len(ex), "tokens": int(ex.ragged["input_ids"][1][-1])}
    rec.update(wall_s=time.time() - t0, cpu_s=cpu_s() - c0)
    if a.worker != "today":
        from data import batching

        t1 = time.time()
        for step in range(10):
            idx = batching.batch_indices(len(ex), 32, 0, step, rank, world)
            batching.collate_sft([ex[j] for j in idx], tok.pad_id)
        rec["batch_ms"] = (time.time() - t1) * 100
    rec.update(baseline_rss_mb=base, peak_rss_mb=peak_rss_mb())
    with open(f"{a.report}.{rank}", "w") as f:
        json.dump(rec, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(mode, data, cache_dir, procs, scratch, chat_format, today_root=""):
    """Launch the worker(s); their reports, one per process."""
    report = os.path.join(scratch, "report")
    args = [os.path.abspath(__file__), "--worker", mode, "--data", data, "--cache", cache_dir, "--report", report,
            "--chat-format", chat_format, "--today-root", today_root]
    cmd = [sys.executable] + args if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    out = []
    for r in range(procs):
        with open(f"{report}.{r}") as f:
            out.append(json.load(f))
        os.remove(f"{report}.{r}")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", default="200000,1000000", help="dataset sizes, comma-separated")
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    p.add_argument("--today-records", type=int, default=20000, help="records for the in-memory baseline (0 = skip)")
    p.add_argument("--chat-format", default="", help="as the scripts' --chat-format (default: the tokenizer's chat "
                   "template; llama3 = the built-in format, the same tokens without jinja)")
    p.add_argument("--today-root", default="", help="the in-memory baseline from another checkout (e.g. `git worktree add "
                   "/tmp/before 5fabb05^`: the code before the cache, whose only chat rendering was the built-in format)")
    p.add_argument("--dir", default="", help="scratch directory (default: a new one in the temp dir, deleted at the end)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--data", default="", help=argparse.SUPPRESS)
    p.add_argument("--cache", default="", help=argparse.SUPPRESS)
    p.add_argument("--report", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    scratch = a.dir or tempfile.mkdtemp(prefix="nanotrl_bench_data_")
    os.makedirs(scratch, exist_ok=True)
    tok, tok_name = tokenizer(a.chat_format)
    try:
        today = None
        for n in map(int, a.records.split(",")):
            data = os.path.join(scratch, f"conv{n}.jsonl")
            write_conversations(data, n)
            if a.today_records and today is None:
                head = os.path.join(scratch, "today.jsonl")
                with open(data) as src, open(head, "w") as dst:
                    dst.writelines(line for _, line in zip(range(a.today_records), src))
                (t,) = run("today", head, "", 1, scratch, a.chat_format, a.today_root)
                today = t["cpu_s"] / t["records"]
                today_rss = (t["peak_rss_mb"] - t["baseline_rss_mb"]) / t["records"]
            for procs in map(int, a.procs.split(",")):
                cache_dir = os.path.join(scratch, "cache")
                shutil.rmtree(cache_dir, ignore_errors=True)
                first = run("build", data, cache_dir, procs, scratch, a.chat_format)
                cached = run("build", data, cache_dir, procs, scratch, a.chat_format)
                size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache_dir) for f in fs)
                cpu = sum(r["cpu_s"] for r in first)
                print(json.dumps({
                    "records": n, "procs": procs, "tokenizer": tok_name, "chat_format": tok.chat_format, "tokens": first[0]["tokens"],
                    "jsonl_mb": round(os.path.getsize(data) / 2**20, 1), "cache_mb": round(size / 2**20, 1),
                    "first_run_s": round(max(r["wall_s"] for r in first), 2), "first_run_cpu_s": round(cpu, 2),
                    "cached_start_s": round(max(r["wall_s"] for r in cached), 2),
                    "cached_start_cpu_s": round(max(r["cpu_s"] for r in cached), 2),
                    "peak_rss_mb_per_proc": round(max(r["peak_rss_mb"] for r in first + cached)),
                    "cached_peak_rss_mb_per_proc": round(max(r["peak_rss_mb"] for r in cached)),
                    "baseline_rss_mb": round(max(r["baseline_rss_mb"] for r in first + cached)),
                    "batch_ms": round(max(r["batch_ms"] for r in cached), 2),
                    "today_cpu_s_per_1k": round(today * 1000, 3) if today else None,
                    "today_root": a.today_root or None,
                    "speedup_per_core": round(today / (cpu / n), 2) if today else None,
                    "today_rss_mb_per_1k": round(today_rss * 1000, 1) if today else None,
                }), flush=True)
            os.remove(data)
    finally:
        if not a.dir:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
