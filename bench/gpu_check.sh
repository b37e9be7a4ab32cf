#!/usr/bin/env bash
# The first run on a GPU, as one prepared command (~10 min on one H100): every stage below in its
# own process under `timeout`, one JSON line per stage appended to --out whatever happens, so one
# crash or hang costs its stage only. Exit status 0 only if every stage passed.
#   bash bench/gpu_check.sh                        # one GPU; appends to runs/gpu_check.jsonl
#   bash bench/gpu_check.sh --out FILE --only 0,3  # another file; some stages
#   bash bench/gpu_check.sh --cpu                  # the same stages with tiny shapes on the CPU
# A record: {"stage", "name", "ok", "seconds", "mode", "run", "results": [the JSON lines the
# stage printed], "log"} and, when not ok, "error" (why, and the last lines of its output). Each
# stage's whole output is kept in <out without .jsonl>.logs/<run>/. PYTHON picks the interpreter.
set -u
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")

usage() {
  cat <<'EOF'
usage: bash bench/gpu_check.sh [--cpu] [--out FILE] [--only N,N,...]

Stages (GPU budget; --cpu: tiny shapes, fp32, plain python instead of torchrun):
  0  attention     versions (torch, CUDA, cuDNN, NCCL, GPU) and which SDPA kernel each of nanotrl's
                   attention calls gets, with time and peak memory: causal, masked (enable_gqa or
                   K/V expanded), decode over a 2048 cache (enable_gqa, query groups folded, expanded)
                   at B 4, T 2048, 32/8 heads, head_dim 128, bf16 (bench/attention_paths.py)   60 s
  1  smoke         every script a few steps on the built-in task under torchrun: SFT, DPO (QLoRA
                   nf4), RM, GRPO, PPO (QLoRA nf4), GRPO with the calculator agent, distillation,
                   --stop-after then --resume, --cpu-offload (GPU only)                        170 s
  2  precision     bf16 vs fp32 log-probs and loss on one model (bench/precision.py); DCP: a
                   checkpoint at step 2, then --resume, under torchrun; the same sharded by FSDP2
                   (--cpu-offload: a group of one; GPU only)                                     60 s
  3  train_step    SFT and DPO step tokens/s, MFU and peak memory, Llama-3.2-1B shape at 2,048
                   tokens (bench/train_step.py)                                                  85 s
  4  generate      sampling tokens/s and the HBM-bandwidth fraction of a decode step at batch 64
                   and 1, Qwen2.5-0.5B shape (bench/generate.py)                                 55 s
  5  grpo_step     one GRPO step at the Qwen2.5-0.5B shape, time per stage (bench/grpo_step.py)  55 s
  6  big_model     Llama-3-8B QLoRA (nf4, r 16) DPO step: peak GPU memory against the memory
                   model's prediction (bench/big_model.py)                                       85 s

Options:
  --cpu        run here, on the CPU (no GPU needed): the same stages and fields, tiny shapes
  --out FILE   where the records are appended (default runs/gpu_check.jsonl)
  --only LIST  comma-separated stage numbers (default: all)
EOF
}

PY=${PYTHON:-python}
MODE=gpu OUT=runs/gpu_check.jsonl ONLY=0,1,2,3,4,5,6 STAGE=
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --out) OUT=$2; shift ;;
    --only) ONLY=$2; shift ;;
    --stage) STAGE=$2; shift ;;  # internal: run one stage in this process (the driver's child)
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for n in ${ONLY//,/ }; do
  case "$n" in [0-6]) ;; *) echo "gpu_check.sh: --only $ONLY: stages are 0-6" >&2; exit 2 ;; esac
