#!/usr/bin/env bash
# The built-in task with agent.py's calculator: SFT on train_tools.jsonl (every 3rd demonstration
# calls the calculator, the others keep the flawed teacher's carries), then GRPO from that model
# with the tool and without it, seeds 0 and 1, on one process per GPU (2 on a machine without one).
# Prints each run's held-out accuracy (and tool-call rate) before -> after, and its wall time, as
# JSON lines.
#   bash bench/agent_demo.sh            (from the repository root; NPROC=1 for one process)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${NPROC:-}" ]; then N=$NPROC  # processes: NPROC, else one per GPU torch sees, else 2 on a CPU
else
  N=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  [ "$N" -gt 0 ] 2>/dev/null || N=2
fi
STEPS=${STEPS:-30}
python -c "from data import task; task.ensure_task(task.TASK_DIR)"
[ -e runs/sft_tools/model/config.json ] || torchrun --standalone --nproc_per_node "$N" train_sft.py \
    --data runs/task/train_tools.jsonl --eval-data runs/task/test.jsonl --out runs/sft_tools
COMMON=(--model runs/sft_tools/model --max-new-tokens 96 --max-steps "$STEPS" --eval-every 10)
for seed in 0 1; do
  for tools in yes no; do
    out=runs/grpo_tools_${tools}_s$seed
    extra=()
    [ "$tools" = yes ] && extra=(--tools agent:calculator --describe-tools false --max-tool-calls 1)
    if [ ! -e "$out/model/config.json" ]; then  # a finished run is reported, not rerun
      start=$(date +%s)
      torchrun --standalone --nproc_per_node "$N" train_ppo.py "${COMMON[@]}" "${extra[@]}" --seed "$seed" \
          --out "$out" --overwrite > "$out.log" 2>&1
      echo $(( $(date +%s) - start )) > "$out.wall"
    fi
    python - "$out" "$tools" "$seed" "$(cat "$out.wall")" <<'PY'
import json, sys
out, tools, seed, wall = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
evals = [r for r in map(json.loads, open(f"{out}/metrics.jsonl")) if "eval/accuracy" in r]
row = {"run": out, "tools": tools == "yes", "seed": seed, "wall_s": wall,
       "accuracy": [evals[0]["eval/accuracy"], evals[-1]["eval/accuracy"]]}
if "eval/tool_call_rate" in evals[0]:
    row["tool_call_rate"] = [evals[0]["eval/tool_call_rate"], evals[-1]["eval/tool_call_rate"]]
print(json.dumps(row))
PY
  done
done
