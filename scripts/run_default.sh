#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, CPU; stage timings and results: README "Results"):
#   stage 1+2  CoT data from gold labels (offline template teacher) and CoT tuning   configs/sft_smollm2_conll.yaml
#   stage 3    GRPO, blog task format, F1 reward on rebalanced prompts             configs/grpo_smollm2_conll.yaml
#   then       F1 of base, SFT and SFT→GRPO on the same CoNLL-2003 dev and test sentences
# Every stage resumes where it stopped (--resume auto), so re-running after an interruption continues.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
DEV_LIMIT="${DEV_LIMIT:-100}"
TEST_LIMIT="${TEST_LIMIT:-200}"

python train_sft.py --config configs/sft_smollm2_conll.yaml
python train_grpo.py --config configs/grpo_smollm2_conll.yaml --resume auto
for model in smollm2-135m-instruct runs/sft_smollm2_conll runs/grpo_smollm2_conll; do
  name="$(basename "$model")"
  for split in dev test; do
    limit="$DEV_LIMIT"; [ "$split" = test ] && limit="$TEST_LIMIT"
    python evaluate.py --model "$model" --dataset conll2003 --split "$split" --limit "$limit" --format tagged \
        --max_new_tokens 96 --out_dir "outputs/${split}_${name}"
  done
done
echo "reports: outputs/{dev,test}_*/report.md"
