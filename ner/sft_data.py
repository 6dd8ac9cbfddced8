"""CoT JSONL (``ner.cot`` output) → chat-rendered (prompt text, completion text) pairs for ``grpo.sft``.

The prompt is the record's student ``messages`` rendered with the tokenizer's chat template and the assistant
turn opened — byte-for-byte what ``grpo.rollout_io.tokenize_prompts`` feeds the GRPO stage, so SFT → GRPO
composes. The completion is the validated ``<think>…</think>`` + answer; ``grpo.sft`` appends the EOS token.
"""
from __future__ import annotations

import json
from pathlib import Path

from ner.data import DataFormatError
from ner.prompts import render_prompt


def read_cot_records(path: str | Path, accepted_only: bool = True) -> list[dict]:
    """Records of a CoT JSONL file (only accepted ones by default). A malformed line raises ``DataFormatError``
    naming file:line and the field, before any of it reaches a chat template or the trainer."""
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
            except ValueError as exc:
                raise DataFormatError(path, n, f"invalid JSON ({exc})") from None
            problem = _cot_record_problem(rec)
            if problem:
                raise DataFormatError(path, n, problem)
            if rec["accepted"] or not accepted_only:
                out.append(rec)
    return out


def _cot_record_problem(rec: object) -> str | None:
    """What is wrong with one CoT record (the fields SFT reads), or None."""
    if not isinstance(rec, dict):
        return f"CoT record must be a JSON object, got {json.dumps(rec)[:80]}"
    missing = [k for k in ("messages", "completion", "accepted") if k not in rec]
    if missing:
        return f"CoT record lacks {missing}"
    messages = rec["messages"]
    if not (isinstance(messages, list) and messages):
        return (f"field 'messages' must be a non-empty list of {{role, content}} objects, "
                f"got {json.dumps(messages)[:80]}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return (f"field 'messages'[{i}] must be an object with string 'role' and 'content', "
                    f"got {json.dumps(m)[:80]}")
    if not isinstance(rec["completion"], str):
        return f"field 'completion' must be a string, got {json.dumps(rec['completion'])[:80]}"
    if not isinstance(rec["accepted"], bool):
        return f"field 'accepted' must be true or false, got {json.dumps(rec['accepted'])[:80]}"
    gold = rec.get("gold", {})  # read by --max_empty_ratio (ner.prompts.limit_empty_answers)
    if not (isinstance(gold, dict) and all(isinstance(v, list) for v in gold.values())):
        return f"field 'gold' must be an object of {{type: [texts]}}, got {json.dumps(gold)[:80]}"
    return None


def instruction_groups(records: list[dict]) -> list[int]:
    """A group number per record (``grpo.sft.Row.group``): records asking the same types in the same format share
    their instructions, so a mixture's data sets (and a tagged prompt's types) get a number each."""
    ids: dict[tuple, int] = {}
    return [ids.setdefault((r["format"], tuple(r["types"])), len(ids)) for r in records]


def sft_pairs(records: list[dict], tokenizer) -> list[tuple[str, str]]:
    """(rendered prompt, completion) per record."""
    return [(render_prompt(tokenizer, r), r["completion"]) for r in records]
