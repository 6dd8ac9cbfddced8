"""Three ways to turn per-sentence gold and predicted entity texts into a micro P/R/F1.

Published NER-with-LLM numbers are computed under different rules, so a number is only comparable to one scored
the same way. Every protocol here maps aligned sentences to per-sentence counts (true positives, predictions,
gold), and the micro scores are sums of those counts; the same counts feed the paired bootstrap in
``ner.compare``. ``golds[i]`` / ``preds[i]`` map type -> entity texts of sentence i; ``preds[i] is None`` (an
unparseable answer) predicts nothing. As in ``ner.metrics``, a bare string stands for a one-item list and
non-string items are skipped, so a sloppy parse cannot crash scoring.

* ``strict`` (ours, the headline number): exactly ``ner.metrics.score_corpus(..., mode="exact")``: the multiset
  of (type, text) per sentence, texts equal after whitespace canonicalisation, micro over all types (predicted
  types outside the schema count as false positives) and all sentences.
* ``blog``: the rule of the "Reinforcement Learning meets NER" blog's evaluation, which asks one question per
  (sentence, type) and scores only the questions whose gold has an entity. Only (sentence, type) pairs with at
  least one gold entity of that type are scored; for each, the SET of predicted texts of that type is compared with
  the SET of gold texts (exact text, deduplicated): tp = |pred ∩ gold|, n_pred = |pred|, n_gold = |gold|.
  Predictions for a type the sentence has no gold of are not charged.
* ``reasoningner``: the UniversalNER evaluation that ReasoningNER (arXiv 2511.11978) reports its numbers with:
  types named ``misc`` (any case) are left out of gold and prediction; texts are compared after
  ``ner.metrics.normalize`` (lowercase, no punctuation, no articles); each sentence is the SET of
  (normalised text, type) pairs; micro over sentences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ner.metrics import _keyed, match_key, normalize

Golds = list[dict[str, list[str]]]
Preds = list[dict[str, list[str]] | None]


@dataclass
class SentenceCounts:
    """Per-sentence integer counts under one protocol, each an int64 array of shape (n_sentences,)."""
    tp: np.ndarray
    n_pred: np.ndarray
    n_gold: np.ndarray


def _texts(value) -> list[str]:
    """The entity texts of one type: a bare string is one text, non-strings are dropped (as ``_keyed`` does)."""
    return [x for x in ([value] if isinstance(value, str) else value or []) if isinstance(x, str)]


def _counts(rows: list[tuple[int, int, int]]) -> SentenceCounts:
    arr = np.array(rows, dtype=np.int64).reshape(len(rows), 3)
    return SentenceCounts(tp=arr[:, 0].copy(), n_pred=arr[:, 1].copy(), n_gold=arr[:, 2].copy())


def _check_aligned(golds: Golds, preds: Preds) -> None:
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold sentences but {len(preds)} predictions")


def strict_counts(golds: Golds, preds: Preds, types: list[str]) -> SentenceCounts:
    """Multiset of (type, exact text) per sentence, all types. ``types`` is unused: like ``score_corpus``'s
    micro, out-of-schema predictions count too."""
    _check_aligned(golds, preds)
    rows = []
    for gold, pred in zip(golds, preds):
        # The same keying as score_corpus, so its micro scores and these sums agree by construction.
        g, p = _keyed(gold, "exact"), _keyed(pred or {}, "exact")
        rows.append((sum((g & p).values()), sum(p.values()), sum(g.values())))
    return _counts(rows)


def blog_counts(golds: Golds, preds: Preds, types: list[str]) -> SentenceCounts:
    """Sets of exact texts per (sentence, type) pair whose gold is non-empty, summed per sentence. Only schema
    ``types`` are scored: the blog asks one question per schema type, so no other pair exists there."""
    _check_aligned(golds, preds)
    rows = []
    for gold, pred in zip(golds, preds):
        tp = n_pred = n_gold = 0
        for t in types:
            gold_set = {match_key(x, "exact") for x in _texts(gold.get(t))}
            if not gold_set:  # a question without gold entities is not scored, whatever the answer
                continue
            pred_set = {match_key(x, "exact") for x in _texts((pred or {}).get(t))}
            tp, n_pred, n_gold = tp + len(pred_set & gold_set), n_pred + len(pred_set), n_gold + len(gold_set)
        rows.append((tp, n_pred, n_gold))
    return _counts(rows)


def _normalised_pairs(ents: dict[str, list[str]] | None) -> set[tuple[str, str]]:
    """{type: [text]} -> set of (normalised text, type), without ``misc`` types."""
    return {(normalize(x), t) for t, texts in (ents or {}).items() if t.lower() != "misc" for x in _texts(texts)}


def reasoningner_counts(golds: Golds, preds: Preds, types: list[str]) -> SentenceCounts:
    """Set of (normalised text, type) per sentence, ``misc`` left out. ``types`` is unused: every other
    predicted type counts, as in UniversalNER's scorer, which only compares the pairs."""
    _check_aligned(golds, preds)
    rows = []
    for gold, pred in zip(golds, preds):
        g, p = _normalised_pairs(gold), _normalised_pairs(pred)
        rows.append((len(g & p), len(p), len(g)))
    return _counts(rows)


PROTOCOLS: dict[str, Callable[[Golds, Preds, list[str]], SentenceCounts]] = {
    "strict": strict_counts,
    "blog": blog_counts,
    "reasoningner": reasoningner_counts,
}


def protocol_names(choice: str) -> list[str]:
    """``"all"`` -> every protocol, in the order of ``PROTOCOLS``; a single name -> [name]."""
    if choice == "all":
        return list(PROTOCOLS)
    if choice not in PROTOCOLS:
        raise ValueError(f"unknown protocol {choice!r}; expected one of {[*PROTOCOLS, 'all']}")
    return [choice]


def micro_f1(tp, n_pred, n_gold):
    """F1 = 2·tp / (n_pred + n_gold), 0 where the denominator is 0; elementwise on numpy arrays.

    Equal to 2PR/(P+R) whenever that is defined, and it needs no precision or recall, which keeps the bootstrap
    to three sums per resample.
    """
    tp, denom = np.asarray(tp, dtype=np.float64), np.asarray(n_pred + n_gold, dtype=np.float64)
    return np.divide(2.0 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def micro_scores(counts: SentenceCounts) -> dict[str, float | int]:
    """Micro precision, recall, F1 (0 for an empty denominator) and the summed counts."""
    tp, n_pred, n_gold = int(counts.tp.sum()), int(counts.n_pred.sum()), int(counts.n_gold.sum())
    return {"precision": tp / n_pred if n_pred else 0.0, "recall": tp / n_gold if n_gold else 0.0,
            "f1": float(micro_f1(tp, n_pred, n_gold)), "tp": tp, "n_pred": n_pred, "n_gold": n_gold}


def score_protocols(golds: Golds, preds: Preds, types: list[str], choice: str = "all") -> dict[str, dict]:
    """{protocol: micro scores} for ``choice`` (a protocol name or ``"all"``)."""
    return {name: micro_scores(PROTOCOLS[name](golds, preds, types)) for name in protocol_names(choice)}


def format_protocols(scores: dict[str, dict]) -> str:
    """Markdown table of ``score_protocols``'s output: one row per protocol, scores in percent."""
    lines = ["| protocol | P | R | F1 | tp | pred | gold |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {100 * s['precision']:.2f} | {100 * s['recall']:.2f} | {100 * s['f1']:.2f} | {s['tp']} "
              f"| {s['n_pred']} | {s['n_gold']} |" for name, s in scores.items()]
    return "\n".join(lines)
