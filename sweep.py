"""
Run a training script over every combination of flag values and seeds, then tabulate the final
metrics as mean +- std over seeds.

    python sweep.py train_dpo.py --loss sigmoid,ipo,hinge --seeds 0,1,2 --nproc 2
    python sweep.py train_ppo.py --algo grpo,rloo --lr 1e-4,3e-4 --parallel 2 --metrics eval/accuracy,reward

Every flag the sweep does not know goes to the script; a comma in its value makes it an axis
(`\\,` is a literal comma: `--stop-tokens 'a\\,b'`). Each run is its own fresh output directory,
runs/sweep-<name>/<variant>,seed=<s> (e.g. runs/sweep-dpo-loss/loss=ipo,seed=1), with the
script's output in log.txt there. When a run exits, the sweep writes run.json beside it: the
command, exit code, wall time and, for a failure, the end of its log. A run whose run.json says
exit 0 is finished and is skipped when the same sweep is started again; any other run (failed,
or cut off mid-way) is deleted and started from scratch, so the sweep never depends on a
script's --resume. The table is rewritten after every run: results.md (for people) and
results.jsonl (one line per variant) in the sweep directory.

Seeds are the script's --seed only. The built-in task's DPO/RL stages all start from the one
shared runs/sft (trained with seed 0 by the first run if it is missing), so their spread is that
of their own sampling and batch order, not of the SFT model's.
"""
import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

RUN_FILE = "run.json"  # written by the sweep when a run exits; exit 0 = finished


@dataclass
class Run:
    variant: str   # the non-seed flag values, e.g. "loss=ipo" ("defaults" when there are none)
    flags: dict    # {flag name without dashes: value} of this variant's axes
    seed: int
    dir: str       # its own output directory, passed as --out
    argv: list     # the whole command


def split_flags(args):
    """Script flags as an ordered list of (name, value or None for a bare boolean flag):
    `--loss ipo`, `--loss=ipo` and `--packing` all work."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            raise SystemExit(f"sweep.py: expected a --flag, got {a!r} (flags are --name value)")
        if "=" in a:
            name, value = a[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            name, value = a[2:], args[i + 1]
            i += 2
        else:
            name, value = a[2:], None
            i += 1
        name = name.replace("_", "-")
        if name in (n for n, _ in out):
            raise SystemExit(f"sweep.py: --{name} given twice; give its values as one comma list")
        out.append((name, value))
    return out


def axis_values(value):
    """'a,b' -> ['a', 'b']; 'a\\,b' -> ['a,b']."""
    parts = value.replace("\\,", "\0").split(",")
    return [p.replace("\0", ",") for p in parts]


def plan(script, script_args, seeds, nproc=1, name="", root="runs"):
    """Every run of the sweep, in order (variants in the order their values were given, seeds
    innermost). A pure function: it builds commands and paths, and runs nothing."""
    flags = split_flags(script_args)
    for reserved, instead in (("out", "--name and --root"), ("seed", "--seeds")):
        if reserved in (n for n, _ in flags):
            raise SystemExit(f"sweep.py: the sweep sets each run's --{reserved}; use {instead}")
    axes = [(n, axis_values(v)) for n, v in flags if v is not None and len(axis_values(v)) > 1]
    fixed = [(n, v) for n, v in flags if v is None or len(axis_values(v)) == 1]
    stem = os.path.splitext(os.path.basename(script))[0].removeprefix("train_")
    sweep_dir = os.path.join(root, "sweep-" + (name or "-".join([stem] + [n for n, _ in axes])))
    launcher = [sys.executable, script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), script]
    base = []
    for n, v in fixed:
        base += [f"--{n}"] + ([] if v is None else [axis_values(v)[0]])
    runs = []
    for combo in itertools.product(*[vals for _, vals in axes]):
        values = dict(zip([n for n, _ in axes], combo))
        variant = ",".join(f"{n}={v}" for n, v in values.items()) or "defaults"
        for seed in seeds:
            # a value holding "/" (a path) cannot be part of a directory name
            d = os.path.join(sweep_dir, (variant.replace("/", "_") + "," if values else "") + f"seed={seed}")
            argv = launcher + base + [x for n, v in values.items() for x in (f"--{n}", v)] + ["--seed", str(seed), "--out", d]
            runs.append(Run(variant, values, seed, d, argv))
    return sweep_dir, runs


def read_metrics(run_dir):
    """metrics.jsonl of a run as a list of records ([] when there is none yet)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_status(run_dir):
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def finished(run: Run) -> bool:
    """Exit 0 with the same command. A run dir made by another command under the same sweep name
    (say, a changed fixed flag) is an error, not silently mixed into the table."""
    st = read_status(run.dir)
    if st is None:
        return False
    if st["argv"][1:] != run.argv[1:]:  # [0] is the interpreter, which may move
        raise SystemExit(f"sweep.py: {run.dir} was made by another command:\n  {' '.join(st['argv'])}\n"
                         f"this sweep would run:\n  {' '.join(run.argv)}\nuse another --name, or delete that directory")
    return st["returncode"] == 0


