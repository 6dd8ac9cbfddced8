"""Save two good checkpoints, then die by SIGKILL in the middle of the third save (no cleanup code can run).

    python tests/dist_scripts/crash_during_save.py RUN_DIR

The crash is injected at a fixed point: the "tokenizer" kills the process when asked to save itself, which
happens after the weights and before the optimizer state, the trainer state and the COMPLETE marker.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from grpo.checkpoint import save_checkpoint  # noqa: E402
from grpo.models import tiny_llama  # noqa: E402
from grpo.optim import build_optimizer, build_scheduler  # noqa: E402


class TokenizerThatDiesWhileSaving:
    def save_pretrained(self, path) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def main(run_dir: str) -> None:
    torch.set_num_threads(1)
    model = tiny_llama(layers=1)
    optimizer = build_optimizer(model, lr=1e-3)
    scheduler = build_scheduler(optimizer, total_steps=10)
    for step in (1, 2):
        with torch.no_grad():
            model.model.norm.weight.fill_(float(step))  # marks which step a saved checkpoint holds
        save_checkpoint(run_dir, step, model, None, optimizer, scheduler, {"marker": step})
    with torch.no_grad():
        model.model.norm.weight.fill_(3.0)
    save_checkpoint(run_dir, 3, model, TokenizerThatDiesWhileSaving(), optimizer, scheduler, {"marker": 3})
    raise SystemExit("unreachable: the process should have been killed during the save")


if __name__ == "__main__":
    main(sys.argv[1])
