"""The offline teacher's reasoning: walk through the candidate spans of a sentence and say why each is or is not
an entity of the asked type(s), using the gold labels of *every* type.

A rationale that only restates the answer ("The sentence mentions "Spain", which names a location.") teaches the
student to copy, not to decide. Both works we reproduce have the teacher reason about candidates: the blog's
rationales go through every capitalised span ("Asian Cup: a tournament, not a location") and ReasoningNER's
thesis is that this explicit candidate-by-candidate reasoning is what generalises. Without a network there is no
teacher LM, so the reasons come from the gold labels plus a few surface cues (a nationality suffix, a score after
a team, a weekday) — never from the answer alone.

Candidates, in sentence order:
  * every gold entity, of any type (in the tagged format an entity of another type is a negative candidate);
  * runs of capitalised tokens outside every entity (sentence-initial function words excepted), at most
    ``MAX_NON_ENTITIES`` of them, so the student sees why a capitalised word is *not* a name.
Example (json, every CoNLL type asked):
  "EU": an organisation's name, so organisation. "German": a nationality, so misc. "British": a nationality, so
  misc. "Thursday": a weekday, not a name.
The same sentence asked for ``person`` only (tagged):
  "EU": an organisation's name, not a person. "German": a nationality, not a person. ... No person.
"""
from __future__ import annotations

import re

from ner.types import Entity, Sentence

MAX_NON_ENTITIES = 2

# Capitalised for grammar, not because they name something; skipped as candidates at the sentence start.
_FUNCTION_WORDS = frozenset("""a an the he she it they we i you his her its their our my this that these those
there here in on at by for from of to with as but and or if when while after before also so not no all some
one two three four five six seven eight nine ten first second last next new""".split())
_DATE_WORDS = frozenset("""monday tuesday wednesday thursday friday saturday sunday january february march april
may june july august september october november december jan feb mar apr jun jul aug sep sept oct nov dec""".split())
_EVENT_WORDS = frozenset("""cup championship championships open games olympics olympic league tour prix war
trophy series tournament world festival""".split())
_NATIONALITY = re.compile(r"^[A-Z][a-z]+(an|ian|ean|ese|ish|i|ic|ch|sh)$")
_SCORE = re.compile(r"^\d+(-\d+)?$")

# Why a span *is* of its type: a few words per CoNLL type; other schemas fall back to the type's noun.
_TYPE_REASON = {
    "person": "a person's name",
    "location": "a place",
    "organisation": "an organisation",
    "misc": "a name of another kind",
}


# (article, singular, plural) of entity types. Unknown types fall back to "<type> entity".
_TYPE_NOUNS: dict[str, tuple[str, str, str]] = {
    "person": ("a", "person", "people"),
    "location": ("a", "location", "locations"),
    "organisation": ("an", "organisation", "organisations"),
    "misc": ("a", "miscellaneous entity", "miscellaneous entities"),
    "country": ("a", "country", "countries"),
    "university": ("a", "university", "universities"),
    "field": ("a", "field of study", "fields of study"),
    "metrics": ("an", "evaluation metric", "evaluation metrics"),
    "programlang": ("a", "programming language", "programming languages"),
    "literarygenre": ("a", "literary genre", "literary genres"),
    "musicalartist": ("a", "musical artist", "musical artists"),
    "musicalinstrument": ("a", "musical instrument", "musical instruments"),
    "musicgenre": ("a", "music genre", "music genres"),
    "politicalparty": ("a", "political party", "political parties"),
    "academicjournal": ("an", "academic journal", "academic journals"),
    "astronomicalobject": ("an", "astronomical object", "astronomical objects"),
    "chemicalcompound": ("a", "chemical compound", "chemical compounds"),
    "chemicalelement": ("a", "chemical element", "chemical elements"),
    "discipline": ("a", "scientific discipline", "scientific disciplines"),
    "theory": ("a", "theory", "theories"),
    "researcher": ("a", "researcher", "researchers"),
    "algorithm": ("an", "algorithm", "algorithms"),
    "event": ("an", "event", "events"),
    "award": ("an", "award", "awards"),
    "album": ("an", "album", "albums"),
    "enzyme": ("an", "enzyme", "enzymes"),
}