def error_of(log_text, lines=20):
    """(the error line, the log's last lines). The error line is the last 'SomethingError: ...'
    line a worker printed; torchrun's own ChildFailedError summary after it says nothing more."""
    tail = log_text.rstrip().splitlines()[-lines:]
    for line in reversed(log_text.splitlines()):
        head = line.split(":", 1)[0].strip()
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head and "ChildFailedError" not in head:
            return line.strip(), "\n".join(tail)
    return (tail[-1].strip() if tail else "no output"), "\n".join(tail)


def start(run: Run):
    shutil.rmtree(run.dir, ignore_errors=True)  # a failed or cut-off run starts again from scratch
    os.makedirs(run.dir)
    log = open(os.path.join(run.dir, "log.txt"), "w")
    # own session: Ctrl-C of the sweep stops a torchrun job and its workers together
    p = subprocess.Popen(run.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return p, log, time.time()


def record(run: Run, returncode, wall_s):
    with open(os.path.join(run.dir, "log.txt")) as f:
        error, tail = error_of(f.read()) if returncode else (None, None)
    status = {"argv": run.argv, "variant": run.variant, "flags": run.flags, "seed": run.seed,
              "returncode": returncode, "wall_s": round(wall_s, 2), "error": error, "log_tail": tail}
    with open(os.path.join(run.dir, RUN_FILE), "w") as f:
        json.dump(status, f, indent=1)
    print(f"[sweep] {os.path.basename(run.dir)}: " + (f"done in {wall_s:.1f} s" if returncode == 0 else f"FAILED ({error})"),
          flush=True)


def execute(runs, parallel=1, on_change=None):
    """Run what is not finished, `parallel` at a time. The first run goes alone: it makes what
    every run shares and makes only if missing (runs/task, runs/sft), which concurrent runs would
    race to write."""
    todo = [r for r in runs if not finished(r)]
    skipped = len(runs) - len(todo)
    if skipped:
        print(f"[sweep] {skipped} of {len(runs)} runs already finished, skipped", flush=True)
    active, alone = [], skipped == 0
    try:
        while todo or active:
            while todo and len(active) < (1 if alone else parallel):
                run = todo.pop(0)
                print(f"[sweep] start {os.path.basename(run.dir)}: {' '.join(run.argv)}", flush=True)
                active.append((run, *start(run)))
            time.sleep(0.2)
            for item in [a for a in active if a[1].poll() is not None]:
                run, p, log, t0 = item
                log.close()
                record(run, p.returncode, time.time() - t0)
                active.remove(item)
                alone = False
                if on_change:
                    on_change()
    except KeyboardInterrupt:
        for run, p, log, _ in active:  # cut off: no run.json, so the next sweep reruns them
            os.killpg(p.pid, 15)
            p.wait()
            log.close()
        raise


def mean_std(values):
    """(mean, sample std with n - 1, n); None where undefined (no values; std of one), which
    results.jsonl writes as null."""
    n = len(values)
    return (statistics.fmean(values) if n else None), (statistics.stdev(values) if n > 1 else None), n


def final_value(records, metric):
    """The metric's value in the last record that has it (None if it was never logged)."""
    for r in reversed(records):
        if metric in r:
            return r[metric]
    return None


def aggregate(runs, metrics):
    """One summary per variant over its seeds: finished runs' final metrics and wall time as
    (mean, sample std, n), and the failed runs with their error."""
    rows = {}
    for run in runs:
        row = rows.setdefault(run.variant, {"variant": run.variant, "flags": run.flags, "seeds": [], "values": {m: [] for m in metrics},
                                            "wall_s": [], "failed": [], "pending": []})
        st = read_status(run.dir)
        if st is None:
            row["pending"].append(run.seed)
        elif st["returncode"] != 0:
            row["failed"].append({"seed": run.seed, "dir": run.dir, "returncode": st["returncode"], "error": st["error"]})
        else:
            row["seeds"].append(run.seed)
            row["wall_s"].append(st["wall_s"])
            recs = read_metrics(run.dir)
            for m in metrics:
                v = final_value(recs, m)
                if v is not None:
                    row["values"][m].append(v)
    out = []
    for row in rows.values():
        row["metrics"] = {m: dict(zip(("mean", "std", "n"), mean_std(v)), values=v) for m, v in row.pop("values").items()}
        row["wall"] = dict(zip(("mean", "std", "n"), mean_std(row["wall_s"])), values=row.pop("wall_s"))
        out.append(row)
    return out


def fmt(s, runs, digits=3):
    """'mean ± std', and its own n when fewer than the variant's finished runs logged the metric."""
    if s["n"] == 0:
        return "-"
    text = f"{s['mean']:.{digits}f}" + (f" ± {s['std']:.{digits}f}" if s["n"] > 1 else "")
    return text + (f" (n={s['n']})" if s["n"] < runs else "")


def machine(nproc):
    """The hardware in words, for the table's caption."""
    import torch  # here only: planning and tabulating need no torch

    if torch.cuda.is_available():
        hw = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        cpu = platform.processor() or platform.machine()
        if os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        hw = f"{cpu}, {os.cpu_count()} cores, no GPU"
    return f"{hw}; torch {torch.__version__}; {nproc} process{'es' if nproc > 1 else ''} per run"


def table(rows, metrics):
    """The markdown table of aggregate()'s rows, and below it the failed runs with their errors."""
    lines = ["| variant | n | " + " | ".join(metrics) + " | wall time (s) |", "|---|---|" + "---|" * (len(metrics) + 1)]
    for row in rows:
        n = len(row["seeds"])
        total = n + len(row["failed"]) + len(row["pending"])
        none = {"n": 0}  # a metric this sweep did not tabulate
        cells = [fmt(row["metrics"].get(m, none), n) for m in metrics] + [fmt(row["wall"], n, 1)]
        lines.append(f"| {row['variant']} | {n}" + (f" of {total}" if n < total else "") + " | " + " | ".join(cells) + " |")
    failed = [f for row in rows for f in row["failed"]]
    if failed:
        lines += ["", "Failed runs (log.txt in each directory):", "", "| run | exit code | error |", "|---|---|---|"]
        lines += [f"| {f['dir']} | {f['returncode']} | {f['error'].replace('|', '/')} |" for f in failed]
    pending = [f"{row['variant']},seed={s}" for row in rows for s in row["pending"]]
    if pending:
        lines += ["", "Not run yet: " + ", ".join(pending)]
    return lines


CAPTION = ("Final value of each metric (its last logged record), mean ± sample standard deviation (n - 1) "
           "over seeds; n = finished runs.")


def write_results(sweep_dir, rows, metrics, command, machine_text):
    with open(os.path.join(sweep_dir, "results.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    lines = [f"`{command}`", "", f"{machine_text}. {CAPTION}", ""] + table(rows, metrics)
    with open(os.path.join(sweep_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def combined_table(sweep_dirs, metrics):
    """One table over several finished sweeps (their results.jsonl), rows named sweep: variant."""
    rows = []
    for d in sweep_dirs:
        with open(os.path.join(d, "results.jsonl")) as f:
            for line in f:
                row = json.loads(line)
                row["variant"] = f"{os.path.basename(os.path.normpath(d)).removeprefix('sweep-')}: {row['variant']}"
                rows.append(row)
    return "\n".join([CAPTION, ""] + table(rows, metrics)) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], usage="python sweep.py SCRIPT [sweep options] [script flags]",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
                                allow_abbrev=False)  # else the script's --seed would be taken for --seeds
    p.add_argument("script", nargs="?")
    p.add_argument("--seeds", default="0,1,2", help="comma list of --seed values")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--name", default="", help="runs/sweep-NAME; default: the script and the axes' names")
    p.add_argument("--root", default="runs")
    p.add_argument("--metrics", default="eval/accuracy", help="comma list of metrics.jsonl keys to tabulate")
    p.add_argument("--report-only", action="store_true", help="rewrite results.md/.jsonl from what is on disk; run nothing")
    p.add_argument("--dry-run", action="store_true", help="print the commands; run nothing")
    p.add_argument("--table", nargs="+", metavar="SWEEP_DIR", help="print one table over these finished sweeps; run nothing")
    args, script_args = p.parse_known_args(argv)
    if args.table:
        print(combined_table(args.table, args.metrics.split(",")), end="")
        return
    if not args.script:
        p.error("SCRIPT is required (or --table)")
    seeds = [int(s) for s in args.seeds.split(",")]
    metrics = args.metrics.split(",")
    sweep_dir, runs = plan(args.script, script_args, seeds, args.nproc, args.name, args.root)
    if args.dry_run:
        print("\n".join(" ".join(r.argv) for r in runs))
        return
    os.makedirs(sweep_dir, exist_ok=True)
    command = " ".join(["python sweep.py"] + (argv if argv is not None else sys.argv[1:]))
    machine_text = machine(args.nproc)

    def report():
        write_results(sweep_dir, aggregate(runs, metrics), metrics, command, machine_text)

    if not args.report_only:
        execute(runs, args.parallel, on_change=report)
    report()
    print(open(os.path.join(sweep_dir, "results.md")).read())


if __name__ == "__main__":
    main()
