"""ner.protocols: the three scoring protocols on a 3-sentence case worked out by hand."""
from __future__ import annotations

import pytest

from ner.metrics import score_corpus
from ner.protocols import (blog_counts, micro_f1, micro_scores, protocol_names, reasoningner_counts,
                           score_protocols, strict_counts)

TYPES = ["person", "location", "Misc"]  # "Misc", not "misc": the reasoningner rule must ignore case
GOLDS = [
    {"person": ["John", "John"], "location": ["Paris"], "Misc": []},
    {"person": [], "location": ["The U.S."], "Misc": ["German"]},
    {"person": ["Mary"], "location": [], "Misc": []},
]
PREDS = [
    {"person": ["John"], "location": ["paris"], "Misc": ["French"]},
    {"person": ["Bob"], "location": ["U.S."], "Misc": ["German"]},
    None,  # unparseable: predicts nothing
]


def _per_sentence(counts) -> list[tuple[int, int, int]]:
    return list(zip(counts.tp.tolist(), counts.n_pred.tolist(), counts.n_gold.tolist()))


def test_strict_is_a_multiset_of_exact_type_text_pairs_and_equals_score_corpus():
    # s1: gold {John×2, Paris}, pred {John, paris, French}: tp 1 (one John; "paris" ≠ "Paris"), pred 3, gold 3
    # s2: gold {The U.S., German}, pred {Bob, U.S., German}: tp 1 (German), pred 3, gold 2
    # s3: gold {Mary}, pred none: tp 0, pred 0, gold 1
    # micro: tp 2, pred 6, gold 6 → P = R = F1 = 2/6 = 1/3
    counts = strict_counts(GOLDS, PREDS, TYPES)
    assert _per_sentence(counts) == [(1, 3, 3), (1, 3, 2), (0, 0, 1)]
    scores = micro_scores(counts)
    assert (scores["tp"], scores["n_pred"], scores["n_gold"]) == (2, 6, 6)
    assert scores["precision"] == scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)
    report = score_corpus(GOLDS, PREDS, TYPES, mode="exact")
    assert (report.tp, report.n_pred, report.n_gold) == (scores["tp"], scores["n_pred"], scores["n_gold"])
    assert (report.precision, report.recall, report.f1) == pytest.approx(
        (scores["precision"], scores["recall"], scores["f1"]))


def test_blog_scores_sets_of_texts_only_for_types_with_gold():
    # s1: person {John} vs {John}: 1/1/1; location {Paris} vs {paris}: 0/1/1; Misc has no gold → French not
    #     charged. Sentence: tp 1, pred 2, gold 2
    # s2: person has no gold → Bob not charged; location {The U.S.} vs {U.S.}: 0/1/1; Misc {German} vs {German}:
    #     1/1/1. Sentence: tp 1, pred 2, gold 2
    # s3: person {Mary} vs {}: 0/0/1
    # micro: tp 2, pred 4, gold 5 → P = 1/2, R = 2/5, F1 = 2·2/(4+5) = 4/9
    counts = blog_counts(GOLDS, PREDS, TYPES)
    assert _per_sentence(counts) == [(1, 2, 2), (1, 2, 2), (0, 0, 1)]
    scores = micro_scores(counts)
    assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((1 / 2, 2 / 5, 4 / 9))


def test_blog_deduplicates_both_sides():
    # gold {A, A, B} → {A, B}; pred {A, A, C} → {A, C}: tp 1, pred 2, gold 2 (a multiset would give 1/3/3)
    counts = blog_counts([{"person": ["A", "A", "B"]}], [{"person": ["A", "A", "C"]}], ["person"])
    assert _per_sentence(counts) == [(1, 2, 2)]


def test_reasoningner_drops_misc_normalises_texts_and_uses_sets():
    # Misc left out on both sides (French and German vanish); texts normalised: "paris" = "Paris",
    # "The U.S." → "the us" → "us" = "U.S." → "us".
    # s1: gold {(john, person), (paris, location)} (John×2 is one pair), pred the same: tp 2, pred 2, gold 2
    # s2: gold {(us, location)}, pred {(bob, person), (us, location)}: tp 1, pred 2, gold 1
    # s3: gold {(mary, person)}, pred {}: 0/0/1
    # micro: tp 3, pred 4, gold 4 → P = R = F1 = 3/4
    counts = reasoningner_counts(GOLDS, PREDS, TYPES)
    assert _per_sentence(counts) == [(2, 2, 2), (1, 2, 1), (0, 0, 1)]
    scores = micro_scores(counts)
    assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx((3 / 4, 3 / 4, 3 / 4))


def test_score_protocols_selects_by_name_and_rejects_unknown_ones():
    everything = score_protocols(GOLDS, PREDS, TYPES)
    assert list(everything) == ["strict", "blog", "reasoningner"]
    assert [everything[p]["f1"] for p in everything] == pytest.approx([1 / 3, 4 / 9, 3 / 4])
    assert list(score_protocols(GOLDS, PREDS, TYPES, "blog")) == ["blog"]
    assert protocol_names("all") == ["strict", "blog", "reasoningner"]
    with pytest.raises(ValueError, match="unknown protocol 'loose'"):
        protocol_names("loose")


def test_sloppy_predictions_count_like_score_corpus_and_empty_denominators_give_zero():
    # a bare string is one text and non-strings are dropped: pred {John} for every protocol: 1/1/1
    golds, preds = [{"person": ["John"]}], [{"person": "John", "location": [None, 3]}]
    for counts_fn in (strict_counts, blog_counts, reasoningner_counts):
        assert _per_sentence(counts_fn(golds, preds, ["person", "location"])) == [(1, 1, 1)]
    assert micro_f1(0, 0, 0) == 0.0
    assert micro_scores(strict_counts([{}], [None], []))["f1"] == 0.0
    with pytest.raises(ValueError, match="2 gold sentences but 1 predictions"):
        strict_counts([{}, {}], [None], [])
