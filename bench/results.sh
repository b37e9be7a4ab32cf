#!/usr/bin/env bash
# The built-in task's table (docs/results.md; the README shows a selection): every stage with
# `sweep.py` (mean +- sample std over seeds), then one table (runs/results.md) and the curves
# (runs/results.png). Rerunning skips the runs already finished.
#   bash bench/results.sh                   # every row over seeds 0-2 (~2 h on the 2-core dev machine)
#   SEEDS=0 bash bench/results.sh           # seed 0 only (~40 min)
# Processes: NPROC, else one per GPU, else 2 on a CPU (the table's figures are from 2 CPU processes).
# DPO, RL and the reward model all start from runs/sft (the SFT stage's defaults, seed 0),
# distillation's teacher is runs/ppo (GRPO's defaults, seed 0) and LoRA SFT adapts runs/sft_base;
# they are trained first, on their own, so that no row's wall time includes them. A row's seeds
# vary its own sampling and batch order only.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${NPROC:-}" ]; then N=$NPROC  # processes: NPROC, else one per GPU torch sees, else 2 on a CPU
else
  N=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  [ "$N" -gt 0 ] 2>/dev/null || N=2
fi
S="python sweep.py --seeds ${SEEDS:-0,1,2} --nproc $N"
M="python sweep.py --seeds ${SEEDS_MORE:-${SEEDS:-0,1,2}} --nproc $N"
[ -e runs/sft/model/config.json ] || torchrun --standalone --nproc_per_node "$N" train_sft.py --out runs/sft
[ -e runs/ppo/model/config.json ] || torchrun --standalone --nproc_per_node "$N" train_ppo.py --out runs/ppo
# the base that the LoRA SFT row adapts (a short full fine-tuning run, seed 0)
[ -e runs/sft_base/model/config.json ] || torchrun --standalone --nproc_per_node "$N" train_sft.py --max-steps 300 --out runs/sft_base
# the loss variants, REINFORCE++, online DPO, distillation, LoRA and QLoRA
$M train_ppo.py --loss cispo,sapo --name readme-loss
$M train_ppo.py --importance-level sequence --clip-eps 3e-4 --clip-eps-high 4e-4 --loss-agg grpo --beta 0 --name readme-gspo
$M train_ppo.py --algo reinforce_pp --name readme-rpp
$M train_ppo.py --algo reinforce_pp --beta 0.1 --name readme-algo
$M train_ppo.py --algo online_dpo --beta 0.1 --rpo-alpha 1,0 --name readme-odpo  # online DPO's beta is DPO's
$M train_distill.py --student-layers 0,2 --name readme-distill
$M train_dpo.py --lora-r 8 --quantize ,nf4 --name readme-dpo-lora
$M train_ppo.py --lora-r 8 --quantize ,nf4 --name readme-grpo-lora
$M train_sft.py --lora-r 16 --name readme-sft-lora
# the stages of the first table
$S train_sft.py --name readme-sft
$S train_dpo.py --rpo-alpha 1,0 --name readme-dpo
$S train_ppo.py --algo grpo,rloo,ppo --name readme-rl
$S train_rm.py --name readme-rm
python sweep.py --table runs/sweep-readme-{sft,dpo,rl,rm,loss,gspo,rpp,algo,odpo,distill,dpo-lora,grpo-lora,sft-lora} | tee runs/results.md
if python -c 'import matplotlib' 2>/dev/null; then python plot.py runs/sweep-readme-{dpo,rl} --out runs/results.png; fi