done
OUT=$(realpath -m "$OUT")  # as given, from the caller's directory
cd "$(dirname "$SELF")/.."
if [ "$MODE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""  # the CPU path even on a GPU machine
  LAUNCH=("$PY")
  BUDGETS=(120 400 180 180 180 180 240)  # guards only: the shared 2-core dev machine takes 4-5 min in all
else
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
  BUDGETS=(60 170 60 85 55 55 85)  # seconds: 9.5 min, and the rest of 10 for starts and records
fi
NAMES=(attention smoke precision train_step generate grpo_step big_model)

# ----------------------------------------------------------------------------- the stages
# Each prints JSON lines (the benches' own) on stdout; a training run's output goes to its own log.

sub() {  # sub NAME CMD...: one command under its own timeout; prints {"run": NAME, "ok", "seconds"[, "error"]}
  local name=$1 log t0 rc=0
  shift
  log="$GC_LOGS/stage$STAGE-$(echo "$name" | tr -c 'A-Za-z0-9_.\n-' '_').log"
  t0=$(date +%s.%N)
  # --foreground: the command stays in the stage's process group, which the stage's own timeout kills
  timeout --foreground -k 10 "${SUB_BUDGET:-120}" "$@" > "$log" 2>&1 || rc=$?
  "$PY" - "$name" "$rc" "$t0" "$(date +%s.%N)" "$log" <<'PY'
import json, sys
name, rc, t0, t1, log = sys.argv[1:]
rec = {"run": name, "ok": rc == "0", "seconds": round(float(t1) - float(t0), 1)}
if rc != "0":
    tail = open(log, errors="replace").read().splitlines()[-12:]
    rec["error"] = ("timed out" if rc in ("124", "137") else f"exit status {rc}") + ": " + "\n".join(tail)
print(json.dumps(rec), flush=True)
PY
}

stage0() {
  "$PY" bench/attention_paths.py $([ "$MODE" = cpu ] && echo --cpu)
}

stage1() {
  local W=$GC_WORK/smoke M pairs
  mkdir -p "$W"
  local common=(--max-steps 2 --log-every 1) few=(--eval-samples 8)  # train_rm has no eval/accuracy
  local rl=(--prompts-per-step 4 --group-size 4 --minibatches 1 "${few[@]}")
  # the SFT model every other script starts from: a short SFT run, which is SFT's smoke test too
  sub "train_sft.py" "${LAUNCH[@]}" train_sft.py "${common[@]}" "${few[@]}" --max-steps 3 --batch-size 8 --out "$W/sft"
  M=$W/sft/model
  if [ ! -e "$M/config.json" ]; then  # SFT failed: the task's fresh model, so the other scripts still get their check
    "$PY" -c "import sys, hf_io, model as M; from data import task; d = task.ensure_task(); m = M.Transformer(M.ModelConfig.from_hf(task.MODEL_CONFIG)); m.init_weights(seed=0); hf_io.save_pretrained(m, sys.argv[1], tokenizer_dir=d)" "$M" >&2
  fi
  # DPO and RM sample their pairs from a model that answers right sometimes: a 3-step model never
  # does, so they get the task's pairs from its records (the true answer vs one 10 off)
  pairs=$W/pairs.jsonl
  "$PY" -c "import json, os, sys; from data import task; recs = [json.loads(l) for l in open(os.path.join(task.ensure_task(), 'train.jsonl'))][:64]; open(sys.argv[1], 'w').writelines(json.dumps({'prompt': r['prompt'], 'chosen': str(r['answer']), 'rejected': str(int(r['answer']) + 10)}) + '\n' for r in recs)" "$pairs" >&2
  local runs=(
    "train_dpo.py --lora-r 8 --quantize nf4|train_dpo.py --model $M --data $pairs --batch-size 4 --lora-r 8 --quantize nf4 ${few[*]} --out $W/dpo"
    "train_rm.py|train_rm.py --model $M --data $pairs --batch-size 4 --out $W/rm"
    "train_ppo.py|train_ppo.py --model $M ${rl[*]} --out $W/grpo"
    "train_ppo.py --algo ppo --lora-r 8 --quantize nf4|train_ppo.py --model $M ${rl[*]} --algo ppo --lora-r 8 --quantize nf4 --out $W/ppo"
    "train_ppo.py --tools agent:calculator|train_ppo.py --model $M ${rl[*]} --tools agent:calculator --describe-tools false --max-tool-calls 1 --max-new-tokens 32 --out $W/agent"
    "train_distill.py|train_distill.py --model $M --teacher $M --batch-size 4 ${few[*]} --out $W/distill"
  )
  # on a GPU the runs share the card in parallel (tiny models; 16 cores), on a CPU one at a time
  local run pids=()
  [ "$MODE" = gpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
  for run in "${runs[@]}"; do  # "NAME|SCRIPT FLAGS..."
    # shellcheck disable=SC2086  # the flags are words; the paths have no spaces (mktemp)
    if [ "$MODE" = gpu ]; then sub "${run%%|*}" "${LAUNCH[@]}" ${run#*|} "${common[@]}" & pids+=($!)
    else sub "${run%%|*}" "${LAUNCH[@]}" ${run#*|} "${common[@]}"; fi
  done
  resume() {  # GRPO checkpointed after step 2 of 3, then resumed: the same flags, --resume
    local flags=(--model "$M" "${rl[@]}" "${common[@]}" --max-steps 3 --out "$W/resume")
    sub "train_ppo.py --stop-after 2" "${LAUNCH[@]}" train_ppo.py "${flags[@]}" --stop-after 2
    sub "train_ppo.py --resume" "${LAUNCH[@]}" train_ppo.py "${flags[@]}" --resume
    sub "resumed to step 3" "$PY" -c "import json, os, sys; steps = [json.loads(l)['step'] for l in open(sys.argv[1] + '/metrics.jsonl')]; assert os.path.exists(sys.argv[1] + '/model/config.json') and max(steps) == 3, steps" "$W/resume"
  }
  if [ "$MODE" = gpu ]; then
    resume & pids+=($!)
    sub "train_sft.py --cpu-offload" "${LAUNCH[@]}" train_sft.py "${common[@]}" "${few[@]}" --cpu-offload --out "$W/offload" & pids+=($!)
    wait "${pids[@]}"
  else
    resume
    echo '{"run": "train_sft.py --cpu-offload", "ok": true, "skipped": "needs CUDA"}'
  fi
}

stage2() {
  local W=$GC_WORK/precision
  mkdir -p "$W"
  if [ "$MODE" = gpu ]; then "$PY" bench/precision.py --shape qwen2.5-0.5b --seq-len 512 --batch 4
  else "$PY" bench/precision.py --batch 2 --seq-len 64; fi
  # DCP: a checkpoint of step 2, then --resume to step 4, under torchrun. One process alone is not
  # sharded; with --cpu-offload (GPU only) common.setup makes it a group of one and FSDP2 shards it
  local tr=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)
  dcp() {  # dcp NAME [FLAGS...]
    local name=$1 flags=(train_sft.py --max-steps 4 --batch-size 8 --eval-samples 8 --log-every 1 --save-every 1)
    shift
    flags+=("$@" --out "$W/$name")
    sub "$name: train_sft.py --stop-after 2" "${tr[@]}" "${flags[@]}" --stop-after 2
    sub "$name: train_sft.py --resume" "${tr[@]}" "${flags[@]}" --resume
    "$PY" - "$W/$name" "$GC_LOGS/stage2-${name}__train_sft.py_--resume.log" "$name" <<'PY'
import glob, json, os, sys
out, log, name = sys.argv[1:]
ckpts = sorted(glob.glob(os.path.join(out, "checkpoints", "step_*")))
states = [json.load(open(os.path.join(c, "state.json"))) for c in ckpts if os.path.exists(os.path.join(c, "state.json"))]
metrics = os.path.join(out, "metrics.jsonl")
steps = [json.loads(line)["step"] for line in open(metrics)] if os.path.exists(metrics) else []
resumed = os.path.exists(log) and any(line.startswith("resumed from") and "at step 2" in line for line in open(log))
ok = bool(states) and resumed and max(steps, default=0) == 4 and os.path.exists(os.path.join(out, "model", "config.json"))
print(json.dumps({"run": f"{name}: resumed at step 2, finished at 4", "ok": ok, "checkpoints": [s["step"] for s in states],
                  "world": states[-1]["world"] if states else None, "resumed_at_step_2": resumed,
                  "last_step": max(steps, default=None), "fsdp2": name == "fsdp2"}))
PY
  }
  if [ "$MODE" = gpu ]; then
    dcp dcp & local pid=$!
    dcp fsdp2 --cpu-offload
    wait "$pid"
  else
    dcp dcp
    echo '{"run": "fsdp2: train_sft.py --cpu-offload --stop-after 2, --resume", "ok": true, "skipped": "needs CUDA"}'
  fi
}

stage3() {
  if [ "$MODE" = gpu ]; then
    "$PY" bench/train_step.py --shape llama-3.2-1b --seq-len 2048 --batch 2 --steps 3 --warmup 1
  else
    "$PY" bench/train_step.py --shape tiny --steps 1 --warmup 1
  fi
}

stage4() {
  if [ "$MODE" = gpu ]; then
    "$PY" bench/generate.py --shape qwen2.5-0.5b --batch 64,1 --prompt-len 128 --new-tokens 64 --repeats 2
  else
    "$PY" bench/generate.py --shape tiny --batch 64,1 --prompt-len 16 --new-tokens 8 --repeats 1
  fi
}

stage5() {
  if [ "$MODE" = gpu ]; then "$PY" bench/grpo_step.py --shape qwen2.5-0.5b --steps 2 --warmup 1
  else "$PY" bench/grpo_step.py --shape tiny --steps 1 --warmup 0; fi
}

stage6() {
  if [ "$MODE" = gpu ]; then
    "$PY" bench/big_model.py --shape llama3-8b --quantize nf4 --lora-r 16 --algo dpo --steps 2
  else  # its smallest shape, 2 of its layers (the 128k vocabulary alone is most of the time here)
    "$PY" bench/big_model.py --shape llama3.2-1b --layers 2 --quantize nf4 --lora-r 16 --algo dpo --steps 1 \
        --prompt-len 32 --answer-len 32
  fi
}

if [ -n "$STAGE" ]; then  # the driver's child: one stage, its status is the stage's
  "stage$STAGE"
  exit $?
fi

# ----------------------------------------------------------------------------- the driver

RUN=$(date -u +%Y%m%dT%H%M%SZ)
GC_LOGS="${OUT%.jsonl}.logs/$RUN"
GC_WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # every run's outputs; the logs stay
export GC_LOGS GC_WORK
trap 'rm -rf "$GC_WORK"' EXIT
# timeout gives a stage a process group of its own, out of reach of Ctrl-C: pass a signal on to it
trap '[ -n "${cur:-}" ] && kill -TERM "$cur" 2>/dev/null; exit 130' INT TERM
mkdir -p "$(dirname "$OUT")" "$GC_LOGS"

record() {  # record N NAME RC T0 T1 LOG [ERROR]: one JSON line appended to $OUT
  "$PY" - "$@" "$OUT" "$RUN" "$MODE" <<'PY'
import json, os, sys
n, name, rc, t0, t1, log, *rest = sys.argv[1:]
error, (out, run, mode) = (rest[0] if len(rest) == 4 else ""), rest[-3:]
lines = open(log, errors="replace").read().splitlines() if os.path.exists(log) else []
results = []
for line in lines:  # the JSON lines the stage printed (its benches' records, its runs' results)
    if line.startswith("{"):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict):
            results.append(r)
failed = [r.get("run", "?") for r in results if r.get("ok") is False]
ok = rc == "0" and not failed and not error
rec = {"stage": int(n), "name": name, "ok": ok, "seconds": round(float(t1) - float(t0), 1), "mode": mode,
       "run": run, "results": results, "log": log}
if not ok:
    why = error or ("timed out" if rc in ("124", "137") else f"exit status {rc}" if rc != "0" else "")
    why = "; ".join(filter(None, [why, "failed: " + ", ".join(failed) if failed else ""]))
    tail = [line for line in lines if not line.startswith("{")][-15:]
    rec["error"] = why + ("\n" + "\n".join(tail) if tail else "")
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\n")
print(f"stage {n} {name}: {'ok' if ok else 'FAILED (' + rec['error'].splitlines()[0] + ')'} in {rec['seconds']} s",
      flush=True)
sys.exit(0 if ok else 1)
PY
}

if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check.sh: torch sees no CUDA device; --cpu runs the same stages on the CPU" >&2
  for n in ${ONLY//,/ }; do
    t=$(date +%s.%N)
    record "$n" "${NAMES[$n]}" 1 "$t" "$t" /dev/null "no CUDA device (torch.cuda.is_available() is False)"
  done
  exit 2
fi

status=0
for n in ${ONLY//,/ }; do
  log="$GC_LOGS/stage$n.log"
  t0=$(date +%s.%N)
  rc=0
  # its own process group under timeout: a hang (a stuck collective, a runaway run) costs its budget only
  timeout -k 10 "${BUDGETS[$n]}" bash "$SELF" --stage "$n" $([ "$MODE" = cpu ] && echo --cpu) > "$log" 2>&1 &
  cur=$!
  wait "$cur" || rc=$?
  cur=
  record "$n" "${NAMES[$n]}" "$rc" "$t0" "$(date +%s.%N)" "$log" || status=1
done
echo "records appended to $OUT; logs in $GC_LOGS"
exit $status
