"""
Everything that talks across processes, in one place: the rank-0 predicate and the few
collectives the scripts use. In one process each is the plain local value; under torchrun each is
one collective on the default group (gloo on CPU, NCCL on GPU), so every rank calls it, in the
same order, with tensors on the run's device.
"""
import os

import torch
import torch.distributed as torchdist

import losses


def is_main() -> bool:
    """Rank 0, the one that prints and writes. From torchrun's RANK, so it holds before setup
    too; a script's Dist says the same (Dist.main, from the same variable)."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kw):
    if is_main():
        print(*args, **kw, flush=True)


def all_sum(x: float | torch.Tensor, dist) -> float:
    """A number summed over ranks (a plain float in one process)."""
    if dist.world == 1:
        return float(x)
    t = torch.as_tensor(x, dtype=torch.float64, device=dist.device).clone()
    torchdist.all_reduce(t)
    return t.item()


def sum_over_ranks(values: dict, dist) -> dict:
    """{name: number or 0-d tensor} summed over ranks, in one collective and one read of the
    device (every rank passes the same names)."""
    if not values:
        return {}
    names = sorted(values)
    t = torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=dist.device).reshape(())
                     for k in names])
    if dist.world > 1:
        torchdist.all_reduce(t)
    return dict(zip(names, t.tolist()))


def any_rank(flag: bool, dist) -> bool:
    """True on every rank when it is True on any."""
    return all_sum(float(bool(flag)), dist) > 0


def broadcast_object(obj, dist):
    """Rank 0's picklable `obj` on every rank."""
    box = [obj]
    if dist.world > 1:
        torchdist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, dist) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank."""
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torchdist.all_gather_object(out, obj)
    return out


def barrier(dist):
    if dist.world > 1:
        torchdist.barrier()


def whiten_over_ranks(x, mask, dist):
    """Zero mean, unit variance over every rank's masked positions: one normalisation of the
    global batch, however it is split over processes."""
    n = all_sum(mask.sum(), dist)
    mean = all_sum((x * mask).sum(), dist) / n
    var = all_sum(((x - mean) ** 2 * mask).sum(), dist) / max(n - 1, 1)
    return losses.masked_whiten(x, mask, mean=mean, var=var)
