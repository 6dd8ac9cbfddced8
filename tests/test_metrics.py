"""ner.metrics: hand-computed cases (arithmetic in comments), invariants, and a cross-check against seqeval."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ner.data import read_column_file, tags_to_spans
from ner.metrics import entity_f1, format_table, normalize, score_corpus

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_normalize_universalner_style():
    assert normalize("The U.S. Army") == "us army"
    assert normalize("  An  apple,\tA pie ") == "apple pie"
    assert normalize("Theatre of the Absurd") == "theatre of absurd"  # articles only as whole words
    assert normalize("A") == "" and normalize("") == ""


def test_entity_f1_hand_computed():
    # TP = {John}; |gold| = 2, |pred| = 2 -> F1 = 2*1/(2+2) = 0.5
    assert entity_f1({"person": ["John", "Mary"]}, {"person": ["John"], "location": ["Mary"]}) == 0.5
    # multiset: gold {A:1}, pred {A:2} -> TP 1, F1 = 2*1/(1+2) = 2/3
    assert entity_f1({"person": ["A"]}, {"person": ["A", "A"]}) == pytest.approx(2 / 3)
    # both empty -> 1 (ReasoningNER's code would give 0); one empty -> 0
    assert entity_f1({}, {}) == 1.0
    assert entity_f1({"person": [], "location": []}, {"person": []}) == 1.0
    assert entity_f1({"person": ["A"]}, {"person": []}) == 0.0
    assert entity_f1({}, {"person": ["A"]}) == 0.0
    # exact mode ignores only whitespace; normalized also case, punctuation and articles
    assert entity_f1({"org": ["Real Madrid"]}, {"org": [" Real  Madrid "]}) == 1.0
    assert entity_f1({"org": ["the United Nations"]}, {"org": ["United Nations."]}) == 0.0
    assert entity_f1({"org": ["the United Nations"]}, {"org": ["United Nations."]}, mode="normalized") == 1.0
    # sloppy parses never crash: a bare string is one item, non-strings are dropped -> TP 1, |pred| 1
    assert entity_f1({"person": ["A"]}, {"person": "A", "location": [None, 3]}) == 1.0
    with pytest.raises(ValueError, match="unknown match mode"):
        entity_f1({}, {}, mode="fuzzy")


GOLDS = [{"person": ["John Smith"], "location": ["Paris"]},
         {"organisation": ["Google"], "person": ["Ann"]},
         {"location": ["Rome"]},
         {},
         {"person": ["Mary"]}]
PREDS = [{"person": ["John"], "location": ["Paris"]},  # Paris TP; John ~ John Smith: wrong boundary
         {"location": ["Google"], "person": ["Bob"]},  # Google: wrong type; Bob spurious, Ann missed
         None,  # unparsed: Rome missed
         {"misc": ["Euro"]},  # spurious
         {"date": ["Mary"]}]  # out-of-schema type, same text as gold person: wrong type
TYPES = ["location", "misc", "organisation", "person", "event"]


def test_score_corpus_hand_computed():
    r = score_corpus(GOLDS, PREDS, TYPES)
    # gold 2+2+1+0+1 = 6, pred 2+2+0+1+1 = 6, TP 1 (Paris) -> P = R = F1 = 1/6
    assert (r.tp, r.n_gold, r.n_pred) == (1, 6, 6)
    assert r.precision == pytest.approx(1 / 6) and r.recall == pytest.approx(1 / 6) and r.f1 == pytest.approx(1 / 6)
    # missed: Ann, Rome = 2; spurious: Bob, Euro = 2; wrong_type: Google, Mary = 2; wrong_boundary: John = 1
    assert (r.missed, r.spurious, r.wrong_type, r.wrong_boundary) == (2, 2, 2, 1)
    # FN = 6-1 = 5 = 2+2+1 ; FP = 6-1 = 5 = 2+2+1
    assert (r.n_unparsed, r.n_out_of_schema, r.n_sentences) == (1, 1, 5)
    loc, misc, org, per = (r.per_type[t] for t in ["location", "misc", "organisation", "person"])
    # location: gold Paris, Rome; pred Paris, Google; TP 1 -> 1/2 each
    assert (loc.precision, loc.recall, loc.f1, loc.support, loc.n_pred) == (0.5, 0.5, 0.5, 2, 2)
    assert (misc.f1, misc.support, misc.n_pred) == (0.0, 0, 1)
    assert (org.f1, org.support, org.n_pred) == (0.0, 1, 0)
    assert (per.f1, per.support, per.n_pred) == (0.0, 3, 2)  # gold John Smith, Ann, Mary; pred John, Bob
    # macro over the 4 types with gold or predictions ("event" has neither): (0.5+0+0+0)/4
    assert r.macro_f1 == 0.125
    d = json.loads(json.dumps(r.to_dict()))
    assert d["errors"] == {"missed": 2, "spurious": 2, "wrong_type": 2, "wrong_boundary": 1}
    assert d["per_type"]["location"]["support"] == 2 and d["f1"] == pytest.approx(1 / 6)
    table = format_table(r)
    assert "| location | 50.00 | 50.00 | 50.00 | 2 | 2 |" in table
    assert "| **micro** | 16.67 | 16.67 | 16.67 | 6 | 6 |" in table and "wrong boundary 1" in table


def test_bucket_precedence_and_modes():
    # "Jordan" equals the person gold's text (wrong type) AND overlaps the location gold (boundary):
    # wrong_type takes precedence, so "Jordan River" stays missed.
    r = score_corpus([{"person": ["Jordan"], "location": ["Jordan River"]}], [{"location": ["Jordan"]}],
                     ["location", "person"])
    assert (r.wrong_type, r.wrong_boundary, r.missed, r.spurious) == (1, 0, 1, 0)
    # wrong type and wrong boundary at once -> spurious + missed
    r = score_corpus([{"person": ["Jordan Smith"]}], [{"location": ["Jordan"]}], ["location", "person"])
    assert (r.wrong_type, r.wrong_boundary, r.missed, r.spurious) == (0, 0, 1, 1)
    # boundary pairing picks the gold with the largest token overlap: "New York City" (2 shared) over "York" (1)
    r = score_corpus([{"location": ["York", "New York City"]}], [{"location": ["New York"]}], ["location"])
    assert (r.wrong_boundary, r.missed, r.spurious) == (1, 1, 0)
    # "The Beatles" vs "Beatles": exact -> boundary error; normalized -> true positive
    g, p = [{"band": ["The Beatles"]}], [{"band": ["Beatles"]}]
    assert score_corpus(g, p, ["band"]).wrong_boundary == 1
    assert score_corpus(g, p, ["band"], mode="normalized").f1 == 1.0
    # multiset: gold A twice, predicted once -> TP 1, missed 1
    r = score_corpus([{"person": ["A", "A"]}], [{"person": ["A"]}], ["person"])
    assert (r.tp, r.missed, r.recall) == (1, 1, 0.5)
    with pytest.raises(ValueError, match="2 gold sentences but 1 predictions"):
        score_corpus([{}, {}], [{}], ["person"])


texts = st.lists(st.sampled_from(["A", "B", "A B", "the C", "C", "B C D"]), max_size=4)
ent_dicts = st.dictionaries(st.sampled_from(["x", "y", "z"]), texts, max_size=3)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(ent_dicts, st.one_of(st.none(), ent_dicts)), min_size=1, max_size=5),
       st.sampled_from(["exact", "normalized"]))
def test_buckets_partition_errors_and_single_sentence_agrees(pairs, mode):
    golds, preds = [g for g, _ in pairs], [p for _, p in pairs]
    r = score_corpus(golds, preds, ["x", "y"], mode=mode)
    assert r.n_gold - r.tp == r.missed + r.wrong_type + r.wrong_boundary
    assert r.n_pred - r.tp == r.spurious + r.wrong_type + r.wrong_boundary
    assert r.n_unparsed == sum(p is None for p in preds)
    g, p = golds[0], preds[0] or {}
    one = score_corpus([g], [p], ["x", "y"], mode=mode)
    if one.n_gold + one.n_pred:  # entity_f1 = 2TP/(|g|+|p|) is the corpus F1 of a one-sentence corpus
        assert entity_f1(g, p, mode) == pytest.approx(one.f1)


# ------------------------------------------------------------------------------------ seqeval cross-check
def iob2(n: int, spans: list[tuple[str, int, int]]) -> list[str]:
    tags = ["O"] * n
    for t, s, e in spans:
        tags[s:e] = [f"B-{t}"] + [f"I-{t}"] * (e - s - 1)
    return tags


def perturb(i: int, n: int, gold: list[tuple[str, int, int]], types: list[str]) -> tuple[list, Counter]:
    """Deterministic damage by (sentence i, entity j): drop 20%, retype 10%, move a boundary 10%, and add a
    one-token spurious entity on every 4th sentence. Only ever touches tokens outside gold spans, so the
    predicted spans never overlap and the IOB2 tags stay valid. Also returns how many of each damage was
    done, named after the error bucket it should land in."""
    covered = {k for _, s, e in gold for k in range(s, e)}
    out, done = [], Counter()
    for j, (t, s, e) in enumerate(gold):
        k = (7 * i + 3 * j) % 10
        if k in (0, 1):
            done["missed"] += 1
            continue
        if k == 2:
            t = types[(types.index(t) + 1) % len(types)]
            done["wrong_type"] += 1
        elif k == 3:
            if e < n and e not in covered:
                e += 1
            elif e - s > 1:
                e -= 1
            elif s > 0 and s - 1 not in covered:
                s -= 1
            done["wrong_boundary"] += (t, s, e) not in gold
        out.append((t, s, e))
    used = covered | {k for _, s, e in out for k in range(s, e)}
    free = [k for k in range(n) if k not in used]
    if i % 4 == 0 and free:
        out.append((types[i % len(types)], free[0], free[0] + 1))
        done["spurious"] += 1
    return out, done


def text_ambiguous(tokens: list[str], gold: set, pred: set) -> bool:
    """True when a wrong predicted span has the same type and text as a gold span it does not predict: then the
    text multiset would count a hit where seqeval (offsets) counts a miss and a false alarm."""
    text = lambda s: " ".join(tokens[s[1]:s[2]])  # noqa: E731
    return any(p[0] == g[0] and text(p) == text(g) for p in pred - gold for g in gold - pred)


@pytest.mark.parametrize("rel", ["conll2003/test.txt", "crossner/ai/dev.txt"])
def test_micro_and_per_type_scores_equal_seqeval(rel):
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    sentences = read_column_file(DATA / rel)[:300]
    types = sorted({e.type for s in sentences for e in s.entities})
    y_true, y_pred, golds, preds, skipped, damage = [], [], [], [], 0, Counter()
    for i, s in enumerate(sentences):
        gold = [(e.type, e.start, e.end) for e in s.entities]
        pred, done = perturb(i, len(s.tokens), gold, types)
        if text_ambiguous(s.tokens, set(gold), set(pred)):
            skipped += 1
            continue
        damage += done
        y_true.append(iob2(len(s.tokens), gold))
        y_pred.append(iob2(len(s.tokens), pred))
        golds.append(s.gold(types))
        pred_texts: dict[str, list[str]] = {t: [] for t in types}
        for t, a, b in tags_to_spans(y_pred[-1]):  # our decoder on the perturbed tags; seqeval decodes its own
            pred_texts[t].append(" ".join(s.tokens[a:b]))
        preds.append(pred_texts)
    assert skipped <= 3  # the filter removes almost nothing (0 on these files when written)
    r = score_corpus(golds, preds, types)
    kw = dict(mode="strict", scheme=IOB2)
    assert abs(r.precision - precision_score(y_true, y_pred, **kw)) < 1e-9
    assert abs(r.recall - recall_score(y_true, y_pred, **kw)) < 1e-9
    assert abs(r.f1 - f1_score(y_true, y_pred, **kw)) < 1e-9
    rep = classification_report(y_true, y_pred, output_dict=True, zero_division=0, **kw)
    for t in types:
        assert abs(r.per_type[t].f1 - rep[t]["f1-score"]) < 1e-9 and r.per_type[t].support == rep[t]["support"]
    # The perturbations exercised every kind of error (so the agreement is not the all-correct case), and each
    # damage landed in its own bucket: the buckets are derived here from what was done, not from the scorer.
    assert 0.5 < r.f1 < 0.95 and min(damage.values()) > 20
    assert {b: getattr(r, b) for b in damage} == dict(damage)
