#!/usr/bin/env bash
# The built-in task end to end, stage by stage (a few minutes each on a 2-core laptop CPU):
#   bash quickstart.sh              # one process per GPU (NCCL), or 2 on a machine without one (gloo)
#   NPROC=1 bash quickstart.sh      # one process (NPROC sets the count either way)
# Each stage reads what an earlier one saved; a script whose input is missing stops and prints the
# command that makes it (no script runs another). A stage whose model exists is skipped.
set -euo pipefail
cd "$(dirname "$0")"
if [ -n "${NPROC:-}" ]; then N=$NPROC  # processes: NPROC, else one per GPU torch sees, else 2 on a CPU
else
  N=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  [ "$N" -gt 0 ] 2>/dev/null || N=2
fi
stage() {  # stage OUT SCRIPT [FLAGS...]: train into OUT unless OUT/model exists
  local out="$1"; shift
  [ -e "$out/model/config.json" ] || torchrun --standalone --nproc_per_node "$N" "$@" --out "$out"
}
stage runs/sft train_sft.py                        # SFT of a 0.8M-parameter model from scratch
stage runs/dpo train_dpo.py                        # DPO from runs/sft on its own sampled, verified answers
stage runs/rm train_rm.py                          # a reward model on the same kind of pairs
stage runs/ppo train_ppo.py                        # GRPO from runs/sft with the task's verifier
stage runs/ppo-critic train_ppo.py --algo ppo      # PPO: a value model from the policy
stage runs/distill train_distill.py                # GKD: runs/ppo's GRPO model taught to the SFT model
