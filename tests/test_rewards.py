"""Reward callables: hand-computed values, malformed output scores 0 / penalty, weighted composites."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ner.rewards import (PRESETS, REWARDS, blog_entity_reward, build_reward_fns, compute_rewards,
                         correct_entities_reward, spurious_entities_reward,
                         exact_match_reward, f1_reward, format_reward, parse_metrics, schema_reward,
                         weighted_sum)

TYPES = ["person", "location"]
# Tagged sample: person gold = Peter Blackburn, Boris Yeltsin.
TAGGED = {"format": "tagged", "types": ["person"], "gold": {"person": ["Peter Blackburn", "Boris Yeltsin"]}}
TAGGED_EMPTY = {"format": "tagged", "types": ["person"], "gold": {"person": []}}
# JSON sample: "Japan" is mentioned twice in the sentence.
JSON = {"format": "json", "types": TYPES, "gold": {"person": ["Igor Shkvyrin"], "location": ["Japan", "Japan"]}}
JSON_EMPTY = {"format": "json", "types": TYPES, "gold": {"person": [], "location": []}}


def js(person: list[str], location: list[str], think: str = "r") -> str:
    import json
    return f"<think>{think}</think>\n" + json.dumps({"entities": {"person": person, "location": location}})


def scores(fn, pairs: list[tuple[str, dict]]) -> list[float]:
    return fn([c for c, _ in pairs], [s for _, s in pairs])


def test_format_and_schema_rewards():
    pairs = [("<think>r</think> <entity>A</entity>", TAGGED),          # well-formed
             ("<entity>A</entity>", TAGGED),                            # no think: format 0, tag fine
             ("<think>r</think> <entity>A, , B</entity>", TAGGED),      # layout fine, empty item
             (js(["A"], []), JSON),                                     # well-formed
             ("<think>r</think>\n```json\n" + js(["A"], [])[17:] + "\n```", JSON),  # fenced: format 0
             ('<think>r</think>{"entities": {"person": "A"}}', JSON),   # string value + missing type
             ("garbage", JSON)]
    assert scores(format_reward, pairs) == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    assert scores(schema_reward, pairs) == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_f1_reward_hand_values():
    pairs = [
        # TP=2, |gold|=2, |pred|=2: F1 = 2*2/(2+2) = 1
        ("<think>r</think> <entity>Boris Yeltsin, Peter Blackburn</entity>", TAGGED),
        # TP=1 (Peter Blackburn), |pred|=2 (+ Moscow): F1 = 2*1/(2+2) = 0.5
        ("<think>r</think> <entity>Peter Blackburn, Moscow</entity>", TAGGED),
        # TP=1, |pred|=1: F1 = 2*1/(2+1) = 2/3
        ("<think>r</think> <entity>Peter Blackburn</entity>", TAGGED),
        # both empty: F1 = 1 by definition
        ("<think>r</think> <entity></entity>", TAGGED_EMPTY),
        # gold empty, one prediction: TP=0 -> 0
        ("<think>r</think> <entity>X</entity>", TAGGED_EMPTY),
        # unparseable: 0 even though the gold is empty
        ("<think>never closed", TAGGED_EMPTY),
        # json multiset: gold {Igor, Japan, Japan}, pred {Igor, Japan}: TP=2, F1 = 2*2/(3+2) = 0.8
        (js(["Igor Shkvyrin"], ["Japan"]), JSON),
        # wrong type: Japan as person. gold 3, pred 1, TP=0 -> 0
        (js(["Japan"], []), JSON),
        # lenient extraction still earns F1: fenced + no think, TP=1 (Igor), |pred|=1: 2/(3+1) = 0.5
        ('```json\n{"entities": {"person": ["Igor Shkvyrin"], "location": []}}\n```', JSON),
    ]
    got = scores(f1_reward, pairs)
    assert got == pytest.approx([1.0, 0.5, 2 / 3, 1.0, 0.0, 0.0, 0.8, 0.0, 0.5])


def test_blog_entity_reward_hand_values():
    pairs = [
        ("<think>r</think> <entity>Peter Blackburn, Boris Yeltsin</entity>", TAGGED),  # 2 correct: +1.0
        ("<think>r</think> <entity>Peter Blackburn, Moscow, Reuters</entity>", TAGGED),  # +0.5 -0.5 -0.5 = -0.5
        ("<think>r</think> <entity></entity>", TAGGED),                             # nothing predicted: 0
        ("<think>r</think> <entity>A, B, C, D</entity>", TAGGED_EMPTY),               # 4 spurious: -2.0
        ("no tags at all", TAGGED),                                                  # unparseable: 0
        # json multiset, gold location [Japan, Japan]: pred [Japan x3] -> 2 correct, 1 spurious; person Igor
        # correct: (2+1)*0.5 - 1*0.5 = 1.0
        (js(["Igor Shkvyrin"], ["Japan", "Japan", "Japan"]), JSON),
        # whitespace runs are not content (as in entity_f1's exact mode): "Igor  Shkvyrin" matches: +0.5
        (js(["Igor  Shkvyrin"], []), JSON),
        # case is content: "igor shkvyrin" is spurious: -0.5
        (js(["igor shkvyrin"], []), JSON),
    ]
    assert scores(blog_entity_reward, pairs) == [1.0, -0.5, 0.0, -2.0, 0.0, 1.0, 0.5, -0.5]
    # The same cases, counted by hand: (correct, spurious) per line.
    assert scores(correct_entities_reward, pairs) == [2, 1, 0, 0, 0, 3, 1, 0]
    assert scores(spurious_entities_reward, pairs) == [0, 2, 0, 4, 0, 1, 0, 1]


def test_exact_match_reward_hand_values():
    pairs = [
        ("<think>r</think> <entity>Boris Yeltsin, Peter Blackburn</entity>", TAGGED),  # same set, other order: 1
        ("<think>r</think> <entity>Peter Blackburn</entity>", TAGGED),                 # subset: 0
        ("<think>r</think> <entity></entity>", TAGGED_EMPTY),                          # both empty: 1
        ("<entity></entity>", TAGGED_EMPTY),                                          # no think, still parsed: 1
        ("<think>r</think>", TAGGED_EMPTY),                                           # no answer: 0
        (js(["Igor Shkvyrin"], ["Japan"]), JSON),  # set semantics: {Japan} == {Japan, Japan}: 1
        (js([], ["Igor Shkvyrin", "Japan"]), JSON),                                   # wrong type: 0
        (js([], []), JSON_EMPTY),                                                     # both empty: 1
    ]
    assert scores(exact_match_reward, pairs) == [1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0]


MALFORMED = ["", " ", "<think>", "</think></think>", "<entity", "{", '{"entities": ', "\x00\ud800", "<think>" * 50,
             '<think>r</think>{"entities": {"person": [[["deep"]]]}}', "[" * 20_000]


@pytest.mark.parametrize("sample", [TAGGED, TAGGED_EMPTY, JSON, JSON_EMPTY])
def test_malformed_outputs_score_zero_and_never_raise(sample):
    samples = [sample] * len(MALFORMED)
    for name, fn in REWARDS.items():
        values = fn(MALFORMED, samples)
        assert len(values) == len(MALFORMED)
        # No answer block can be extracted from any of these, so every reward is 0 (blog_entity has no
        # prediction to penalise), except the deep-list JSON, which parses with a non-string item dropped.
        expected = [0.0] * len(MALFORMED)
        if sample["format"] == "json" and name in ("f1", "exact_match", "format"):
            # '{"entities": {"person": [[["deep"]]]}}' -> person [], location [] (missing): format 1;
            # f1/exact_match are 1 only when the gold is empty too.
            both_empty = sample is JSON_EMPTY
            expected[-2] = 1.0 if name == "format" or both_empty else 0.0
        assert values == expected, (name, values)
    # These zeros are the parser's verdicts, not a swallowed exception turned into 0.
    assert parse_metrics(MALFORMED, samples) == {"parse_errors": 0.0}


def test_non_string_completion_scores_zero():
    for fn in REWARDS.values():
        assert fn([None, 3], [TAGGED, JSON]) == [0.0, 0.0]  # type: ignore[list-item]


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=120))
def test_rewards_are_bounded_on_arbitrary_text(text):
    for sample in (TAGGED, JSON):
        assert parse_metrics([text], [sample]) == {"parse_errors": 0.0}  # the parser answered, it did not raise
        for name, fn in REWARDS.items():
            (v,) = fn([text], [sample])
            assert isinstance(v, float) and math.isfinite(v)
            if name != "blog_entity":
                assert 0.0 <= v <= 1.0
            else:  # at most +0.5 per gold entity
                assert v <= 0.5 * sum(len(x) for x in sample["gold"].values())


def test_presets_and_weighted_sum():
    perfect = "<think>r</think> <entity>Peter Blackburn, Boris Yeltsin</entity>"
    half = "<think>r</think> <entity>Peter Blackburn, Moscow</entity>"
    broken = "<entity>Peter Blackburn"
    completions, samples = [perfect, half, broken], [TAGGED] * 3
    blog = build_reward_fns("blog")
    assert [(n, w) for n, w, _ in blog] == [("format", 0.5), ("blog_entity", 1.0), ("exact_match", 2.0)]
    # perfect: 0.5*1 + 1*(0.5*2) + 2*1 = 3.5
    # half:    0.5*1 + 1*(0.5 - 0.5) + 2*0 = 0.5
    # broken:  0.5*0 + 1*(0.5) + 2*0 = 0.5 (no think, unclosed tag: lenient extraction still finds Peter)
    assert weighted_sum(blog, completions, samples) == [3.5, 0.5, 0.5]
    rner = build_reward_fns(PRESETS["reasoningner"])
    # perfect: 10*1 + 1*1 = 11; half: 10*0.5 + 1 = 6; broken: F1 = 2*1/(2+1), schema 0 -> 20/3
    assert weighted_sum(rner, completions, samples) == pytest.approx([11.0, 6.0, 20 / 3])
    totals, per_name = compute_rewards(rner, completions, samples)
    assert per_name["schema"] == [1.0, 1.0, 0.0] and per_name["f1"] == pytest.approx([1.0, 0.5, 2 / 3])
    # The composite equals the weighted sum of the individual callables, for arbitrary weights.
    mixed = build_reward_fns({"format": -1.5, "f1": 3.0, "exact_match": 0.25, "schema": 2.0, "blog_entity": 0.5})
    by_hand = [-1.5 * a + 3.0 * b + 0.25 * c + 2.0 * d + 0.5 * e for a, b, c, d, e in zip(
        format_reward(completions, samples), f1_reward(completions, samples),
        exact_match_reward(completions, samples), schema_reward(completions, samples),
        blog_entity_reward(completions, samples))]
    assert weighted_sum(mixed, completions, samples) == pytest.approx(by_hand)


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match=r"unknown reward name\(s\) \['f2'\]; known rewards: \['blog_entity'"):
        build_reward_fns({"f1": 1.0, "f2": 1.0})
    with pytest.raises(ValueError, match="unknown reward preset 'r1'"):
        build_reward_fns("r1")
    with pytest.raises(ValueError, match="no reward functions"):
        build_reward_fns({})
    with pytest.raises(ValueError, match="2 completions but 1 samples"):
        f1_reward(["a", "b"], [TAGGED])
