"""bench/gpu_check.sh, the first GPU run as one command: --help lists its stages, a failing stage is
recorded with its error (and the status says so), and --cpu runs every stage end to end here
(tiny shapes, ~4 minutes on 2 cores), one ok record each."""
import json
import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_help_lists_every_stage():
    out = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, check=True).stdout
    listed = [int(m) for m in re.findall(r"^  (\d)  \w+", out, re.M)]
    assert listed == list(range(7)), out


def test_a_failing_stage_is_recorded(tmp_path):
    """A stage whose command fails gets ok false with its exit status and last lines; the script's
    status is non-zero. (A python that fails on the attention driver and is python otherwise.)"""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\n[ "$1" = bench/attention_paths.py ] && { echo "kernel boom" >&2; exit 3; }\n'
                    'exec python "$@"\n')
    fake.chmod(0o755)
    out = tmp_path / "x.jsonl"
    r = subprocess.run(["bash", SCRIPT, "--cpu", "--only", "0", "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(fake)}, timeout=120)
    assert r.returncode != 0, r.stdout + r.stderr
    (rec,) = records(out)
    assert rec["stage"] == 0 and rec["ok"] is False, rec
    assert rec["error"].startswith("exit status 3") and "kernel boom" in rec["error"], rec["error"]


@pytest.mark.slow
def test_cpu_mode_runs_every_stage(tmp_path):
    out = tmp_path / "x.jsonl"
    r = subprocess.run(["bash", SCRIPT, "--cpu", "--out", str(out)], capture_output=True, text=True, timeout=1500)
    recs = records(out)
    assert [rec["stage"] for rec in recs] == list(range(7)), r.stdout + r.stderr
    for rec in recs:
        assert rec["ok"] is True and rec["mode"] == "cpu", (rec.get("error"), rec["name"])
        assert rec["results"], rec  # every stage prints the JSON lines of its benches or runs
        for res in rec["results"]:  # a sub-run that did not run says why, and is not a failure
            assert res.get("ok", True) is True and ("skipped" not in res or res["skipped"]), res
    assert r.returncode == 0, r.stdout + r.stderr
    smoke = {res["run"]: res for res in recs[1]["results"]}
    assert smoke["train_sft.py --cpu-offload"]["skipped"] == "needs CUDA"
    assert {"train_sft.py", "train_dpo.py --lora-r 8 --quantize nf4", "train_rm.py", "train_ppo.py",
            "train_ppo.py --algo ppo --lora-r 8 --quantize nf4", "train_ppo.py --tools agent:calculator",
            "train_distill.py", "train_ppo.py --resume"} <= smoke.keys(), smoke.keys()
    cases = {res["case"]: res for res in recs[0]["results"] if "case" in res}
    assert set(cases) == {"causal_gqa", "masked_gqa", "masked_expanded", "decode_gqa", "decode_folded",
                          "decode_expanded"}
    for case in cases.values():  # every alternative computes the same attention
        assert case["default"] in case["accepted"] and case["max_abs_err"] < 1e-4, case
