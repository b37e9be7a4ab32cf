"""deploy/slurm.sbatch without Slurm: it parses, and its DRY_RUN=1 mode prints the srun + torchrun command
it would run for a fake job environment (a stub scontrol expands the node list). deploy/test_slurm.sh
runs it on a real one-node Slurm."""
import os
import shlex
import subprocess

import pytest

from helpers import ROOT

SBATCH = os.path.join(ROOT, "deploy", "slurm.sbatch")


def test_parses():
    subprocess.run(["bash", "-n", SBATCH], check=True)


@pytest.fixture
def dry_run(tmp_path):
    """dry_run(args, **env) -> (exit status, argv it would run, stderr)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "scontrol"  # `scontrol show hostnames node[01-02]`: one host a line
    stub.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames node[01-02]" ] && printf "node01\\nnode02\\n"\n')
    stub.chmod(0o755)

    def run(args, **env):
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NPROC_PER_NODE", "HSDP"))}
        base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", DRY_RUN="1", SLURM_JOB_ID="4242",
                    SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[01-02]",
                    SLURM_CPUS_ON_NODE="96")
        base.update(env)
        p = subprocess.run(["bash", SBATCH, *args], env=base, capture_output=True, text=True, timeout=30)
        return p.returncode, shlex.split(p.stdout), p.stderr
    return run


def torchrun(nodes, nproc, cpus="96"):
    return ["srun", f"--nodes={nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}", "--kill-on-bad-exit=1",
            "torchrun", "--nnodes", str(nodes), "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", "node01:29500", "--rdzv-id", "4242"]


def test_two_nodes(dry_run):
    """2 nodes: one torchrun per node, rendezvous at the first node, --resume and --hsdp 2 appended."""
    rc, argv, err = dry_run(["train_sft.py", "--model", "m", "--out", "runs/x"], NPROC_PER_NODE="8")
    assert rc == 0, err
    assert argv == torchrun(2, 8) + ["train_sft.py", "--model", "m", "--out", "runs/x", "--resume", "--hsdp", "2"]


def test_processes_per_node_and_hsdp_switch(dry_run):
    """G from the job's GPUs (SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE, "type:count"); NPROC_PER_NODE
    wins. One node: no --hsdp unless HSDP=1; HSDP=0 turns it off; a --hsdp given is kept as it is."""
    one = dict(SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node[01-02]")
    rc, argv, err = dry_run(["train_dpo.py", "--out=runs/d"], SLURM_GPUS_PER_NODE="h100:4", **one)
    assert rc == 0, err
    assert argv == torchrun(1, 4) + ["train_dpo.py", "--out=runs/d", "--resume"]
    _, argv, _ = dry_run(["train_dpo.py", "--out=runs/d"], SLURM_GPUS_ON_NODE="8", SLURM_GPUS_PER_NODE="h100:4",
                         HSDP="1", **one)
    assert argv == torchrun(1, 8) + ["train_dpo.py", "--out=runs/d", "--resume", "--hsdp", "1"]
    _, argv, _ = dry_run(["train_sft.py", "--out", "o"], NPROC_PER_NODE="2", HSDP="0")
    assert argv == torchrun(2, 2) + ["train_sft.py", "--out", "o", "--resume"]
    _, argv, _ = dry_run(["train_sft.py", "--out", "o", "--hsdp", "1"], NPROC_PER_NODE="2")
    assert argv == torchrun(2, 2) + ["train_sft.py", "--out", "o", "--hsdp", "1", "--resume"]


def test_needs_out(dry_run):
    """--out decides whether a requeued job is finished: without it the job stops at once."""
    rc, argv, err = dry_run(["train_sft.py", "--model", "m"], NPROC_PER_NODE="8")
    assert rc == 2 and argv == [] and "--out" in err
