"""Run GRPO on the tiny character-level task; used by the trainer tests as a real subprocess (plain python or
torchrun). Prints nothing special: the per-step metrics land in <out_dir>/history-rank<r>.json.

    python tests/tiny_grpo_run.py --out_dir /tmp/x --total_steps 6 [any GRPOConfig field as --flag value]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from grpo.config import parse_config  # noqa: E402
from grpo.distributed import cleanup, init_distributed, shard_model  # noqa: E402
from grpo.engine import TorchEngine  # noqa: E402
from grpo.grpo_config import GRPOConfig  # noqa: E402
from grpo.trainer import train  # noqa: E402
from tiny_task import char_tokenizer, lowercase_reward, tiny_policy  # noqa: E402

PROMPTS = [{"messages": [{"role": "user", "content": text}]} for text in
           ["Write a word.", "Say hi!", "Type: abc", "Go on...", "42?", "Yes or no", "Tell me", "Hello World"]]


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = parse_config(GRPOConfig, ["--reward_weights", "lowercase=1.0", "--beta", "0", "--prompts_per_step", "4",
                                    "--group_size", "4", "--max_completion_len", "12", "--micro_batch_size", "8",
                                    "--lr", "1e-2", "--max_grad_norm", "1.0", "--warmup_ratio", "0",
                                    "--sample_log_count", "2"] + argv)
    info = init_distributed()
    tok = char_tokenizer()
    policy = shard_model(tiny_policy(seed=cfg.seed), info)
    ref = None
    if cfg.beta > 0:
        ref = shard_model(tiny_policy(seed=cfg.seed), info)
        ref.eval().requires_grad_(False)
    engine = TorchEngine(policy, tok)
    history = train(cfg, policy, tok, PROMPTS, [("lowercase", 1.0, lowercase_reward)], info, engine, ref_model=ref)
    out = Path(cfg.out_dir) / f"history-rank{info.rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(previous + history))
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
