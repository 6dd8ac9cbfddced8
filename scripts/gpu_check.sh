#!/usr/bin/env bash
# A prepared GPU check for one H100/H200, meant to end well inside 8 minutes (each part has its own timeout):
#   info  nvidia-smi, torch, CUDA
#   (a)   TorchEngine on the device: greedy + sampled rollouts, tiny and SmolLM2-shaped models, fp32 and bf16,
#         log-probs vs the trainer's teacher forcing (scripts/gpu_checks.py engine)
#   (b)   VLLMEngine: built, sampling, update_weights after a weight perturbation, log-probs vs teacher forcing
#         with the new weights; SKIPPED (loudly, with the pip download command) when `import vllm` fails
#   (c)   torchrun --nproc_per_node=1 train_grpo.py, SmolLM2 preset, bf16 (fp32 masters, FSDP2 one-rank), 5 steps,
#         engine vllm when importable, else torch
#   (d)   bench/generation.py and bench/grpo_step.py (project side; TRL is not on the device) on the device
# The device has no internet and takes at most 64 MiB along, so the model is a randomly initialised SmolLM2-shaped
# one built from .gpu_check/smollm2 (config + tokenizer), and the data a CoNLL-2003 subset in .gpu_check/data.
#
#   scripts/gpu_check.sh --prepare    on a CPU machine with the data and ~/.cache/grpo-ner: fills .gpu_check/
#   scripts/gpu_check.sh              on the GPU machine (outputs under $OUT if set, else .gpu_check/out)
#   scripts/gpu_check.sh --cpu        the same parts on CPU with a reduced model and tiny sizes (proves the script)
# Exit status: 0 when no part failed (skipped parts do not fail it), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PYTHON="${PYTHON:-python3}"
GC=.gpu_check

if [[ "${1:-}" == "--prepare" ]]; then
  exec "$PYTHON" scripts/gpu_checks.py prepare --folder "$GC"
fi
MODE=gpu; [[ "${1:-}" == "--cpu" ]] && MODE=cpu
if [[ ! -f $GC/smollm2/config.json || ! -f $GC/data/conll2003/train.txt ]]; then
  echo "gpu_check.sh: $GC is not prepared; run scripts/gpu_check.sh --prepare on a machine with the data" >&2
  exit 2
fi
OUT_DIR="${OUT:-$GC/out}"; mkdir -p "$OUT_DIR"
WORK=$GC/work; rm -rf "$WORK/runs"; mkdir -p "$WORK"
LOG="$OUT_DIR/gpu_check.log"; : > "$LOG"
SUMMARY="$OUT_DIR/summary.md"
export NER_DATA_DIR="$PWD/$GC/data"

if [[ $MODE == gpu ]]; then
  DEVICE=cuda; REDUCED=; NEW=64; STEPS_ARGS=(--max_completion_len 128)
  GEN_ARGS=(--batches 32 8 --new 128 --repeats 2); STEP_ARGS=(--rounds 1 --steps 3 --new 32)
  # With the 30 s metrics check: 600 s worst case. Seen on an H200 (2026-12-04): 292 s, (c) 115 s, (d) 88 + 28 s,
  # (b) skipped at once where vllm is absent. The generation bench runs 3 engines x 2 batch sizes x 2 repeats of 128
  # launch-bound decode steps (3-10 s each on the GPU): 50 s was too short.
  T_MODEL=45; T_A=75; T_B=100; T_C=170; T_D1=120; T_D2=60
else
  DEVICE=cpu; REDUCED=--reduced; NEW=16; STEPS_ARGS=(--max_completion_len 16 --group_size 4 --micro_batch_size 8)
  GEN_ARGS=(--batches 4 --new 8 --repeats 1 --vllm_modes eager); STEP_ARGS=(--rounds 1 --steps 2 --new 8)
  T_MODEL=120; T_A=300; T_B=600; T_C=600; T_D1=300; T_D2=300
