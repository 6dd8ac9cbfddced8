#!/usr/bin/env bash
# Idempotent: a separate venv holding TRL for bench/grpo_step.py. TRL is NEVER a project dependency.
# --system-site-packages reuses the system torch / transformers / accelerate / datasets; --no-deps keeps pip from
# upgrading or downgrading them. TRL's own requirements (accelerate, datasets, transformers) are already there.
set -euo pipefail
TRL_VERSION="${TRL_VERSION:-1.16.0}"
VENV="${TRL_VENV:-$HOME/.cache/grpo-ner/venv-trl}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('trl') != '$TRL_VERSION')" 2>/dev/null; then
    "$VENV/bin/pip" install --quiet --no-deps "trl==$TRL_VERSION"
fi
# Fails loudly if TRL's real requirements are not met by the system packages.
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
import torch, transformers, trl
from trl import GRPOConfig, GRPOTrainer  # noqa: F401
print(f"trl {trl.__version__} | transformers {transformers.__version__} | torch {torch.__version__}")
print("trl requires:", [r for r in (m.requires("trl") or []) if "extra" not in r])
PY
