"""CoT JSONL (``ner.cot`` output) → chat-rendered (prompt text, completion text) pairs for ``grpo.sft``.

The prompt is the record's student ``messages`` rendered with the tokenizer's chat template and the assistant
turn opened — byte-for-byte what ``grpo.rollout_io.tokenize_prompts`` feeds the GRPO stage, so SFT → GRPO
composes. The completion is the validated ``<think>…</think>`` + answer; ``grpo.sft`` appends the EOS token.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ner.prompts import render_prompt


def read_cot_records(path: str | Path, accepted_only: bool = True) -> list[dict]:
    """Records of a CoT JSONL file (only accepted ones by default). A malformed line raises naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: CoT data not found (generate it with `python -m ner.cot ... --out {path}`)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                missing = [k for k in ("messages", "completion", "accepted") if k not in rec]
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: invalid JSON ({exc})") from None
            if missing:
                raise ValueError(f"{path}:{n}: CoT record lacks {missing}")
            if rec["accepted"] or not accepted_only:
                out.append(rec)
    return out


def sft_pairs(records: list[dict], tokenizer) -> list[tuple[str, str]]:
    """(rendered prompt, completion) per record."""
    return [(render_prompt(tokenizer, r), r["completion"]) for r in records]


def limit_empty_answers(records: list[dict], max_ratio: float, seed: int = 0) -> list[dict]:
    """Keep at most ``max_ratio`` × (records with an entity) records whose gold answer is empty; order kept.

    Why: in the tagged format (one prompt per type) about two thirds of CoNLL prompts have no entity, and a small
    model tuned on that mix learns to answer "none" to everything. ``max_ratio < 0`` keeps everything.
    """
    if max_ratio < 0:
        return list(records)
    empty = [i for i, r in enumerate(records) if not any(r["gold"].values())]
    n_keep = int(max_ratio * (len(records) - len(empty)))
    if n_keep >= len(empty):
        return list(records)
    dropped = set(empty) - set(random.Random(seed).sample(empty, n_keep))
    return [r for i, r in enumerate(records) if i not in dropped]
