"""sweep.py, plot.py and --report-to. The sweep runs tests/support/fake_train.py (a few lines that write
known metrics and fail on demand), so these tests take seconds."""
import json
import os
import subprocess
import sys

import pytest

import common

import config
import loop
import plot
import sweep
from helpers import ROOT

FAKE = os.path.join(ROOT, "tests", "support", "fake_train.py")


def test_plan_expands_axes():
    """Comma lists become axes (product, in the order given, seeds innermost); single values and
    bare flags go to every run; a run's directory names its values."""
    d, runs = sweep.plan("train_dpo.py", ["--loss", "sigmoid,ipo", "--beta=0.1,0.5", "--rpo-alpha", "0", "--packing",
                                          "--stop-tokens", "a\\,b"], seeds=[0, 1], nproc=2, root="r")
    assert d == os.path.join("r", "sweep-dpo-loss-beta")
    assert [(r.variant, r.seed) for r in runs] == [(v, s) for v in ("loss=sigmoid,beta=0.1", "loss=sigmoid,beta=0.5",
                                                                   "loss=ipo,beta=0.1", "loss=ipo,beta=0.5") for s in (0, 1)]
    r = runs[3]
    assert r.flags == {"loss": "sigmoid", "beta": "0.5"}
    assert r.dir == os.path.join("r", "sweep-dpo-loss-beta", "loss=sigmoid,beta=0.5,seed=1")
    assert r.argv == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_dpo.py",
                      "--rpo-alpha", "0", "--packing", "--stop-tokens", "a,b", "--loss", "sigmoid", "--beta", "0.5",
                      "--seed", "1", "--out", r.dir]
    # one process: a plain python command; no axis: one "defaults" variant
    d, runs = sweep.plan("train_sft.py", ["--lr", "1e-3"], seeds=[3], name="x", root="r")
    assert d == os.path.join("r", "sweep-x") and len(runs) == 1 and runs[0].variant == "defaults"
    assert runs[0].argv == [sys.executable, "train_sft.py", "--lr", "1e-3", "--seed", "3", "--out", os.path.join(d, "seed=3")]
    for bad in (["--out", "x"], ["--seed", "1"], ["--lr", "1", "--lr", "2"], ["lr", "1"]):
        with pytest.raises(SystemExit):
            sweep.plan("train_sft.py", bad, seeds=[0])


@pytest.mark.slow  # sweep.py starts a process per run (tests/support/fake_train.py)
def test_sweep_runs_aggregates_resumes_and_records_failures(tmp_path, capsys):
    args = [FAKE, "--lr", "1,2,-1", "--tag", "t", "--seeds", "0,1,2", "--root", str(tmp_path), "--name", "s",
            "--metrics", "eval/accuracy,loss", "--parallel", "2"]
    sweep.main(args)
    d = tmp_path / "sweep-s"
    rows = {json.loads(line)["variant"]: json.loads(line) for line in open(d / "results.jsonl")}
    # final eval/accuracy = lr / 10 + seed / 100: lr=1 -> 0.10, 0.11, 0.12: mean 0.11, sample std
    # 0.01 (the population std would be 0.0082)
    acc = rows["lr=1"]["metrics"]["eval/accuracy"]
    assert acc["n"] == 3 and acc["mean"] == pytest.approx(0.11, abs=1e-12) and acc["std"] == pytest.approx(0.01, abs=1e-12)
    assert rows["lr=2"]["metrics"]["eval/accuracy"]["mean"] == pytest.approx(0.21, abs=1e-12)
    assert rows["lr=2"]["metrics"]["loss"]["std"] == 0.0 and rows["lr=2"]["wall"]["n"] == 3
    # the failing variant is in the table with its error, not left out
    bad = rows["lr=-1"]
    assert bad["seeds"] == [] and [f["seed"] for f in bad["failed"]] == [0, 1, 2]
    assert bad["failed"][0]["error"] == "ValueError: --lr -1.0: negative"
    md = (d / "results.md").read_text()
    assert "| lr=1 | 3 | 0.110 ± 0.010 | 0.091 ± 0.000 |" in md
    assert "| lr=-1 | 0 of 3 | - | - | - |" in md and "ValueError: --lr -1.0: negative" in md

    # resume: finished runs are skipped; failed and cut-off ones (no run.json) run again from scratch
    cut = d / "lr=2,seed=1"
    os.remove(cut / "run.json")
    (cut / "stale").write_text("")
    kept = (d / "lr=1,seed=0" / "run.json").read_text()
    capsys.readouterr()
    sweep.main(args)
    out = capsys.readouterr().out
    assert "5 of 9 runs already finished" in out and out.count("[sweep] start") == 4
    assert (d / "lr=1,seed=0" / "run.json").read_text() == kept
    assert not (cut / "stale").exists() and json.loads((cut / "run.json").read_text())["returncode"] == 0

    # several sweeps in one table (the README's), from their results.jsonl
    assert "| s: lr=1 | 3 | 0.110 ± 0.010 | - | 0." in sweep.combined_table([d], ["eval/accuracy", "reward"])

    # the same name with another fixed flag is refused, not mixed into the table
    with pytest.raises(SystemExit, match="another command"):
        sweep.main([a if a != "t" else "u" for a in args])


