#!/usr/bin/env bash
# The main job on the embedded default (SmolLM2-135M-Instruct, CPU, ~45 minutes on 2 free cores):
#   stage 1+2  CoT data from gold labels (offline template teacher) and CoT tuning   configs/sft_smollm2_conll.yaml
#   stage 3    GRPO with the blog's rewards                                         configs/grpo_smollm2_conll.yaml
#   then       dev F1 of base, SFT and SFT→GRPO on the same CoNLL-2003 dev sentences
# Every stage resumes where it stopped (--resume auto), so re-running after an interruption continues.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
LIMIT="${EVAL_LIMIT:-50}"

python train_sft.py --config configs/sft_smollm2_conll.yaml
python train_grpo.py --config configs/grpo_smollm2_conll.yaml --resume auto
for model in smollm2-135m-instruct runs/sft_smollm2_conll runs/grpo_smollm2_conll; do
  name="$(basename "$model")"
  python evaluate.py --model "$model" --dataset conll2003 --split dev --limit "$LIMIT" --format tagged \
      --max_new_tokens 96 --out_dir "outputs/dev_${name}"
done
echo "reports: outputs/dev_*/report.md"
