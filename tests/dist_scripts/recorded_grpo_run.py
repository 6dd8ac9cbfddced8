"""GRPO on the tiny task (tests/tiny_task.py) with the rollout engine recorded: rank r writes OUT/rank{r}.json with
its per-step metrics and every rollout it trained on, for the multi-rank checks of tests/test_trainer_paths.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_scripts/recorded_grpo_run.py \
        OUT '{"adv_scale": "batch", ...GRPOConfig fields as JSON}'
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from grpo.distributed import cleanup, init_distributed, shard_model  # noqa: E402
from grpo.engine import TorchEngine  # noqa: E402
from grpo.grpo_config import GRPOConfig  # noqa: E402
from grpo.trainer import train  # noqa: E402
from grpo_reference import RecordingEngine  # noqa: E402
from tiny_grpo_run import PROMPTS  # noqa: E402
from tiny_task import char_tokenizer, lowercase_reward, tiny_policy  # noqa: E402


def main(out: str, fields: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    cfg = GRPOConfig(**{**json.loads(fields), "out_dir": out})
    tok = char_tokenizer()
    policy = shard_model(tiny_policy(seed=cfg.seed), info)
    engine = RecordingEngine(TorchEngine(policy, tok))
    history = train(cfg, policy, tok, PROMPTS, [("lowercase", 1.0, lowercase_reward)], info, engine)
    rollouts = [dataclasses.asdict(r) for step in engine.steps for r in step]
    (Path(out) / f"rank{info.rank}.json").write_text(json.dumps({"history": history, "rollouts": rollouts}))
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