def test_mean_and_sample_std():
    m, s, n = sweep.mean_std([0.5, 0.7, 0.9])
    assert (m, s, n) == (pytest.approx(0.7), pytest.approx(0.2), 3)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert sweep.mean_std([0.5]) == (0.5, None, 1) and sweep.mean_std([]) == (None, None, 0)
    assert sweep.fmt({"mean": 0.5, "std": None, "n": 1}, 2) == "0.500 (n=1)"


def test_error_line_of_a_torchrun_log():
    log = ("step 1/10\nTraceback (most recent call last):\n  File \"x.py\", line 3\nFloatingPointError: step 3: loss is nan\n"
           "E1125 error_file: <N/A>\ntorch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
           "============\ntrain_dpo.py FAILED\n")
    assert sweep.error_of(log)[0] == "FloatingPointError: step 3: loss is nan"
    assert sweep.error_of("Killed\n")[0] == "Killed"


@pytest.mark.slow  # sweep.py starts a process per run (tests/support/fake_train.py)
def test_plot_curves_and_png(tmp_path):
    sweep.main([FAKE, "--lr", "1,2", "--seeds", "0,2", "--root", str(tmp_path), "--name", "p"])
    d = str(tmp_path / "sweep-p")
    os.remove(os.path.join(d, "lr=1,seed=2", "run.json"))  # a run still going joins its variant too
    groups = plot.find_runs([d])
    assert sorted(groups) == ["lr=1", "lr=2"] and len(groups["lr=1"]) == 2
    # lr=1, seeds 0 and 2: eval/accuracy at step 5 is 0.05 + seed / 100
    steps, mean, lo, hi = plot.curve(groups["lr=1"], "eval/accuracy")
    assert steps == [0, 5, 10] and mean[1] == pytest.approx(0.06) and (lo[1], hi[1]) == pytest.approx((0.05, 0.07))
    pytest.importorskip("matplotlib")
    out = plot.main([d, os.path.join(d, "lr=2,seed=0"), "--metrics", "eval/accuracy,loss", "--out", str(tmp_path / "c.png")])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def logger(tmp_path, report_to, start_step=0, rank=0):
    cfg = config.TrainConfig(out=str(tmp_path), report_to=report_to, max_steps=4)
    return loop.Logger(cfg, common.Dist(rank, 2, None, None), start_step)


def test_report_to_tensorboard_matches_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = logger(tmp_path, "tensorboard")
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step, "eval/accuracy": step / 10, "note": "text"})
    # resumed from step 2: step 3 again, with another value, replaces the first run's step 3
    log = logger(tmp_path, "tensorboard", start_step=2)
    log.log(3, {"loss": 0.25, "eval/accuracy": 0.5})
    log.log(4, {"loss": 0.2, "eval/accuracy": 0.6})
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert sorted(ea.Tags()["scalars"]) == ["eval/accuracy", "loss"]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    for tag in ("loss", "eval/accuracy"):
        tb = [(e.step, e.value) for e in ea.Scalars(tag)]
        assert [s for s, _ in tb] == [r["step"] for r in records]
        assert [v for _, v in tb] == pytest.approx([r[tag] for r in records], rel=1e-6)  # TB stores float32


def test_report_to_wandb_sends_the_same_records_from_rank_0(tmp_path, monkeypatch):
    """Against a stand-in wandb module (the real one needs its service process): init once on
    rank 0 with the config, then the metrics.jsonl records at their steps."""
    calls = []

    class Run:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    class FakeWandb:
        @staticmethod
        def init(**kw):
            calls.append(("init", kw))
            return Run()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    logger(tmp_path / "r1", "wandb", rank=1).log(1, {"loss": 1.0})
    assert calls == []
    log = logger(tmp_path / "r0", "wandb")
    log.log(1, {"loss": 0.5, "lr": 1e-3}, tokens=100)
    assert calls[0][0] == "init" and calls[0][1]["name"] == "r0" and calls[0][1]["config"]["report_to"] == "wandb"
    record = json.loads(open(tmp_path / "r0" / "metrics.jsonl").readline())
    assert calls[1] == ("log", 1, {k: v for k, v in record.items() if k != "step"})


@pytest.mark.slow
def test_loggers_are_imported_only_when_asked(tmp_path, capsys):
    code = (f"import sys, common, config, loop, train_sft, train_dpo, train_ppo, train_rm, train_distill\n"
            f"log = loop.Logger(config.TrainConfig(out={str(tmp_path)!r}), common.Dist(0, 1, None, None))\n"
            "log.log(1, {'loss': 1.0})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('wandb', 'tensorboard', 'tensorboardX')"
            " or m.startswith('torch.utils.tensorboard')))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"
    with pytest.raises(SystemExit):  # an unknown name is refused by the flag parser (TrainConfig.CHOICES/MULTI)
        config.parse_config(config.TrainConfig, ["--report-to", "wandb,mlflow"])
    assert "--report-to 'mlflow'" in capsys.readouterr().err