fi
MODEL="$WORK/smollm2-random"

rows=()
# part NAME TIMEOUT CMD...: runs CMD with a timeout, its output into the log and the console, records a row.
part() {
  local name=$1 limit=$2; shift 2
  echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep --line-buffered -v "Loading weights\|Writing model shards" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  local status=PASS
  case $rc in 0) ;; 3) status=SKIPPED ;; 124|137) status=TIMEOUT ;; *) status="FAIL (exit $rc)" ;; esac
  rows+=("| $name | $status | $((SECONDS - start)) | $limit |")
  echo "=== $name: $status in $((SECONDS - start)) s" | tee -a "$LOG"
}
has_vllm() { "$PYTHON" -c "import vllm" >/dev/null 2>&1; }

total=$SECONDS
{
  echo "=== info ($MODE mode, $(date -u +%FT%TZ))"
  command -v nvidia-smi >/dev/null && nvidia-smi || echo "nvidia-smi: not found"
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'available', torch.cuda.is_available(), 'devices', torch.cuda.device_count(), \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''); print('transformers', transformers.__version__)"
} 2>&1 | tee -a "$LOG"

part "model: random SmolLM2-shaped" "$T_MODEL" "$PYTHON" scripts/gpu_checks.py materialize --out "$MODEL" $REDUCED
part "(a) TorchEngine log-probs" "$T_A" "$PYTHON" scripts/gpu_checks.py engine --model "$MODEL" --device $DEVICE \
  --new $NEW --json "$OUT_DIR/checks.json"
if has_vllm; then ENGINE=vllm; else ENGINE=torch; fi
part "(b) VLLMEngine sync + log-probs" "$T_B" "$PYTHON" scripts/gpu_checks.py vllm --model "$MODEL" --device $DEVICE \
  --new $NEW --json "$OUT_DIR/checks.json"
part "(c) GRPO 5 steps bf16 FSDP2, engine $ENGINE" "$T_C" torchrun --standalone --nproc_per_node=1 train_grpo.py \
  --config configs/grpo_smollm2_conll.yaml --model "$MODEL" --dtype bfloat16 --engine $ENGINE --total_steps 5 \
  --offset 0 --limit 64 --prompts_per_step 4 "${STEPS_ARGS[@]}" --dynamic_sampling false --eval_limit 8 \
  --eval_every 5 --save_every 5 --keep_last 1 --out_dir "$WORK/runs/grpo"
[[ -f $WORK/runs/grpo/metrics.jsonl ]] && cp "$WORK/runs/grpo/metrics.jsonl" "$OUT_DIR/train_metrics.jsonl"
part "(c) metrics.jsonl has steps 1-5" 30 "$PYTHON" -c "import json, sys
steps = sorted({r['step'] for r in map(json.loads, open(sys.argv[1])) if 'reward/mean' in r})
print('training steps logged:', steps); sys.exit(steps != [1, 2, 3, 4, 5])" "$WORK/runs/grpo/metrics.jsonl"
part "(d) bench/generation.py" "$T_D1" "$PYTHON" bench/generation.py --device $DEVICE --dtype bfloat16 \
  --model "$MODEL" "${GEN_ARGS[@]}"
part "(d) bench/grpo_step.py (project side)" "$T_D2" "$PYTHON" bench/grpo_step.py --device $DEVICE --dtype bfloat16 \
  --model "$PWD/$MODEL" "${STEP_ARGS[@]}"

{
  echo "## scripts/gpu_check.sh, $MODE mode, $(date -u +%FT%TZ), total $((SECONDS - total)) s"
  echo
  echo "| part | status | seconds | timeout (s) |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Tables: the bench tables and the per-check lines are in gpu_check.log; checks.json has every log-prob check."
} | tee "$SUMMARY" | tee -a "$LOG"
grep -q "FAIL\|TIMEOUT" "$SUMMARY" && exit 1
exit 0
