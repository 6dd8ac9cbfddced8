"""The completion parser: never raises, lenient extraction, strict format/schema verdicts, named errors.

The never-raise properties call the internal parsers (``_parse_tagged``, ``_parse_json``) directly:
``parse_completion`` catches their exceptions, so a test through it alone would stay green on a raising parser.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ner.parsing import Parsed, _parse_json, _parse_tagged, _strip_end_markers, parse_completion
from ner.prompts import format_answer

TYPES = ["person", "location"]
TAGGED_OUTPUTS = [
    "<think>Igor Shkvyrin is a striker, so a person.</think> <entity>Igor Shkvyrin</entity>",
    "<think>No names here.</think> <entity></entity>",
    "<think>Two people.</think> <entity>Peter Blackburn, Boris Yeltsin</entity>",
]
JSON_OUTPUTS = [
    '<think>Japan is a country.</think>\n{"entities": {"person": [], "location": ["Japan"]}}',
    '<think>x</think>\n{"entities": {"person": ["A \\"B\\" C", "D"], "location": []}}',
    '<think></think>{"entities": {"person": [], "location": []}}',
]


def check_types(p: Parsed, types: list[str]) -> None:
    assert isinstance(p, Parsed)
    assert p.think is None or isinstance(p.think, str)
    assert isinstance(p.format_ok, bool) and isinstance(p.schema_ok, bool)
    assert isinstance(p.errors, list) and all(isinstance(e, str) for e in p.errors)
    if p.entities is not None:
        assert set(p.entities) <= set(types)
        assert all(isinstance(x, str) and x == x.strip() and x for v in p.entities.values() for x in v)
    if p.format_ok or p.schema_ok:
        assert p.entities is not None
    if p.format_ok and p.schema_ok:
        assert p.errors == []


def parse_both(text: str) -> None:
    """Both internal parsers on ``text`` (an exception fails the test), and the public entry point agrees."""
    stripped = _strip_end_markers(text)
    for fmt, parser, types in (("tagged", _parse_tagged, ["person"]), ("json", _parse_json, TYPES)):
        direct = parser(stripped, list(types))
        check_types(direct, types)
        public = parse_completion(text, fmt, types)
        assert not public.parser_raised and public == direct


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text):
    parse_both(text)


FRAGMENTS = ["<think>", "</think>", "<entity>", "</entity>", "{", "}", "[", "]", '"entities"', '"person"',
             '"location"', '"', ":", ",", ", ", "```json", "```", "Japan", " ", "\n", "\\", "null", "1",
             "<|im_end|>", "<think", "</entity"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=25))
def test_fragment_soup_never_raises(parts):
    parse_both("".join(parts))


def test_deep_nesting_and_non_strings_never_raise():
    for text in ["[" * 100_000, "<think></think>" + "{" * 50_000, '<think></think>{"entities": ' + "[" * 50_000]:
        parse_both(text)
    for text in ["[" * 100_000, "<think></think>" + "{" * 50_000]:  # the internal parsers alone, too
        assert _parse_json(text, TYPES).entities is None and _parse_tagged(text, ["person"]).entities is None
    p = parse_completion(None, "json", TYPES)  # type: ignore[arg-type]
    assert p.entities is None and p.errors == ["completion is NoneType, not str"]
    assert parse_completion("x", "yaml", TYPES).errors == ["unknown format 'yaml'"]


# Round trips: an answer written the way ner.prompts writes gold answers (and the model is taught to) parses back
# to exactly the entities it was written from, with a clean verdict. Texts are what each format can carry: tagged
# items have no ", " (the separator) and no angle brackets; both formats strip items and drop empty ones. No text
# holds a think tag: the answer starts after the last </think>, so neither format can carry one.
def _no_think_tag(t: str) -> bool:
    return "<think>" not in t and "</think>" not in t


THINK = st.text(max_size=60).filter(_no_think_tag)
TAGGED_ITEM = st.text(min_size=1, max_size=20).filter(
    lambda x: x == x.strip() and x and ", " not in x and "<" not in x and ">" not in x)
JSON_ITEM = st.text(min_size=1, max_size=20).filter(lambda x: x == x.strip() and x and _no_think_tag(x))
TYPE_NAME = st.text(min_size=1, max_size=12).filter(_no_think_tag)


@settings(max_examples=200, deadline=None)
@given(THINK, TYPE_NAME, st.lists(TAGGED_ITEM, max_size=6, unique=True))
def test_tagged_round_trip(think, typ, items):
    p = _parse_tagged(format_answer({typ: items}, "tagged", [typ], think), [typ])
    assert (p.think, p.entities, p.format_ok, p.schema_ok, p.errors) == (think, {typ: items}, True, True, [])


@settings(max_examples=200, deadline=None)
@given(THINK, st.dictionaries(TYPE_NAME, st.lists(JSON_ITEM, max_size=4), min_size=1, max_size=4))
def test_json_round_trip(think, gold):
    types = list(gold)
    p = _parse_json(format_answer(gold, "json", types, think), types)
    # Duplicates are kept: the JSON list can say "Japan" twice.
    assert (p.think, p.entities, p.format_ok, p.schema_ok, p.errors) == (think, gold, True, True, [])


@pytest.mark.parametrize("full", TAGGED_OUTPUTS)
def test_every_prefix_of_a_tagged_output(full):
    for n in range(len(full) + 1):
        p = parse_completion(full[:n], "tagged", ["person"])
        check_types(p, ["person"])
        # Only the complete output is well-formed; every proper prefix lacks the closing tag.
        assert p.format_ok == (n == len(full))
        cut = full[:n]
        if ("<think>" in cut and "</think>" not in cut) or ("<entity>" in cut and "</entity>" not in cut):
            assert "truncated" in p.errors, cut
    done = parse_completion(full, "tagged", ["person"])
    assert done.schema_ok and done.errors == []


@pytest.mark.parametrize("full", JSON_OUTPUTS)
def test_every_prefix_of_a_json_output(full):
    body_start = full.index("{")
    for n in range(len(full) + 1):
        p = parse_completion(full[:n], "json", TYPES)
        check_types(p, TYPES)
        assert p.format_ok == (n == len(full))
        if n > body_start and n < len(full):  # cut inside the JSON object: unparseable, flagged truncated
            assert p.entities is None and "truncated" in p.errors, full[:n]
    assert parse_completion(full, "json", TYPES).errors == []


def test_tagged_extraction_splits_strips_and_dedupes():
    p = parse_completion("<think>r</think> <entity> Japan ,  Syria, Japan,Iraq </entity>", "tagged", ["location"])
    # Split on ", " only: [" Japan ", " Syria", " Japan,Iraq "]; a bare "," does not separate.
    assert p.entities == {"location": ["Japan", "Syria", "Japan,Iraq"]}
    assert p.format_ok and p.schema_ok
    p = parse_completion("<think>r</think><entity>A, B, A</entity>\n<|im_end|>", "tagged", ["person"])
    assert p.entities == {"person": ["A", "B"]} and p.format_ok and p.errors == []


@pytest.mark.parametrize("text, error, entities, format_ok, schema_ok", [
    ("<entity>A</entity>", "missing <think>", ["A"], False, True),
    ("ok <think>r</think> <entity>A</entity>", "text before <think>", ["A"], False, True),
    ("<think>a</think><think>b</think> <entity>A</entity>", "more than one think block", ["A"], False, True),
    ("<think>r <entity>A</entity>", "missing </think>", ["A"], False, True),
    ("</think> x <think> <entity>A</entity>", "</think> before <think>", ["A"], False, True),
    ("<think>r</think> A, B", "missing <entity>", None, False, False),
    ("<think>r</think> <entity>A, B", "missing </entity>", ["A", "B"], False, False),
    ("<think>r</think> <entity>A</ent", "truncated", ["A"], False, False),
    ("<think>r</think> <entity>A</entity><entity>B</entity>", "more than one <entity> block", ["A"], False, True),
    ("<think>r</think> so: <entity>A</entity>", "text between </think> and <entity>", ["A"], False, True),
    ("<think>r</think> <entity>A</entity> I hope this helps", "text after </entity>", ["A"], False, True),
    ("<think>r</think> <entity>A, , B</entity>", "empty item in the entity list", ["A", "B"], True, False),
    ("<think>r</think> <entity>A, <b>B</b></entity>", "tag inside the entity list", ["A", "<b>B</b>"], True, False),
])
def test_tagged_error_reasons(text, error, entities, format_ok, schema_ok):
    p = parse_completion(text, "tagged", ["person"])
    assert error in p.errors, p.errors
    assert (p.entities or {}).get("person") == entities
    assert (p.format_ok, p.schema_ok) == (format_ok, schema_ok)


def test_tagged_with_wrong_number_of_types():
    p = parse_completion("<think>r</think> <entity>A</entity>", "tagged", ["person", "location"])
    assert p.entities == {"person": ["A"]} and not p.schema_ok
    assert "tagged format expects one type, got 2" in p.errors
    p = parse_completion("<think>r</think> <entity>A</entity>", "tagged", [])
    assert p.entities == {} and "no entity type given" in p.errors


OK_JSON = '{"entities": {"person": ["A"], "location": []}}'


@pytest.mark.parametrize("text, error, entities, format_ok, schema_ok", [
    ("<think>r</think>\n```json\n" + OK_JSON + "\n```", "code fence around the JSON answer",
     {"person": ["A"], "location": []}, False, True),
    ("<think>r</think>\n" + OK_JSON + "\nDone.", "text after the JSON object", {"person": ["A"], "location": []},
     False, True),
    ("<think>r</think>\n" + OK_JSON + "\n```", "text after the JSON object", {"person": ["A"], "location": []},
     False, True),  # a closing fence without an opening one is stray text
    ("<think>r</think> Answer: " + OK_JSON, "text before the JSON object", {"person": ["A"], "location": []},
     False, True),
    ('<think>r</think>{"entities": {"person": "A", "location": []}}', "value of 'person' is a string, not a list",
     {"person": ["A"], "location": []}, True, False),
    ('<think>r</think>{"entities": {"person": ["A"], "location": [], "date": ["May"]}}', "unknown type 'date'",
     {"person": ["A"], "location": []}, True, False),
    ('<think>r</think>{"entities": {"person": ["A"]}}', "missing types ['location']",
     {"person": ["A"], "location": []}, True, False),
    ('<think>r</think>{"entities": {"person": ["A", 7, null], "location": []}}',
     "value of 'person' has a non-string item", {"person": ["A", "7"], "location": []}, True, False),
    ('<think>r</think>{"entities": {"person": null, "location": []}}', "value of 'person' is NoneType, not a list",
     {"person": [], "location": []}, True, False),
    ('<think>r</think>{"person": ["A"], "location": []}', "missing 'entities' key",
     {"person": ["A"], "location": []}, True, False),
    ('<think>r</think>{"entities": {"person": [], "location": []}, "note": 1}', "unexpected top-level keys ['note']",
     {"person": [], "location": []}, True, False),
    ('<think>r</think>{"entities": ["A"]}', "'entities' is list, not an object", None, False, False),
    ("<think>r</think>[1, 2]", "missing JSON answer", None, False, False),
    ("<think>r</think>{'entities': {}}", "answer is not valid JSON: Expecting property name enclosed in double "
     "quotes: line 1 column 2 (char 1)", None, False, False),
    ('<think>r</think>{"entities": {"person": ["A"', "truncated", None, False, False),
    ("<think>r", "missing </think>", None, False, False),
    ('{"entities": {"person": ["A"], "location": []}}', "missing <think>", {"person": ["A"], "location": []},
     False, True),
])
def test_json_error_reasons(text, error, entities, format_ok, schema_ok):
    p = parse_completion(text, "json", TYPES)
    assert error in p.errors, p.errors
    assert p.entities == entities
    assert (p.format_ok, p.schema_ok) == (format_ok, schema_ok)


def test_json_answer_not_an_object_and_duplicates_kept():
    p = parse_completion('<think>r</think>{"entities": {"person": ["A", "A"], "location": []}}', "json", TYPES)
    assert p.entities == {"person": ["A", "A"], "location": []} and p.format_ok and p.schema_ok
    p = parse_completion('<think>r</think> ["x"] {"entities": {}}', "json", TYPES)
    # The first '{' starts the object; the list before it is leading text.
    assert "text before the JSON object" in p.errors and p.entities == {"person": [], "location": []}


def test_end_markers_are_ignored_and_long_whitespace_is_linear():
    import time
    p = parse_completion("<think>r</think> <entity>A</entity> <|im_end|>\n<|endoftext|> ", "tagged", ["person"])
    assert p.format_ok and p.errors == []
    p = parse_completion("<think>r</think> <entity>A</entity> <|im_end|> more", "tagged", ["person"])
    assert "text after </entity>" in p.errors  # a marker mid-text is not an ending
    start = time.perf_counter()
    for text in [" " * 200_000 + "x", "<think>" + "\n" * 200_000, "{" + " " * 200_000]:
        parse_both(text)
    # Linear work is ~10 ms here; a quadratic scan of 200k characters takes minutes.
    assert time.perf_counter() - start < 5.0


def test_runaway_json_salvage_takes_the_first_list_of_each_asked_type():
    """scripts/salvage_runaway_json.py (a diagnostic): an answer that repeats keys instead of closing the object."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "salvage_runaway_json.py"
    spec = importlib.util.spec_from_file_location("salvage_runaway_json", path)
    salvage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(salvage)
    answer = ('<think>"Canada": a place, so "country": ["x"].</think>\n{"entities": {"country": ["Canada", "Mexico"], '
              '"location": [], "person": ["A \\"B\\" C"], "politician": [], "party": ["P"], "politician": ["Z"], '
              '"politician": [], "polit')
    assert salvage.first_lists(answer, ["country", "location", "person", "politician", "election"]) == {
        "country": ["Canada", "Mexico"], "location": [], "person": ['A "B" C'], "politician": [], "election": []}
