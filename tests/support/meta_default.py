"""Run a training script with torch's default device set to `meta`, so that every tensor made
without an explicit device is a meta tensor: the first time one meets a real tensor (or is read),
the run fails where it was made. On a GPU such a tensor would silently be a CPU tensor, and NCCL or
a CUDA kernel would reject it (or it would cost a blocking copy) only there; here the CPU run
catches it.

    python tests/support/meta_default.py [--check-collectives] train_dpo.py --flags...
    python -m torch.distributed.run --nproc_per_node 2 tests/support/meta_default.py --check-collectives ...

--check-collectives also wraps torch.distributed's tensor collectives to assert every tensor is on
the run's device (checked_collectives.py). The script path is relative to the repository root.
"""
import os
import runpy
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
_asarray = torch.asarray


def asarray(obj, *args, **kwargs):
    """torch.asarray over existing memory keeps that memory's device, as it does with no default
    device set: safetensors' slice reads (hf_io.read_tensor with a shard) wrap the file's bytes so."""
    if isinstance(obj, torch.UntypedStorage) and kwargs.get("device") is None:
        kwargs["device"] = obj.device
    return _asarray(obj, *args, **kwargs)


if __name__ == "__main__":
    args = sys.argv[1:]
    check = args[:1] == ["--check-collectives"]
    if check:
        args = args[1:]
        import checked_collectives  # from tests/support, this file's directory (sys.path[0])
        checked_collectives.install()
    script = os.path.join(ROOT, args[0])
    # as `python train_x.py` would have it: the script's directory first (the flat modules, and
    # --env tests.support.envs:... from the root); argv[0] the script
    sys.path[0] = os.path.dirname(script)
    sys.argv = [script] + args[1:]
    torch.asarray = asarray
    torch.set_default_device("meta")
    runpy.run_path(script, run_name="__main__")
