"""generate.py as the README runs it: its own command line, read from README.md, on a model with the
built-in task's 256 positions, where the default answer length must shrink to what the prompt leaves."""
import os
import shlex
import subprocess
import sys

from helpers import ROOT, tiny_model_dir


def readme_command():
    with open(os.path.join(ROOT, "README.md")) as f:
        line = next(x for x in f if x.startswith("python generate.py"))
    return shlex.split(line, comments=True)


def generate(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_readme_generate_command_runs_and_a_cap_that_does_not_fit_is_refused(tmp_path):
    model = tiny_model_dir(str(tmp_path / "model"))
    cmd = readme_command()
    assert cmd[:2] == ["python", "generate.py"] and "--model" in cmd, cmd
    args = cmd[2:]
    args[args.index("--model") + 1] = model  # the README's model comes from `bash quickstart.sh`
    p = generate(args, tmp_path)
    assert p.returncode == 0 and p.stdout.strip(), p.stdout + p.stderr
    p = generate(args + ["--max-new-tokens", "256"], tmp_path)  # asked for: refused, never cut
    assert p.returncode == 2 and p.stderr.startswith("error: the prompt's ") and "exceed the model's 256 positions" \
        in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_device_and_dtype_flags(tmp_path):
    """--device and --dtype: bf16 weights on the CPU generate; a device that is not there is one line."""
    model = tiny_model_dir(str(tmp_path / "model"))
    p = generate(["--model", model, "--prompt", "What is 1+2?", "--device", "cpu", "--dtype", "bf16",
                  "--max-new-tokens", "4"], tmp_path)
    assert p.returncode == 0, p.stderr
    p = generate(["--model", model, "--prompt", "Hi", "--device", "nope"], tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("error: --device nope:") and "Traceback" not in p.stderr, p.stderr
