#!/usr/bin/env bash
# Six post-training recipes on the real SmolLM2-135M-Instruct of ../shared/models, each its data
# then one training command on 2 CPU processes (torchrun, gloo). Every training hyperparameter is a
# flag, none left to a script's defaults. Run one (recipe, seed), or set the variables below and
# copy its lines:
#
#     bash recipes/smollm2.sh grpo 1         # GRPO, full fine-tuning, one-digit + and x
#     bash recipes/smollm2.sh qlora-grpo 1   # the same with QLoRA (--lora-r 16 --quantize nf4)
#     bash recipes/smollm2.sh dpo 0          # DPO with LoRA on HH-RLHF harmless pairs
#     bash recipes/smollm2.sh rm 0           # a reward model on the same pairs
#     bash recipes/smollm2.sh sft 0          # SFT on GSM8K worked solutions (--packing)
#     bash recipes/smollm2.sh agent 1        # GRPO with the calculator tool, two-digit +
#
# The held-out metric before and after, wall time and peak memory: bench/recipe_runs.py runs these
# same lines. Results, the machine and what each figure means: docs/real-models.md.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=${1:?usage: bash recipes/smollm2.sh grpo|qlora-grpo|dpo|rm|sft|agent [SEED]}
SEED=${2:-0}
NPROC=${NPROC:-2}
MODEL=${NANOTRL_CACHE:-$HOME/.cache/nanotrl}/smollm2-135m-instruct
DATA=runs/recipes/data
RUN=runs/recipes/$RECIPE-s$SEED

# the Hugging Face directory, made once from the GGUF in ../shared (needs the gguf package)
[ -e $MODEL/model.safetensors ] || python ../shared/models/smollm2-135m-instruct/to_hf.py $MODEL

case $RECIPE in
grpo)
    # 8 prompts x 8 per process at lr 5e-6: 4 prompts at 1e-5 for 12 steps moved the held-out
    # accuracy on one seed and not the other
    [ -e $DATA/arith ] || python -m data.prepare_arith $DATA/arith
    torchrun --standalone --nproc_per_node $NPROC train_ppo.py --model $MODEL \
        --data $DATA/arith/train.jsonl --out $RUN --overwrite --algo grpo --loss ppo \
        --importance-level token --reward-fn data.prepare_arith:reward --max-steps 24 --prompts-per-step 8 \
        --group-size 8 --ppo-epochs 1 --minibatches 1 --grad-accum 1 --beta 0 --clip-eps 0.2 \
        --clip-eps-high 0 --loss-agg dapo --scale-rewards true --temperature 1.0 --top-k 0 --top-p 1.0 \
        --max-new-tokens 8 --max-prompt-length 128 --missing-eos-penalty 0 --warmup-steps 0 \
        --min-lr-ratio 1.0 --weight-decay 0 --grad-clip 1.0 --dtype fp32 --chunk-size 256 --eval-every 0 \
        --log-every 1 --save-every 0 --seed $SEED --lr 5e-6 --lora-r 0
    ;;
qlora-grpo)
    # the adapters on an NF4 base at lr 3e-4, 4 prompts x 8 per process
    [ -e $DATA/arith ] || python -m data.prepare_arith $DATA/arith
    torchrun --standalone --nproc_per_node $NPROC train_ppo.py --model $MODEL \
        --data $DATA/arith/train.jsonl --out $RUN --overwrite --algo grpo --loss ppo \
        --importance-level token --reward-fn data.prepare_arith:reward --max-steps 24 --prompts-per-step 4 \
        --group-size 8 --ppo-epochs 1 --minibatches 1 --grad-accum 1 --beta 0 --clip-eps 0.2 \
        --clip-eps-high 0 --loss-agg dapo --scale-rewards true --temperature 1.0 --top-k 0 --top-p 1.0 \
        --max-new-tokens 8 --max-prompt-length 128 --missing-eos-penalty 0 --warmup-steps 0 \
        --min-lr-ratio 1.0 --weight-decay 0 --grad-clip 1.0 --dtype fp32 --chunk-size 256 --eval-every 0 \
        --log-every 1 --save-every 0 --seed $SEED --lr 3e-4 --lora-r 16 --lora-alpha 32 --lora-dropout 0 \
        --lora-targets all-linear --quantize nf4
    ;;
