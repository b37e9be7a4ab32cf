#!/usr/bin/env bash
# deploy/slurm.sbatch on a one-node Slurm started here (Debian, as root): installs slurmctld, slurmd,
# slurm-client and munge if missing, starts them on a private slurm.conf, then checks that
#   a. an sbatch run (1 node x 2 processes) equals `torchrun --standalone --nproc_per_node 2` exactly;
#   b. a run sent the preemption notice checkpoints, requeues itself, resumes and ends with the weights
#      of an uninterrupted run;
#   c. a plain scancel cancels (it is not mistaken for a preemption).
# Prints PASS/FAIL per check and the total time; exits 1 on a failure; stops the daemons it started.
#   bash deploy/test_slurm.sh          # STEPS=40 (run b's length), KEEP=1 keeps the work dir
# The runs use a snapshot of the working tree (in the work dir): nothing is written to the checkout,
# and edits made meanwhile do not mix into one test.
set -uo pipefail
T0=$SECONDS
ROOT=$(cd "$(dirname "$0")/.." && pwd)
STEPS=${STEPS:-40}
[ "$(id -u)" = 0 ] || { echo "test_slurm.sh: run as root (it installs and starts Slurm)" >&2; exit 2; }
W=$(mktemp -d /tmp/nanotrl-slurm.XXXXXX)
H=$(hostname -s)
fails=0 started_munge=0
check() {  # check NAME COMMAND...: PASS or FAIL
    if "${@:2}"; then echo "PASS $1"; else echo "FAIL $1"; fails=$((fails + 1)); fi
}
die() { echo "FAIL $*"; fails=$((fails + 1)); exit 1; }
cleanup() {
    if [ -n "${SLURM_CONF:-}" ]; then
        squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null; sleep 2
        for d in slurmd slurmctld; do  # by the pid files of the daemons this script started
            [ -f "$W/$d.pid" ] || continue
            pid=$(cat "$W/$d.pid"); kill "$pid" 2>/dev/null
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        done
    fi
    [ "$started_munge" = 1 ] && munged -s >/dev/null 2>&1
    if [ "$fails" = 0 ] && [ "${KEEP:-0}" != 1 ]; then rm -rf "$W"; else echo "logs and runs kept in $W"; fi
    echo "total time: $((SECONDS - T0)) s"
    [ "$fails" = 0 ] && echo "ALL PASS" || echo "$fails FAILED"
}
trap cleanup EXIT
wait_for() {  # wait_for SECONDS COMMAND...: until the command succeeds
    local end=$((SECONDS + $1)); shift
    until "$@"; do [ "$SECONDS" -lt "$end" ] || return 1; sleep 0.5; done
}
job() { scontrol -o show job "$1" 2>/dev/null | grep -o "\b$2=[^ ]*" | cut -d= -f2; }

# ---- install, configure, start
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge \
        >"$W/apt.log" 2>&1 || die "apt-get install slurmctld slurmd slurm-client munge (see $W/apt.log)"
fi
pgrep -x slurmctld >/dev/null && die "a slurmctld is already running on this machine: this test starts its own"
[ -f /etc/munge/munge.key ] || { mungekey --create && chown munge:munge /etc/munge/munge.key; }
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge && chmod 0755 /run/munge && chmod 0700 /var/log/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    runuser -u munge -- munged || die "munged did not start (see /var/log/munge/munged.log)"
    started_munge=1
fi
mkdir -p "$W/state" "$W/spool"
cat >"$W/slurm.conf" <<EOF
ClusterName=nanotrl-test
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$W/state
SlurmdSpoolDir=$W/spool
SlurmctldPidFile=$W/slurmctld.pid
SlurmdPidFile=$W/slurmd.pid
SlurmctldLogFile=$W/slurmctld.log
SlurmdLogFile=$W/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
NodeName=$H NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$W/slurm.conf
slurmctld || die "slurmctld did not start (see $W/slurmctld.log)"
slurmd || die "slurmd did not start (see $W/slurmd.log)"
wait_for 60 sh -c "sinfo -h -n $H -o %T 2>/dev/null | grep -qx idle" || die "node $H not idle after 60 s: $(sinfo -N 2>&1)"
echo "one-node Slurm up ($(sinfo -V)): $(sinfo -h -o '%P %D %T %N')"

# ---- the runs use a snapshot of the working tree
mkdir -p "$W/repo"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) \
    | tar -xf - -C "$W/repo" || die "copying the working tree to $W/repo"
