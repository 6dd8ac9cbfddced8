"""Entity-level NER scores on span texts.

The scoring unit is the triple (sentence index, type, span text), counted as a multiset: a text predicted twice
where the gold has it once is one true positive and one false positive. Offsets are not used, because the
models under training answer with texts, not positions.

Two matching modes decide when two texts are "the same":
  * ``exact``: identical after whitespace canonicalisation (runs of whitespace -> one space, ends stripped);
    whitespace is not content, and gold texts are tokens joined by single spaces.
  * ``normalized``: UniversalNER / SQuAD style: lowercase, drop ASCII punctuation, drop the articles
    a/an/the, collapse whitespace. ``"The U.S."`` and ``"us"`` match.

Error buckets (``score_corpus``). After true positives are removed, every unmatched gold and prediction is
put in exactly one bucket, in this order of precedence:
  1. ``wrong_type``: a prediction whose text equals (in the mode) an unmatched gold text of another type in
     the same sentence; the pair is consumed (it accounts for one FP and one FN).
  2. ``wrong_boundary``: a prediction of the right type whose normalised text shares at least one
     whitespace token with an unmatched gold of that type in the same sentence; paired greedily with the
     gold of largest token overlap (ties: the first gold in the dict's order); the pair is consumed.
  3. ``spurious``: any prediction left; ``missed``: any gold left (all gold of an unparseable sentence).
Hence  FN = missed + wrong_type + wrong_boundary  and  FP = spurious + wrong_type + wrong_boundary.
A prediction with the wrong type *and* the wrong boundary is spurious (and its gold missed).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field

MODES = ("exact", "normalized")
ERROR_BUCKETS = ("missed", "spurious", "wrong_type", "wrong_boundary")
_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lowercase, strip punctuation, remove the articles a/an/the, collapse whitespace (UniversalNER style)."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def match_key(text: str, mode: str = "exact") -> str:
    """The form under which two entity texts are compared in ``mode``."""
    if mode == "exact":
        return " ".join(text.split())
    if mode == "normalized":
        return normalize(text)
    raise ValueError(f"unknown match mode {mode!r}; expected one of {MODES}")


def _keyed(ents: dict[str, list[str]], mode: str) -> Counter:
    """{type: [text]} -> Counter over (type, key). A bare string stands for a one-item list and non-string
    items are skipped, so a sloppy parse of model output cannot crash scoring."""
    out: Counter = Counter()
    for t, texts in ents.items():
        for x in [texts] if isinstance(texts, str) else texts:
            if isinstance(x, str):
                out[(t, match_key(x, mode))] += 1
    return out


def entity_f1(gold: dict[str, list[str]], pred: dict[str, list[str]], mode: str = "exact") -> float:
    """F1 of one sentence's predicted entity texts against the gold, as multisets of (type, text).

    F1 = 2 TP / (|gold| + |pred|). Both empty -> 1.0: predicting nothing for a sentence that has nothing is
    perfect. (ReasoningNER's released reward code returns 0 here, which punishes the correct empty answer; the
    paper's text says 1, and we follow the paper.) Exactly one empty -> 0.
    """
    match_key("", mode)  # validate the mode even when there is nothing to compare
    g, p = _keyed(gold, mode), _keyed(pred, mode)
    n_gold, n_pred = sum(g.values()), sum(p.values())
    if n_gold == 0 and n_pred == 0:
        return 1.0
    tp = sum((g & p).values())
    return 2.0 * tp / (n_gold + n_pred)


def _prf(tp: int, n_pred: int, n_gold: int) -> tuple[float, float, float]:
    """Precision, recall, F1 with 0 for an empty denominator (seqeval's zero_division=0)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


@dataclass
class TypeScore:
    precision: float
    recall: float
    f1: float
    support: int  # gold count
    n_pred: int
    tp: int


@dataclass
class NERReport:
    """Corpus scores. ``macro_f1`` averages per-type F1 over types with gold or predictions (others are
    undefined and left out). Predictions of types outside the schema count in the micro scores and buckets,
    and are tallied in ``n_out_of_schema``; ``per_type`` has the schema types only."""
    mode: str
    precision: float
    recall: float
    f1: float
    tp: int
    n_gold: int
    n_pred: int
    macro_f1: float
    per_type: dict[str, TypeScore] = field(default_factory=dict)
    missed: int = 0
    spurious: int = 0
    wrong_type: int = 0
    wrong_boundary: int = 0
    n_sentences: int = 0
    n_unparsed: int = 0
    n_out_of_schema: int = 0

    def to_dict(self) -> dict:
        """JSON-ready dict; the four error buckets are grouped under ``"errors"``."""
        out = asdict(self)
        out["errors"] = {k: out.pop(k) for k in ERROR_BUCKETS}
        return out


def _bucket_sentence(gold_left: list[tuple[str, str]], pred_left: list[tuple[str, str]]) -> Counter:
    """Split one sentence's unmatched (type, key) golds and preds into the four error buckets.

    Keys are already in the match mode; ``normalize`` of a key equals ``normalize`` of its original text.
    """
    counts: Counter = Counter()
    golds = list(gold_left)
    preds_left = []
    for ptype, pkey in pred_left:  # 1. same text, other type
        j = next((j for j, (gt, gk) in enumerate(golds) if gt != ptype and gk == pkey), None)
        if j is None:
            preds_left.append((ptype, pkey))
        else:
            golds.pop(j)
            counts["wrong_type"] += 1
    for ptype, pkey in preds_left:  # 2. same type, overlapping tokens
        ptoks = Counter(normalize(pkey).split())
        overlaps = [(sum((ptoks & Counter(normalize(gk).split())).values()), -j)
                    for j, (gt, gk) in enumerate(golds) if gt == ptype]
        best_overlap, neg_j = max(overlaps, default=(0, 0))
        if best_overlap > 0:
            golds.pop(-neg_j)
            counts["wrong_boundary"] += 1
        else:
            counts["spurious"] += 1
    counts["missed"] += len(golds)
    return counts


def _expand(counter: Counter) -> list[tuple[str, str]]:
    """Multiset -> list of its items, each repeated by its count (sentence order is not kept)."""
    return [k for k, n in counter.items() for _ in range(n)]


def score_corpus(golds: list[dict[str, list[str]]], preds: list[dict[str, list[str]] | None],
                 types: list[str], mode: str = "exact") -> NERReport:
    """Micro/per-type/macro scores and an error breakdown over aligned sentences.

    ``golds[i]``/``preds[i]`` map type -> entity texts of sentence i; ``preds[i] is None`` means the model
    output could not be parsed: all its gold counts as missed and it is tallied in ``n_unparsed``.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold sentences but {len(preds)} predictions")
    match_key("", mode)  # validate the mode before any work
    schema = set(types)
    tp_t, gold_t, pred_t = Counter(), Counter(), Counter()
    buckets = Counter()
    n_unparsed = n_out = 0
    for gold, pred in zip(golds, preds):
        if pred is None:
            n_unparsed += 1
            pred = {}
        g, p = _keyed(gold, mode), _keyed(pred, mode)
        matched = g & p
        for (t, _), n in g.items():
            gold_t[t] += n
        for (t, _), n in p.items():
            pred_t[t] += n
            n_out += n if t not in schema else 0
        for (t, _), n in matched.items():
            tp_t[t] += n
        buckets.update(_bucket_sentence(_expand(g - matched), _expand(p - matched)))
    per_type = {}
    for t in types:
        pr, rc, f = _prf(tp_t[t], pred_t[t], gold_t[t])
        per_type[t] = TypeScore(pr, rc, f, gold_t[t], pred_t[t], tp_t[t])
    defined = [s.f1 for s in per_type.values() if s.support or s.n_pred]
    tp, n_gold, n_pred = sum(tp_t.values()), sum(gold_t.values()), sum(pred_t.values())
    pr, rc, f = _prf(tp, n_pred, n_gold)
    return NERReport(mode=mode, precision=pr, recall=rc, f1=f, tp=tp, n_gold=n_gold, n_pred=n_pred,
                     macro_f1=sum(defined) / len(defined) if defined else 0.0, per_type=per_type,
                     missed=buckets["missed"], spurious=buckets["spurious"], wrong_type=buckets["wrong_type"],
                     wrong_boundary=buckets["wrong_boundary"], n_sentences=len(golds), n_unparsed=n_unparsed,
                     n_out_of_schema=n_out)


def format_table(report: NERReport) -> str:
    """Markdown table: one row per type, then the micro row; scores in percent; errors on a last line."""
    head = "| type | P | R | F1 | support | pred |\n|---|---:|---:|---:|---:|---:|"
    row = "| {} | {:.2f} | {:.2f} | {:.2f} | {} | {} |"
    rows = [row.format(t, 100 * s.precision, 100 * s.recall, 100 * s.f1, s.support, s.n_pred)
            for t, s in report.per_type.items()]
    rows.append(row.format("**micro**", 100 * report.precision, 100 * report.recall, 100 * report.f1,
                           report.n_gold, report.n_pred))
    tail = (f"macro F1 {100 * report.macro_f1:.2f} | mode {report.mode} | sentences {report.n_sentences} "
            f"(unparsed {report.n_unparsed}) | errors: missed {report.missed}, spurious {report.spurious}, "
            f"wrong type {report.wrong_type}, wrong boundary {report.wrong_boundary}")
    return "\n".join([head, *rows, "", tail])