agent)
    # one calculator call, then the answer; 243-token prompts: 4 rows per backward, not 16 (OOM)
    [ -e $DATA/arith2 ] || python -m data.prepare_arith --tools $DATA/arith2
    torchrun --standalone --nproc_per_node $NPROC train_ppo.py --model $MODEL \
        --data $DATA/arith2/train.jsonl --eval-data $DATA/arith2/test.jsonl --out $RUN --overwrite \
        --tools agent:calculator --max-tool-calls 1 --max-turns 2 --describe-tools true --tool-timeout 5 \
        --algo grpo --loss ppo --importance-level token --reward-fn data.prepare_arith:reward --max-steps 6 \
        --prompts-per-step 4 --group-size 8 --ppo-epochs 1 --minibatches 1 --grad-accum 4 --beta 0 \
        --clip-eps 0.2 --clip-eps-high 0 --loss-agg dapo --scale-rewards true --temperature 1.0 --top-k 0 \
        --top-p 1.0 --max-new-tokens 40 --max-prompt-length 512 --missing-eos-penalty 0 --warmup-steps 0 \
        --min-lr-ratio 1.0 --weight-decay 0 --grad-clip 1.0 --dtype fp32 --chunk-size 256 --eval-every 0 \
        --log-every 1 --save-every 0 --seed $SEED --lr 1e-5 --lora-r 0
    ;;
dpo)
    # 2,303 HH-RLHF harmless pairs, 400 held out (a fixed shuffle, whatever the --seed)
    [ -e $DATA/hh ] || python -m data.prepare_hh --held-out 400 ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz $DATA/hh
    torchrun --standalone --nproc_per_node $NPROC train_dpo.py --model $MODEL --data $DATA/hh/train.jsonl \
        --eval-data $DATA/hh/test.jsonl --out $RUN --overwrite --lr 5e-4 --warmup-steps 2 \
        --min-lr-ratio 0.1 --weight-decay 0 --grad-clip 1.0 --max-steps 30 --batch-size 8 --grad-accum 1 \
        --max-length 128 --max-prompt-length 64 --dtype fp32 --chunk-size 256 --eval-every 0 --log-every 1 \
        --save-every 0 --seed $SEED --loss sigmoid --beta 0.1 --rpo-alpha 0 --label-smoothing 0 \
        --share-prompt true --precompute-ref false --lora-r 16 --lora-alpha 32 --lora-dropout 0 \
        --lora-targets all-linear
    ;;
rm)
    [ -e $DATA/hh ] || python -m data.prepare_hh --held-out 400 ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz $DATA/hh
    torchrun --standalone --nproc_per_node $NPROC train_rm.py --model $MODEL --data $DATA/hh/train.jsonl \
        --eval-data $DATA/hh/test.jsonl --out $RUN --overwrite --lr 3e-5 --warmup-steps 2 \
        --min-lr-ratio 0.1 --weight-decay 0 --grad-clip 1.0 --max-steps 20 --batch-size 8 --grad-accum 1 \
        --max-length 128 --max-prompt-length 64 --dtype fp32 --chunk-size 256 --eval-every 0 --log-every 1 \
        --save-every 0 --seed $SEED --center-coef 0 --use-margin false --lora-r 0
    ;;
sft)
    # the first 1,000 of GSM8K's train split; the first 200 of its test split held out
    [ -e $DATA/gsm8k-train ] || python -m data.prepare_gsm8k ../shared/data/gsm8k-train.jsonl.gz $DATA/gsm8k-train
    [ -e $DATA/gsm8k-test ] || python -m data.prepare_gsm8k ../shared/data/gsm8k-test.jsonl.gz $DATA/gsm8k-test
    [ -e $DATA/gsm8k-train/sft-1000.jsonl ] || head -n 1000 $DATA/gsm8k-train/sft.jsonl > $DATA/gsm8k-train/sft-1000.jsonl
    [ -e $DATA/gsm8k-test/sft-200.jsonl ] || head -n 200 $DATA/gsm8k-test/sft.jsonl > $DATA/gsm8k-test/sft-200.jsonl
    torchrun --standalone --nproc_per_node $NPROC train_sft.py --model $MODEL \
        --data $DATA/gsm8k-train/sft-1000.jsonl --eval-data $DATA/gsm8k-test/sft-200.jsonl --out $RUN \
        --overwrite --packing true --train-on-prompt false --max-length 512 --batch-size 2 --grad-accum 1 \
        --max-steps 20 --lr 2e-5 --warmup-steps 2 --min-lr-ratio 0.1 --weight-decay 0 --grad-clip 1.0 \
        --lora-r 0 --dtype fp32 --chunk-size 256 --eval-every 0 --log-every 1 --save-every 0 --seed $SEED
    ;;
*)
    echo "unknown recipe $RECIPE: expected grpo, qlora-grpo, dpo, rm, sft or agent" >&2
    exit 2
    ;;
esac
