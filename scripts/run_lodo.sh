#!/usr/bin/env bash
# Leave-one-domain-out: ReasoningNER's zero-shot CrossNER setting on the embedded default, CPU (README "Zero-shot on an
# unseen domain"). Usage: scripts/run_lodo.sh [politics|literature|ai|music|science]   (default politics)
#   CoNLL-only  the main job's pipeline (scripts/run_default.sh's SFT and GRPO; run here if missing)
#   mix         that CoNLL-tuned model tuned one more epoch on CoNLL + the other four CrossNER domains' train splits
#               (configs/sft_smollm2_mix.yaml), then GRPO on the same mix (configs/grpo_smollm2_mix.yaml)
#   then        all four models on the same first TEST_LIMIT test sentences of the held-out domain, asked its types
#               by its own definitions, and paired-bootstrap comparisons (outputs/lodo/compare_<pair>_<domain>/);
#               MODES="plain guided" (default) also scores them with guided JSON answers (outputs/lodo/guided/)
# Every stage resumes (--resume auto) and an evaluation already written is kept, so re-running continues.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
HELD="${1:-politics}"
TEST_LIMIT="${TEST_LIMIT:-200}"
case "$HELD" in ai|literature|music|politics|science) ;; *) echo "unknown CrossNER domain: $HELD" >&2; exit 2;; esac
MIX=conll2003
for d in ai literature music politics science; do [[ $d == "$HELD" ]] || MIX+=",crossner_$d"; done
SFT=runs/sft_smollm2_mix_no_$HELD
GRPO=runs/grpo_smollm2_mix_no_$HELD
OUT=outputs/lodo
# 512 new tokens: the template teacher's answers to politics/literature test sentences reach 550 / 395 tokens.
EVAL=(--dataset "crossner_$HELD" --split test --limit "$TEST_LIMIT" --format json --k_shot 0 --max_new_tokens 512)
stage() { echo "== $HELD, $1: $(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s" | tee -a "$OUT/timings.txt"; t0=$SECONDS; }
mkdir -p "$OUT"; t0=$SECONDS

python train_sft.py --config configs/sft_smollm2_conll.yaml
python train_grpo.py --config configs/grpo_smollm2_conll.yaml --resume auto;                 stage "CoNLL-only pipeline"
python train_sft.py --config configs/sft_smollm2_mix.yaml --dataset "$MIX" --out_dir "$SFT" \
    --data "runs/cot/mix_no_${HELD}_train_json.jsonl";                                      stage "CoT data + mix SFT"
python train_grpo.py --config configs/grpo_smollm2_mix.yaml --model "$SFT" --dataset "$MIX" --out_dir "$GRPO" \
    --resume auto;                                                                           stage "mix GRPO"
# plain: the models' own answers (the strict score); guided: the same with --guided_json (ner/json_guide.py: each
# answer's keys and closing braces written for the model), into outputs/lodo/guided/.
for mode in ${MODES:-plain guided}; do
    dir=$OUT; extra=()
    if [[ $mode == guided ]]; then dir=$OUT/guided; extra=(--guided_json true); fi
    for pair in conll_sft:runs/sft_smollm2_conll conll_grpo:runs/grpo_smollm2_conll mix_sft:$SFT mix_grpo:$GRPO; do
        name=${pair%%:*}
        if [[ ! -f "$dir/${name}_$HELD/report.json" ]]; then
            python evaluate.py --model "${pair#*:}" "${EVAL[@]}" "${extra[@]}" --out_dir "$dir/${name}_$HELD"
            stage "evaluate $name ($mode)"
        fi
    done
    for pair in conll_sft:mix_sft conll_grpo:mix_grpo mix_sft:mix_grpo conll_sft:conll_grpo; do
        a=${pair%%:*}; b=${pair#*:}
        python evaluate.py --compare "$dir/${a}_$HELD/report.json" "$dir/${b}_$HELD/report.json" --bootstrap 1000 \
            --out_dir "$dir/compare_${a}_${b}_$HELD"
    done
done
echo "reports: $OUT/{,guided/}*_$HELD/report.md, comparisons: $OUT/{,guided/}compare_*_$HELD/compare.md"
