"""CoT JSONL (``ner.cot`` output) → chat-rendered (prompt text, completion text) pairs for ``grpo.sft``.

The prompt is the record's student ``messages`` rendered with the tokenizer's chat template and the assistant
turn opened — byte-for-byte what ``grpo.rollout_io.tokenize_prompts`` feeds the GRPO stage, so SFT → GRPO
composes. The completion is the validated ``<think>…</think>`` + answer; ``grpo.sft`` appends the EOS token.
"""
from __future__ import annotations

import json
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
