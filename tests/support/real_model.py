"""SmolLM2-135M-Instruct as a Hugging Face directory, for tests/test_real_model.py.

../shared/models/smollm2-135m-instruct holds the model as a GGUF file and to_hf.py, which writes
the HF directory (~540 MB, ~10 s, needs the gguf package). That runs once per machine, into a cache
outside the repository: $NANOTRL_CACHE/smollm2-135m-instruct, else
~/.cache/nanotrl/smollm2-135m-instruct. $NANOTRL_SHARED replaces ../shared (resolved from the
repository root, as the other tests do), e.g. /nonexistent to check that the tests skip.
"""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "smollm2-135m-instruct"


class Unavailable(Exception):
    """The model cannot be had on this machine; the message says why (the tests skip with it)."""


def source_dir():
    return os.path.join(os.environ.get("NANOTRL_SHARED") or os.path.join(ROOT, "..", "shared"), "models", NAME)


def cache_dir():
    root = os.environ.get("NANOTRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanotrl")
    return os.path.join(root, NAME)


def done(path):
    return os.path.isfile(os.path.join(path, "model.safetensors"))


def model_dir():
    """The converted HF directory, made first if this machine has none. The conversion writes into a
    temp dir beside the target and renames it into place, so the target is either absent or whole,
    and two test processes racing both succeed (the second rename fails; its copy is dropped)."""
    src, out = source_dir(), cache_dir()
    if not os.path.isfile(os.path.join(src, "to_hf.py")):
        raise Unavailable(f"{src} not present")
    if done(out):
        return out
    if importlib.util.find_spec("gguf") is None:
        raise Unavailable(f"no converted copy at {out}, and converting one needs the gguf package "
                          "(requirements-dev.txt)")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=NAME + ".tmp-", dir=os.path.dirname(out))
    try:
        p = subprocess.run([sys.executable, os.path.join(src, "to_hf.py"), tmp], capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{src}/to_hf.py {tmp} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
        try:
            os.rename(tmp, out)
        except OSError as e:
            if not done(out):  # not a lost race (another process's whole copy): something else is there
                raise RuntimeError(f"{out}: cannot put the converted model there ({e}); remove it") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out
