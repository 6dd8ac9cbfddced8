"""The trainer's dev-evaluation generation split over ranks (ner.evaluation.generate_completions).

    python tests/dist_scripts/eval_split.py OUT                                        # 1 process
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_scripts/eval_split.py OUT

5 records, 2 prompts per engine call: rank 0 gets records 0, 2, 4 (two calls), rank 1 records 1, 3 (one call's
worth, but it must make two: the policy is FSDP2-sharded, so each call opens with a collective unshard).
Each rank writes OUT/world{W}-rank{R}.json with every completion it returns.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from grpo.distributed import cleanup, init_distributed, shard_model  # noqa: E402
from grpo.engine import TorchEngine  # noqa: E402
from ner.evaluation import generate_completions  # noqa: E402
from tiny_task import char_tokenizer, tiny_policy  # noqa: E402

TEXTS = ["Name a city.", "Who?", "Say something long please", "ok", "Spell a word"]


def main(out: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    tok = char_tokenizer()
    engine = TorchEngine(shard_model(tiny_policy(seed=4), info), tok)
    records = [{"messages": [{"role": "user", "content": t}]} for t in TEXTS]
    texts = generate_completions(engine, tok, records, max_new_tokens=10, batch_size=2, progress=False,
                                 split_over_ranks=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"world{info.world_size}-rank{info.rank}.json").write_text(json.dumps(texts))
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1])
