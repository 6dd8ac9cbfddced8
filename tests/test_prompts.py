"""Prompt records: shape, gold/target, deterministic few-shot picks, rationale wording, chat rendering."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ner.parsing import parse_completion
from ner.prompts import build_prompts, format_answer, format_target, render_prompt
from ner.rationale import candidate_rationale, non_entity_candidates
from ner.types import Entity, NERDataset, Sentence

TYPES = ["location", "person", "organisation", "misc"]
DESCRIPTIONS = {"location": "Names of places.", "person": "Names of people.",
                "organisation": "Names of organisations.", "misc": "Other names."}


def sent(text: str, spans: list[tuple[str, int, int]], sid: str) -> Sentence:
    tokens = text.split()
    return Sentence(tokens, [Entity(t, a, b, " ".join(tokens[a:b])) for t, a, b in spans], sid)


def pool() -> NERDataset:
    return NERDataset("toy", "train", [
        sent("Japan began the defence against Syria .", [("location", 0, 1), ("location", 5, 6)], "tr0"),
        sent("Igor Shkvyrin scored for Uzbekistan .", [("person", 0, 2), ("location", 4, 5)], "tr1"),
        sent("FIFA ranked Japan 20th .", [("organisation", 0, 1), ("location", 2, 3)], "tr2"),
        sent("Nothing to see here .", [], "tr3"),
        sent("Peter Blackburn met Boris Yeltsin .", [("person", 0, 2), ("person", 3, 5)], "tr4"),
        sent("The Asian Cup starts Friday .", [("misc", 1, 3)], "tr5"),
        sent("EU rejects German call .", [("organisation", 0, 1), ("misc", 3, 4)], "tr6"),
        # Same text as test sentence te0 under another id: must never be shown as its example.
        sent("Peter Blackburn went to Japan and Japan .", [("person", 0, 2)], "tr7"),
    ], TYPES, DESCRIPTIONS)


def eval_set() -> NERDataset:
    return NERDataset("toy", "test", [
        sent("Peter Blackburn went to Japan and Japan .",
             [("person", 0, 2), ("location", 4, 5), ("location", 6, 7)], "te0"),
        sent("Rain fell .", [], "te1"),
        sent("Nadim Ladki joined Reuters .", [("person", 0, 2), ("organisation", 3, 4)], "te2"),
    ], TYPES, DESCRIPTIONS)


def test_tagged_records_one_per_sentence_and_type_with_deduped_gold():
    recs = build_prompts(eval_set(), "tagged", k_shot=2, seed=0, fewshot_pool=pool())
    assert len(recs) == 3 * 4  # 3 sentences x 4 types
    assert [(r["sentence_id"], r["types"]) for r in recs[:4]] == [("te0", [t]) for t in TYPES]
    loc = recs[0]
    # "Japan" occurs twice in te0, but the tagged list cannot express counts: gold and target hold it once.
    assert loc["gold"] == {"location": ["Japan"]}
    assert loc["target"] == "<entity>Japan</entity>"
    assert recs[1]["target"] == "<entity>Peter Blackburn</entity>"
    assert recs[2]["target"] == "<entity></entity>"
    assert loc["format"] == "tagged" and loc["sentence"] == "Peter Blackburn went to Japan and Japan ."
    assert [m["role"] for m in loc["messages"]] == ["system", "user"]
    user = loc["messages"][1]["content"]
    assert "Names of places." in user and user.endswith("Sentence: Peter Blackburn went to Japan and Japan .")
    assert user.count("Example sentence:") == 2


def test_json_records_one_per_sentence_listing_all_types_and_keeping_duplicates():
    recs = build_prompts(eval_set(), "json", k_shot=0)
    assert len(recs) == 3
    r = recs[0]
    assert r["types"] == TYPES
    assert r["gold"] == {"location": ["Japan", "Japan"], "person": ["Peter Blackburn"],
                         "organisation": [], "misc": []}
    assert json.loads(r["target"]) == {"entities": r["gold"]}
    user = r["messages"][1]["content"]
    for t in TYPES:
        assert f"- {t}: {DESCRIPTIONS[t]}" in user
    assert "Example" not in user  # k_shot=0
    assert json.loads(recs[1]["target"]) == {"entities": {t: [] for t in TYPES}}


def test_types_subset_and_errors():
    recs = build_prompts(eval_set(), "json", k_shot=0, types=["person"])
    assert recs[2]["gold"] == {"person": ["Nadim Ladki"]}
    with pytest.raises(ValueError, match="unknown prompt format 'xml'"):
        build_prompts(eval_set(), "xml")
    with pytest.raises(ValueError, match="needs a fewshot_pool"):
        build_prompts(eval_set(), "tagged", k_shot=2)
    with pytest.raises(ValueError, match=r"\['date'\] are not in the schema"):
        build_prompts(eval_set(), "tagged", k_shot=0, types=["date"])


def _examples(record: dict) -> list[str]:
    user = record["messages"][1]["content"]
    return [line[len("Example sentence: "):] for line in user.splitlines() if line.startswith("Example sentence:")]


def test_fewshot_is_deterministic_order_independent_and_never_the_sentence_itself():
    full = build_prompts(eval_set(), "tagged", k_shot=2, seed=0, fewshot_pool=pool())
    again = build_prompts(eval_set(), "tagged", k_shot=2, seed=0, fewshot_pool=pool())
    assert [r["messages"] for r in full] == [r["messages"] for r in again]
    # Picks depend on (seed, sentence_id, type) only: building the last sentence alone gives the same prompts.
    alone = NERDataset("toy", "test", eval_set().sentences[2:], TYPES, DESCRIPTIONS)
    assert [r["messages"] for r in build_prompts(alone, "tagged", 2, 0, pool())] == [r["messages"] for r in full[8:]]
    for r in full:
        assert r["sentence"] not in _examples(r)  # tr7 has te0's text and is never shown for te0
        assert len(set(_examples(r))) == 2
    seeds = {tuple(_examples(build_prompts(eval_set(), "tagged", 2, s, pool())[1])) for s in range(12)}
    assert len(seeds) > 1  # the seed changes the picks


def test_fewshot_prefers_examples_holding_the_type_then_falls_back():
    recs = build_prompts(eval_set(), "tagged", k_shot=2, seed=3, fewshot_pool=pool())
    by_text = {s.text: s for s in pool().sentences}
    for r in recs:
        (t,) = r["types"]
        holding = [s for s in pool().sentences if any(e.type == t for e in s.entities)
                   and s.text != r["sentence"]]
        shown = [by_text[x] for x in _examples(r)]
        n_with = sum(any(e.type == t for e in s.entities) for s in shown)
        # location/person/organisation have >= 2 usable holders, misc has exactly 2 (tr5, tr6).
        assert len(holding) >= 2 and n_with == 2, (t, r["sentence_id"])
    # A pool with a single misc holder: one pick holds misc, the other is a fallback without it.
    small = NERDataset("toy", "train", pool().sentences[:6], TYPES, DESCRIPTIONS)
    misc = [r for r in build_prompts(eval_set(), "tagged", 2, 0, small) if r["types"] == ["misc"]]
    for r in misc:
        assert "The Asian Cup starts Friday ." in _examples(r) and len(_examples(r)) == 2


def test_fewshot_answers_use_the_rationale_and_the_answer_format():
    recs = build_prompts(eval_set(), "json", k_shot=1, seed=0, fewshot_pool=pool())
    user = recs[0]["messages"][1]["content"]
    answer = user.split("Example answer: ", 1)[1].split("\n\nSentence:")[0]
    parsed = parse_completion(answer, "json", TYPES)
    assert parsed.format_ok and parsed.schema_ok and parsed.think.startswith('"')


def test_candidate_rationale_wording():
    s = sent("Japan beat Syria and Iraq , Igor Shkvyrin said on Monday .",
             [("location", 0, 1), ("location", 2, 3), ("location", 4, 5), ("person", 6, 8)], "x")
    # All types asked (json): every gold entity with its reason and type, then the capitalised non-entity.
    assert candidate_rationale(s, TYPES) == (
        '"Japan": a place, so location. "Syria": a place, so location. "Iraq": a place, so location. '
        '"Igor Shkvyrin": a person\'s name, so person. "Monday": a date word, not a name.')
    # One type asked (tagged): entities of the other types are negative candidates.
    assert candidate_rationale(s, ["person"]) == (
        '"Japan": a place, not a person. "Syria": a place, not a person. "Iraq": a place, not a person. '
        '"Igor Shkvyrin": a person\'s name, so person. "Monday": a date word, not a name.')
    assert candidate_rationale(s, ["organisation"]).endswith('"Monday": a date word, not a name. No organisation.')
    # Surface cues: a nationality, an event, a team before its score; a repeated entity is reasoned about once.
    cues = sent("German fans saw the World Cup : Albion 1 Albion 1 .",
                [("misc", 0, 1), ("misc", 4, 6), ("organisation", 7, 8), ("organisation", 9, 10)], "y")
    assert candidate_rationale(cues, TYPES) == (
        '"German": a nationality, so misc. "World Cup": an event\'s name, so misc. '
        '"Albion": a team, followed by its score, so organisation.')
    assert candidate_rationale(sent("It rained .", [], "z"), TYPES) == "No entities."  # "It": a function word
    assert candidate_rationale(sent("Rain .", [], "z"), TYPES) == \
        '"Rain": a capitalised sentence start, not a name. No entities.'
    song = sent("Yesterday was recorded .", [("song", 0, 1)], "w")  # not in the noun table: regular noun
    assert candidate_rationale(song, ["song"]) == '"Yesterday": names a song, so song.'


def test_non_entity_candidates_skip_function_words_and_read_headlines():
    # A quote opens the sentence: "He" is its first word and a function word, so it is no candidate.
    quoted = sent('" He said Reuters and Farm Minister Smith met .', [("organisation", 3, 4), ("person", 7, 8)], "q")
    assert non_entity_candidates(quoted) == [(5, 7, "a common word or title here")]
    # "Only" starts the sentence but is no function word: a capitalised sentence start.
    assert non_entity_candidates(sent("Only France voted .", [("location", 1, 2)], "o")) == \
        [(0, 1, "a capitalised sentence start")]
    headline = sent("SOCCER - JAPAN GET LUCKY WIN .", [("location", 2, 3)], "h")
    assert non_entity_candidates(headline) == [(0, 1, "a headline word in capitals"),
                                                (3, 6, "a headline word in capitals")]
    assert non_entity_candidates(headline, limit=1) == [(0, 1, "a headline word in capitals")]


def test_format_answer_exact_text():
    gold = {"person": ["A", "B"], "location": []}
    assert format_answer(gold, "tagged", ["person"], "why") == "<think>why</think> <entity>A, B</entity>"
    assert format_answer(gold, "json", ["person", "location"], "why") == \
        '<think>why</think>\n{"entities": {"person": ["A", "B"], "location": []}}'
    with pytest.raises(ValueError, match="exactly one type"):
        format_target(gold, "tagged", ["person", "location"])


_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF, blacklist_characters="<>,"),
                min_size=1, max_size=12).map(str.strip).filter(bool)


@settings(max_examples=60, deadline=None)
@given(st.lists(_TEXT, max_size=5), st.lists(_TEXT, max_size=5), st.text(max_size=30).filter(
    lambda s: "<" not in s and ">" not in s))
def test_format_answer_round_trips_through_the_parser(people, places, think):
    """A rendered gold answer parses back to the gold (tagged: de-duplicated) and is well-formed."""
    tagged = parse_completion(format_answer({"person": people}, "tagged", ["person"], think), "tagged", ["person"])
    assert tagged.format_ok and tagged.schema_ok and tagged.think == think
    assert tagged.entities == {"person": list(dict.fromkeys(people))}
    gold = {"person": people, "location": places}
    js = parse_completion(format_answer(gold, "json", ["person", "location"], think), "json", ["person", "location"])
    assert js.format_ok and js.schema_ok and js.entities == gold and js.errors == []


def test_render_prompt_with_a_real_chat_template(smollm2_tokenizer):
    rec = build_prompts(eval_set(), "tagged", k_shot=2, seed=0, fewshot_pool=pool())[0]
    text = render_prompt(smollm2_tokenizer, rec)
    assert text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\nYou are an expert at named entity recognition.")
    assert "SmolLM" not in text  # our system message replaces the template's default one
    assert rec["messages"][1]["content"] in text


def test_fewshot_prefers_short_holders_then_long_holders_then_anything():
    long_holder = sent("Alice " + "word " * 39 + ".", [("person", 0, 1)], "long")  # 41 tokens > 32
    shorts = [sent("Bob slept .", [("person", 0, 1)], "s1"), sent("Carol ran .", [("person", 0, 1)], "s2")]
    other = sent("Paris is big .", [("location", 0, 1)], "s3")
    target = NERDataset("toy", "test", [sent("Dan ate .", [("person", 0, 1)], "d")], TYPES, DESCRIPTIONS)
    full = NERDataset("toy", "train", [long_holder, *shorts, other], TYPES, DESCRIPTIONS)
    for seed in range(10):
        (rec,) = build_prompts(target, "tagged", 2, seed, full, types=["person"])
        assert sorted(_examples(rec)) == ["Bob slept .", "Carol ran ."]
    # Only one short holder: the long holder beats a short sentence without a person.
    few = NERDataset("toy", "train", [long_holder, shorts[0], other], TYPES, DESCRIPTIONS)
    (rec,) = build_prompts(target, "tagged", 2, 0, few, types=["person"])
    assert sorted(_examples(rec)) == sorted([long_holder.text, "Bob slept ."])
