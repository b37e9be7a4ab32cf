"""Timing helpers for the benchmarks on a real checkpoint: interleaved runs (A, B, A, B, ...; the
median of each, so that a shared machine's load hits both sides alike) and the fp32 matmul peak
measured in the same process."""
import os
import statistics
import time

import torch

DEFAULT_MODEL = os.path.expanduser("~/.cache/nanotrl/smollm2-135m-instruct")  # SmolLM2-135M-Instruct, fp32


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """{name: median seconds} of the zero-argument callables `fns`, run in turn `repeats` times
    after `warmup` untimed rounds; also {name + "_all": [seconds, ...]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out.update({name + "_all": [round(t, 4) for t in ts] for name, ts in times.items()})
    return out


def matmul_flops_per_s(m=4096, k=576, n=1536, reps=5) -> float:
    """fp32 FLOP/s of an [m, k] @ [k, n] matmul (SmolLM2-135M's MLP at 4,096 tokens), best of reps."""
    x, w = torch.randn(m, k), torch.randn(k, n)
    x @ w
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        name = "?"
    return f"{name}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
