"""torch.distributed's tensor collectives, wrapped to assert that every tensor they are given is on
the run's device (cuda:LOCAL_RANK with a GPU, else the CPU): gloo takes CPU tensors on a CPU run and
NCCL would reject them on a GPU one, so a 2-process CPU test under this check fails where the GPU run
would. Installed by meta_default.py --check-collectives. Wrapped: the tensor collectives the
scripts call (collectives.py, train_dpo.precompute) and those FSDP2 calls (torch 2.13:
all_gather_single, reduce_scatter_single). Not wrapped: the *_object collectives (they pickle
through tensors of their own on the right device) and functional collectives (DTensor's).
"""
import functools
import os

import torch
import torch.distributed as torchdist

WRAPPED = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "all_gather",
           "all_gather_single", "reduce_scatter_single")


def run_device():
    """The device common.setup picks for this process."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _tensors(args, kwargs):
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):  # all_gather's output list
            yield from (t for t in a if isinstance(t, torch.Tensor))


def _checked(name, fn, device):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for t in _tensors(args, kwargs):
            if t.device != device:  # a meta tensor is never equal to the run's device
                raise AssertionError(f"torch.distributed.{name}: a {tuple(t.shape)} {t.dtype} tensor on {t.device}, "
                                     f"the run's device is {device}")
        return fn(*args, **kwargs)
    wrapper.unchecked = fn
    return wrapper


def install():
    device = run_device()
    for name in WRAPPED:
        fn = getattr(torchdist, name, None)  # the *_single ones are FSDP2's in recent torch only
        if fn is not None and not hasattr(fn, "unchecked"):
            setattr(torchdist, name, _checked(name, fn, device))
