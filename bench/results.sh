#!/usr/bin/env bash
# The README's built-in task table: every stage over seeds 0-2 with `sweep.py`, then one table
# (runs/results.md) and the curves (runs/results.png). Rerunning skips the runs already finished.
#   bash bench/results.sh      # estimated ~25 min on the idle 2-core dev machine (the README stage times x 3)
# DPO, RL and the reward model all start from runs/sft (the SFT stage's defaults, seed 0); it is
# trained first, on its own, so that no run's wall time includes it. Their seeds vary their own
# sampling and batch order only.
set -euo pipefail
cd "$(dirname "$0")/.."
S="python sweep.py --seeds 0,1,2 --nproc ${NPROC:-2}"
[ -e runs/sft/model/config.json ] || torchrun --standalone --nproc_per_node "${NPROC:-2}" train_sft.py --out runs/sft
$S train_sft.py --name readme-sft
$S train_dpo.py --rpo-alpha 1,0 --name readme-dpo
$S train_ppo.py --algo grpo,rloo,ppo --name readme-rl
$S train_rm.py --name readme-rm
python sweep.py --table runs/sweep-readme-{sft,dpo,rl,rm} | tee runs/results.md
if python -c 'import matplotlib' 2>/dev/null; then python plot.py runs/sweep-readme-{dpo,rl} --out runs/results.png; fi
