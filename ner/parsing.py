"""Parse a model completion into (think, entities) and judge its format. Never raises, whatever the text.

Two verdicts with different strictness, because they feed different rewards:
  * extraction is lenient: a nearly-right answer (code fence, trailing chatter, a string instead of a list,
    no think block) still yields ``entities`` so F1 can give it credit;
  * ``format_ok`` / ``schema_ok`` are strict: one think block first, one answer block, nothing after;
    a JSON object of exactly the right shape.
``errors`` lists every deviation in words, for logs and tests.

``parse_completion`` catches any exception of the internal parsers (a parser bug must not kill a training run)
and marks the result ``parser_raised``; ``ner.rewards`` counts those as the ``reward/parse_errors`` metric, so a
swallowed bug shows in the logs. Tests call the internal parsers directly, where nothing is swallowed.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ENTITY_OPEN, ENTITY_CLOSE = "<entity>", "</entity>"
# End-of-turn markers a decoder may leave in the text when special tokens are not skipped; not "substantive".
_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>")
_FENCE_OPEN = re.compile(r"^```[A-Za-z]*\s*")


@dataclass
class Parsed:
    think: str | None = None
    entities: dict[str, list[str]] | None = None
    format_ok: bool = False
    schema_ok: bool = False
    errors: list[str] = field(default_factory=list)
    parser_raised: bool = False  # an internal parser raised: a bug in this module, never the model's fault


def _strip_end_markers(text: str) -> str:
    # A loop, not a regex: a regex anchored at "$" with \s* is quadratic on long whitespace runs, and
    # degenerate generations produce exactly those.
    stripped = text.rstrip()
    while True:
        marker = next((m for m in _END_MARKERS if stripped.endswith(m)), None)
        if marker is None:
            return stripped
        stripped = stripped[: -len(marker)].rstrip()


def parse_completion(text: str, fmt: str, types: list[str]) -> Parsed:
    """Parse one completion of format ``tagged`` or ``json`` asked about ``types``."""
    try:
        if not isinstance(text, str):
            return Parsed(errors=[f"completion is {type(text).__name__}, not str"])
        text = _strip_end_markers(text)
        if fmt == "tagged":
            return _parse_tagged(text, list(types))
        if fmt == "json":
            return _parse_json(text, list(types))
        return Parsed(errors=[f"unknown format {fmt!r}"])
    except Exception as exc:  # a parser bug must never kill a training run; it is counted and logged instead
        return Parsed(errors=[f"internal parser error: {type(exc).__name__}: {exc}"], parser_raised=True)


def _split_think(text: str, errors: list[str]) -> tuple[str | None, str, bool]:
    """(think content or None, the text after the think block, whether the think block is well-formed).

    Without a closed think block the "rest" is the text after <think> (or all of it), so a bare answer is
    still found.
    """
    n_open, n_close = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    start, end = text.find(THINK_OPEN), text.find(THINK_CLOSE)
    ok = True
    if n_open == 0:
        errors.append("missing <think>")
        ok = False
    elif text[:start].strip():
        errors.append("text before <think>")
        ok = False
    if n_open > 1 or n_close > 1:
        errors.append("more than one think block")
        ok = False
    if n_close == 0:
        if n_open:
            errors.append("missing </think>")
        return None, text[start + len(THINK_OPEN):] if n_open else text, False
    if n_open and end < start:
        errors.append("</think> before <think>")
        ok = False
    think_start = start + len(THINK_OPEN) if 0 <= start < end else 0
    # The answer follows the LAST </think>: anything earlier is reasoning, however messy.
    last_close = text.rfind(THINK_CLOSE)
    return text[think_start:end], text[last_close + len(THINK_CLOSE):], ok


def _split_items(content: str) -> tuple[list[str], bool]:
    """Split an entity list on ", "; strip, drop empties, de-duplicate keeping order. Also: were all items
    non-empty (a stray ", , " or trailing ", " is a schema fault)."""
    if not content.strip():
        return [], True
    raw = [x.strip() for x in content.split(", ")]
    return list(dict.fromkeys(x for x in raw if x)), all(raw)


def _parse_tagged(text: str, types: list[str]) -> Parsed:
    errors: list[str] = []
    think, rest, think_ok = _split_think(text, errors)
    n_open, n_close = rest.count(ENTITY_OPEN), rest.count(ENTITY_CLOSE)
    start = rest.find(ENTITY_OPEN)
    end = rest.find(ENTITY_CLOSE, start + len(ENTITY_OPEN)) if start >= 0 else -1
    truncated = THINK_OPEN in text and THINK_CLOSE not in text

    answer_ok, schema_ok, content = True, False, None
    if start < 0:
        errors.append("missing <entity>")
        answer_ok = False
    else:
        if rest[:start].strip():
            errors.append("text between </think> and <entity>")
            answer_ok = False
        if n_open > 1 or n_close > 1:
            errors.append("more than one <entity> block")
            answer_ok = False
        if end < 0:
            errors.append("missing </entity>")
            truncated = True
            answer_ok = False
            # Keep what was written before any half-emitted closing tag ("Japan</ent").
            content = rest[start + len(ENTITY_OPEN):].split("<")[0]
        else:
            content = rest[start + len(ENTITY_OPEN):end]
            if rest[end + len(ENTITY_CLOSE):].strip():
                errors.append("text after </entity>")
                answer_ok = False
    if truncated:
        errors.append("truncated")

    entities = None
    if content is not None:
        items, items_ok = _split_items(content)
        if "<" in content or ">" in content:
            errors.append("tag inside the entity list")
        elif not items_ok:
            errors.append("empty item in the entity list")
        schema_ok = end >= 0 and "<" not in content and ">" not in content and items_ok and len(types) == 1
        if not types:
            errors.append("no entity type given")
            entities = {}
        else:
            if len(types) > 1:
                errors.append(f"tagged format expects one type, got {len(types)}")
            entities = {types[0]: items}
    return Parsed(think=think, entities=entities, format_ok=think_ok and answer_ok, schema_ok=schema_ok,
                  errors=errors)


def _is_open_prefix(text: str) -> bool:
    """Does ``text`` end inside a string or with unclosed brackets? (the generation stopped mid-object)"""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return False
    return in_string or depth > 0


def _find_json_object(rest: str, errors: list[str]) -> tuple[object | None, bool]:
    """Decode the first JSON value starting at the first '{' of ``rest``; (value or None, clean layout)."""
    start = rest.find("{")
    if start < 0:
        errors.append("missing JSON answer")
        return None, False
    clean = True
    lead = rest[:start].strip()
    fenced = bool(_FENCE_OPEN.match(lead)) and not _FENCE_OPEN.sub("", lead)
    if fenced:
        errors.append("code fence around the JSON answer")
        clean = False
    elif lead:
        errors.append("text before the JSON object")
        clean = False
    try:
        value, stop = json.JSONDecoder().raw_decode(rest, start)
    except (ValueError, RecursionError) as exc:
        errors.append(f"answer is not valid JSON: {exc}")
        if _is_open_prefix(rest[start:]):
            errors.append("truncated")
        return None, False
    trailing = rest[stop:].strip()
    if fenced and trailing.startswith("```"):
        trailing = trailing[3:].strip()
    if trailing:
        errors.append("text after the JSON object")
        clean = False
    return value, clean


def _coerce_list(t: str, value: object, errors: list[str]) -> tuple[list[str], bool]:
    """The entity texts of one type, and whether ``value`` had the exact schema (a list of strings)."""
    if isinstance(value, str):
        errors.append(f"value of {t!r} is a string, not a list")
        return ([value.strip()] if value.strip() else []), False
    if not isinstance(value, list):
        errors.append(f"value of {t!r} is {type(value).__name__}, not a list")
        return [], False
    texts, ok = [], True
    for item in value:
        if isinstance(item, str):
            if item.strip():
                texts.append(item.strip())
        elif isinstance(item, (int, float)) and not isinstance(item, bool):
            texts.append(str(item))
            ok = False
        else:
            ok = False
    if not ok:
        errors.append(f"value of {t!r} has a non-string item")
    return texts, ok


def _parse_json(text: str, types: list[str]) -> Parsed:
    errors: list[str] = []
    think, rest, think_ok = _split_think(text, errors)
    if THINK_OPEN in text and THINK_CLOSE not in text and "{" not in rest:
        errors.append("truncated")
    value, layout_ok = _find_json_object(rest, errors)
    if not isinstance(value, dict):  # None: nothing decodable (raw_decode from a '{' only yields objects)
        return Parsed(think=think, errors=errors)

    schema_ok = True
    if isinstance(value.get("entities"), dict):
        mapping = value["entities"]
        extra = [k for k in value if k != "entities"]
        if extra:
            errors.append(f"unexpected top-level keys {extra}")
            schema_ok = False
    elif "entities" in value:
        errors.append(f"'entities' is {type(value['entities']).__name__}, not an object")
        return Parsed(think=think, format_ok=False, errors=errors)
    else:
        # {"person": [...]} without the wrapper: readable, so extract it, but it is not the schema.
        errors.append("missing 'entities' key")
        mapping, schema_ok = value, False

    entities: dict[str, list[str]] = {t: [] for t in types}
    for key, val in mapping.items():
        if key not in entities:
            errors.append(f"unknown type {key!r}")
            schema_ok = False
            continue
        entities[key], ok = _coerce_list(key, val, errors)
        schema_ok = schema_ok and ok
    missing = [t for t in types if t not in mapping]
    if missing:
        errors.append(f"missing types {missing}")
        schema_ok = False
    return Parsed(think=think, entities=entities, format_ok=think_ok and layout_ok, schema_ok=schema_ok,
                  errors=errors)
