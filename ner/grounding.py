"""Raw text ↔ the space-separated tokens prompts show, and predicted entity texts → character spans of the raw text.

Training prompts show CoNLL-style tokens joined by single spaces ("U.S. troops ( 3,000 ) left ."), so raw input is
split the same way first: abbreviations like "U.S.", numbers with separators ("3,000", "2.5"), words with inner
hyphens or apostrophes ("Anglo-French", "don't"), and every other non-space character alone. Each token keeps
its character span in the original text.

Grounding an entity text: it is tokenised the same way and looked up as a token sequence of the sentence, so
"St. Louis" and "St . Louis" both find the raw "St. Louis". Which occurrence:
  * ``first`` (default): each listed mention claims the leftmost occurrence not already claimed by an earlier
    mention of the same type, so a JSON answer listing "Japan" twice marks the first two "Japan"s, and a tagged
    answer (which never repeats a text) marks only the first;
  * ``all``: every occurrence of each listed text.
A mention with no (unclaimed) occurrence is *ungrounded*: it is reported apart, never given an invented span.
Types never compete for an occurrence: "Washington" may be both a person and a location span.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TOKEN_RE = re.compile(r"(?:[^\W\d_]\.){2,}|\d+(?:[.,]\d+)+|\w+(?:[-'’]\w+)*|[^\w\s]")
OCCURRENCES = ("first", "all")


@dataclass(frozen=True)
class Token:
    text: str
    start: int  # character offsets in the original text, end exclusive
    end: int


def tokenize(text: str) -> list[Token]:
    return [Token(m.group(), m.start(), m.end()) for m in TOKEN_RE.finditer(text)]


def _find_all(haystack: list[str], needle: list[str]) -> list[int]:
    n = len(needle)
    return [i for i in range(len(haystack) - n + 1) if haystack[i:i + n] == needle] if n else []


def ground_entities(text: str, tokens: list[Token], pred: dict[str, list[str]] | None, types: list[str],
                    occurrences: str = "first") -> tuple[list[dict], list[dict]]:
    """(entities, ungrounded) of one sentence; see the module docstring.

    entities: ``{"text", "type", "start", "end", "token_start", "token_end"}`` sorted by position (character
    offsets into ``text``, token indices into ``tokens``, both end exclusive); ungrounded: ``{"text", "type"}``.
    """
    if occurrences not in OCCURRENCES:
        raise ValueError(f"occurrences={occurrences!r}: expected one of {OCCURRENCES}")
    words = [t.text for t in tokens]
    found: list[dict] = []
    ungrounded: list[dict] = []
    for etype in types:
        claimed: list[tuple[int, int]] = []
        for mention in (pred or {}).get(etype, []):
            needle = [t.text for t in tokenize(mention)]
            free = [i for i in _find_all(words, needle)
                    if all(i + len(needle) <= a or b <= i for a, b in claimed)]
            picks = free[:1] if occurrences == "first" else free
            if not picks:
                ungrounded.append({"text": mention, "type": etype})
            for i in picks:
                if occurrences == "all" and any(i + len(needle) > a and b > i for a, b in claimed):
                    continue  # "all": overlapping repeats ("a a" in "a a a") keep the leftmost
                claimed.append((i, i + len(needle)))
                start, end = tokens[i].start, tokens[i + len(needle) - 1].end
                found.append({"text": text[start:end], "type": etype, "start": start, "end": end,
                              "token_start": i, "token_end": i + len(needle)})
    order = {t: k for k, t in enumerate(types)}
    found.sort(key=lambda e: (e["start"], -e["end"], order[e["type"]]))
    return found, ungrounded


def bio_tags(n_tokens: int, entities: list[dict]) -> list[str]:
    """IOB2 tags of a sentence. BIO cannot nest or overlap: entities are taken by position, longer first, and one
    that overlaps an already tagged token is left out of the tags (it stays in the JSONL output)."""
    tags = ["O"] * n_tokens
    for e in sorted(entities, key=lambda e: (e["token_start"], -e["token_end"])):
        span = range(e["token_start"], e["token_end"])
        if all(tags[i] == "O" for i in span):
            for i in span:
                tags[i] = ("B-" if i == e["token_start"] else "I-") + e["type"]
    return tags