cd "$W/repo" || exit 1
export NPROC_PER_NODE=2 RDZV_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
SB=(sbatch --nodes=1 --gpus-per-node=0)   # the script's defaults are for 2 GPU nodes
same() {  # same A B: the loss and grad_norm series and the final weights of runs A and B are identical
    python3 - "$@" <<'EOF'
import json, sys, torch
from safetensors.torch import load_file
def series(d):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(f"{d}/metrics.jsonl")) if "loss" in r]
a, b = sys.argv[1:3]
sa, sb = series(a), series(b)
wa, wb = load_file(f"{a}/model/model.safetensors"), load_file(f"{b}/model/model.safetensors")
ok_m = sa == sb and len(sa) > 0
ok_w = wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
print(f"  metrics: {len(sa)} vs {len(sb)} steps, {'identical' if ok_m else 'DIFFERENT'}; "
      f"weights: {len(wa)} tensors, {'bit-identical' if ok_w else 'DIFFERENT'}")
sys.exit(0 if ok_m and ok_w else 1)
EOF
}

# ---- a. sbatch on 1 node x 2 processes == torchrun --standalone --nproc_per_node 2
A=(train_sft.py --max-steps 20 --log-every 1 --eval-every 0 --eval-samples 16)
t=$SECONDS
timeout 900 "${SB[@]}" --wait -o "$W/a-%j.out" deploy/slurm.sbatch "${A[@]}" --out "$W/slurm" >/dev/null
check "a. sbatch run finished (exit $?, $((SECONDS - t)) s)" test -f "$W/slurm/model/model.safetensors"
t=$SECONDS
torchrun --standalone --nproc_per_node 2 "${A[@]}" --out "$W/torchrun" >"$W/a-torchrun.log" 2>&1
check "a. torchrun run finished (exit $?, $((SECONDS - t)) s)" test -f "$W/torchrun/model/model.safetensors"
check "a. sbatch run == torchrun run (loss, grad_norm, weights)" same "$W/slurm" "$W/torchrun"

# ---- b. preemption notice -> checkpoint -> requeue -> resume -> the uninterrupted run's weights
B=(train_sft.py --max-steps "$STEPS" --save-every 5 --log-every 1 --eval-every 0 --eval-samples 16)
t=$SECONDS
J=$("${SB[@]}" --parsable -o "$W/b-%j.out" deploy/slurm.sbatch "${B[@]}" --out "$W/requeue")
ckpt() { compgen -G "$W/requeue/checkpoints/step_*[0-9]" >/dev/null; }
ended() { case $(job "$J" JobState) in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) ;; *) false;; esac; }
wait_for 600 eval 'ckpt || ended'
check "b. job $J wrote a checkpoint while running" test "$(ckpt && ! ended && echo yes)" = yes
scancel --signal=TERM --batch "$J"   # what --signal=B:TERM@120 does before a time limit
restarted() { [ "$(job "$J" Restarts)" -ge 1 ] 2>/dev/null && [ "$(job "$J" JobState)" = PENDING ]; }
check "b. job $J requeued itself after the notice" wait_for 300 restarted
# Slurm holds a requeued job for 120 s. Shortened here, but not to 0: a job restarted while the node still
# cleans up its previous run is killed ("Job credential revoked").
wait_for 120 sh -c "sinfo -h -n $H -o %T | grep -qx idle"; sleep 5
scontrol update JobId="$J" StartTime=now
wait_for 900 ended
echo "  job $J: $(job "$J" JobState), restarts $(job "$J" Restarts), exit $(job "$J" ExitCode), $((SECONDS - t)) s"
check "b. job $J completed" test "$(job "$J" JobState)" = COMPLETED
check "b. SLURM_RESTART_COUNT 1 in the second run" grep -q "restart 1 on" "$W/b-$J.out"
check "b. the second run resumed from the checkpoint" grep -q "resumed from $W/requeue/checkpoints/step_" "$W/b-$J.out"
grep -h "resumed from\|stopping after\|requeueing" "$W/b-$J.out" | sed 's/^/  /'
t=$SECONDS
torchrun --standalone --nproc_per_node 2 "${B[@]}" --out "$W/requeue-ref" >"$W/b-torchrun.log" 2>&1
check "b. uninterrupted torchrun run finished (exit $?, $((SECONDS - t)) s)" test -f "$W/requeue-ref/model/model.safetensors"
check "b. requeued run == uninterrupted run (loss, grad_norm, weights)" same "$W/requeue" "$W/requeue-ref"
# ---- c. a plain scancel (which also sends TERM) cancels: the job is not requeued
J=$("${SB[@]}" --parsable -o "$W/c-%j.out" deploy/slurm.sbatch "${B[@]}" --out "$W/cancel")
cckpt() { compgen -G "$W/cancel/checkpoints/step_*[0-9]" >/dev/null; }
wait_for 600 eval 'cckpt || ended'
scancel "$J"
wait_for 300 ended
check "c. scancel'd job $J ends CANCELLED, not requeued ($(job "$J" JobState), restarts $(job "$J" Restarts))" \
    test "$(job "$J" JobState) $(job "$J" Restarts)" = "CANCELLED 0"
[ "$fails" = 0 ]