def _type_nouns(entity_type: str) -> tuple[str, str, str]:
    if entity_type in _TYPE_NOUNS:
        return _TYPE_NOUNS[entity_type]
    # Most CrossNER types are plain English nouns (band, book, song, writer, ...): regular plural.
    if entity_type.isalpha() and entity_type.islower() and len(entity_type) <= 12:
        return ("an" if entity_type[0] in "aeio" else "a", entity_type, entity_type + "s")
    return ("a", f"{entity_type} entity", f"{entity_type} entities")


def _noun(entity_type: str) -> str:
    """'a person', 'an organisation', 'a musical artist'."""
    article, singular, _ = _type_nouns(entity_type)
    return f"{article} {singular}"


def _is_headline(tokens: list[str]) -> bool:
    """Mostly upper-case words (CoNLL headlines such as "SOCCER - JAPAN GET LUCKY WIN"): capitals carry no cue."""
    words = [t for t in tokens if any(c.isalpha() for c in t)]
    return len(words) >= 2 and sum(t.isupper() and len(t) > 1 for t in words) >= 0.6 * len(words)


def entity_reason(sentence: Sentence, entity: Entity) -> str:
    """A few words on why ``entity`` is of its gold type, from surface cues first, then the type itself."""
    t = entity.type
    words = entity.text.split()
    nxt = sentence.tokens[entity.end] if entity.end < len(sentence.tokens) else ""
    if t == "misc":
        if len(words) == 1 and (_NATIONALITY.match(entity.text) or entity.text.isupper() and len(words[0]) > 3
                                and _NATIONALITY.match(entity.text.title())):
            return "a nationality"
        if any(w.lower() in _EVENT_WORDS for w in words):
            return "an event's name"
    if t == "organisation" and _SCORE.match(nxt):
        return "a team, followed by its score"
    return _TYPE_REASON.get(t, f"names {_noun(t)}")


def non_entity_candidates(sentence: Sentence, limit: int = MAX_NON_ENTITIES) -> list[tuple[int, int, str]]:
    """(start, end, reason) of capitalised token runs outside every gold entity, first ``limit`` in order."""
    inside = set()
    for e in sentence.entities:
        inside.update(range(e.start, e.end))
    headline = _is_headline(sentence.tokens)
    # The sentence starts at its first word: CoNLL quotes open with a '"' token.
    first = next((k for k, t in enumerate(sentence.tokens) if any(c.isalpha() for c in t)), 0)
    out: list[tuple[int, int, str]] = []
    i, toks = 0, sentence.tokens
    while i < len(toks) and len(out) < limit:
        if i in inside or not toks[i][:1].isupper() or not any(c.isalpha() for c in toks[i]):
            i += 1
            continue
        j = i + 1
        while j < len(toks) and j not in inside and toks[j][:1].isupper() and any(c.isalpha() for c in toks[j]):
            j += 1
        words = toks[i:j]
        if i == first and len(words) == 1 and words[0].lower() in _FUNCTION_WORDS:
            i = j
            continue
        if all(w.lower() in _DATE_WORDS for w in words):
            reason = "a date word"
        elif headline:
            reason = "a headline word in capitals"
        elif i == first:
            reason = "a capitalised sentence start"
        else:
            reason = "a common word or title here"
        out.append((i, j, reason))
        i = j
    return out


def candidate_rationale(sentence: Sentence, types: list[str]) -> str:
    """The think text for ``sentence`` asked for ``types``; see the module docstring. Deterministic."""
    asked = set(types)
    items: list[tuple[int, str]] = []
    seen: set[tuple[str, str]] = set()
    for e in sorted(sentence.entities, key=lambda e: (e.start, e.end)):
        if (e.text, e.type) in seen:
            continue
        seen.add((e.text, e.type))
        why = entity_reason(sentence, e)
        if e.type in asked:
            verdict = f"so {e.type}"
        elif len(types) == 1:
            verdict = f"not {_noun(types[0])}"
        else:
            verdict = "not an asked type"
        items.append((e.start, f'"{e.text}": {why}, {verdict}.'))
    for start, end, why in non_entity_candidates(sentence):
        text = " ".join(sentence.tokens[start:end])
        if (text, "") not in seen:
            seen.add((text, ""))
            items.append((start, f'"{text}": {why}, not a name.'))
    items.sort(key=lambda x: x[0])
    parts = [s for _, s in items]
    if not any(e.type in asked for e in sentence.entities):
        parts.append(f"No {types[0]}." if len(types) == 1 else "No entities.")
    return " ".join(parts)
