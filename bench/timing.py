"""Timing helpers for the benchmarks: interleaved runs (A, B, A, B, ...; the median of each, so that
a shared machine's load hits both sides alike), the matmul peak measured in the same process, and
what a GPU figure needs: a synchronize before every clock read (CUDA kernels run asynchronously:
without one, a clock times the launches, not the work), device memory, and the datasheet peaks."""
import os
import resource
import statistics
import time

import torch

DEFAULT_MODEL = os.path.expanduser("~/.cache/nanotrl/smollm2-135m-instruct")  # SmolLM2-135M-Instruct, fp32

# dense bf16 tensor-core FLOP/s (SXM parts), matched against torch.cuda.get_device_name()
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def sync(device):
    """Wait for the device's queued work; call before every clock read. Nothing to wait for on a CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict, repeats: int, warmup: int = 1, device="cpu") -> dict:
    """{name: median seconds} of the zero-argument callables `fns`, run in turn `repeats` times
    after `warmup` untimed rounds; also {name + "_all": [seconds, ...]}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out.update({name + "_all": [round(t, 4) for t in ts] for name, ts in times.items()})
    return out


def matmul_flops_per_s(m=4096, k=576, n=1536, reps=5, device="cpu", dtype=torch.float32) -> float:
    """FLOP/s of an [m, k] @ [k, n] matmul (SmolLM2-135M's MLP at 4,096 tokens), best of reps, on
    `device` in `dtype` (the one the model's matmuls run in: bf16 under autocast on a GPU)."""
    x, w = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    x @ w  # warm: cuBLAS picks its kernel (and the CUDA context starts) on the first call
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        x @ w
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best


def device_name(device) -> str:
    return torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"


def datasheet_flops(device):
    """The card's dense bf16 peak FLOP/s, or None (a CPU, an unknown card)."""
    name = device_name(device)
    return next((v for k, v in DATASHEET_BF16.items() if k in name), None) if name != "cpu" else None


def hbm_bytes_per_s(device):
    """The card's peak memory bandwidth (datasheet), or None (a CPU, an unknown card). Names as
    torch.cuda.get_device_name prints them: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
    "NVIDIA H200", "NVIDIA A100-SXM4-80GB" / "NVIDIA A100 80GB PCIe" (both about 2.0 TB/s)."""
    name = device_name(device)
    if "H200" in name:
        return 4.8e12
    if "H100" in name:
        return 2.0e12 if "PCIe" in name else 3.35e12 if ("HBM3" in name or "SXM" in name) else None
    if "A100" in name and "80GB" in name:
        return 2.0e12
    return None


def peak_mem_mb(device):
    """Peak memory so far: max_memory_allocated on a GPU (reset it with
    torch.cuda.reset_peak_memory_stats), the process's peak RSS on a CPU."""
    if torch.device(device).type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?")
    except OSError:
        name = "?"
    return f"{name}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
