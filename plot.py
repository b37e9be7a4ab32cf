"""
Metrics against step, from run directories or a sweep directory, as a PNG.

    python plot.py runs/sweep-dpo-loss                          # eval/accuracy of every variant
    python plot.py runs/dpo runs/dpo-plain --metrics loss,eval/accuracy --out dpo.png

One line per run; the seeds of a sweep's variant (runs whose run.json names the same variant)
become one line, their mean at each step, with a band from their minimum to their maximum (with
three seeds, a standard deviation says little that the extremes do not). matplotlib is needed
here only, not for training: pip install matplotlib.
"""
import argparse
import os
import re
import statistics
import sys

from sweep import read_metrics, read_status


def find_runs(paths):
    """{label: [run dir, ...]}: a directory with metrics.jsonl is a run; any other, a sweep (or a
    folder of runs) whose subdirectories are. Runs of one sweep variant share a label."""
    groups = {}
    for path in paths:
        if os.path.exists(os.path.join(path, "metrics.jsonl")):
            runs = [path]
        else:
            runs = sorted(os.path.join(path, d) for d in os.listdir(path)
                          if os.path.exists(os.path.join(path, d, "metrics.jsonl")))
            if not runs:
                raise SystemExit(f"plot.py: no metrics.jsonl in {path} or its subdirectories")
        for run in runs:
            st = read_status(run)
            # a sweep's run still going (no run.json yet) joins its variant, named in its directory
            name = os.path.basename(os.path.normpath(run))
            unfinished = re.fullmatch(r"(.*?),?seed=-?\d+", name) if len(runs) > 1 else None
            label = st["variant"] if st else (unfinished.group(1) or "defaults") if unfinished else os.path.normpath(run)
            if len(paths) > 1 and (st or unfinished):  # variants of different sweeps may share a name
                label = f"{os.path.basename(os.path.normpath(path))}: {label}"
            groups.setdefault(label, []).append(run)
    return groups


def curve(runs, metric):
    """(steps, mean, min, max) of a metric over runs, at every step any of them logged it (a run
    logging a step twice counts with its last value)."""
    by_step = {}
    for run in runs:
        values = {r["step"]: r[metric] for r in read_metrics(run) if metric in r}
        for step, v in values.items():
            by_step.setdefault(step, []).append(v)
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps],
            [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="run directories and/or sweep directories")
    p.add_argument("--metrics", default="eval/accuracy", help="comma list of metrics.jsonl keys, one panel each")
    p.add_argument("--out", default="", help="PNG path; default: curves.png in the single directory given, else here")
    args = p.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        sys.exit("plot.py needs matplotlib, which nanotrl does not otherwise depend on: pip install matplotlib")
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    groups = find_runs(args.dirs)
    metrics = args.metrics.split(",")
    fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 3.2 * len(metrics)), sharex=True, squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for label, runs in groups.items():
            steps, mean, lo, hi = curve(runs, metric)
            if not steps:
                continue
            (line,) = ax.plot(steps, mean, marker="." if len(steps) < 20 else None,
                              label=label + (f" (mean of {len(runs)})" if len(runs) > 1 else ""))
            if len(runs) > 1:
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize="small")
    if any(len(r) > 1 for r in groups.values()):
        axes[0, 0].set_title("line: mean over seeds; band: min to max", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = args.out or os.path.join(args.dirs[0] if len(args.dirs) == 1 else ".", "curves.png")
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
