"""ner.compare and ``evaluate.py --compare``: paired comparison of two runs, checked against hand arithmetic."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import ner.compare as compare
from ner.compare import CompareError, check_same_sentences, compare_dataset, compare_reports, paired_bootstrap
from ner.protocols import SentenceCounts

ROOT = Path(__file__).resolve().parents[1]
TYPES = ["person", "location", "Misc"]
GOLDS = [
    {"person": ["John", "John"], "location": ["Paris"], "Misc": []},
    {"person": [], "location": ["The U.S."], "Misc": ["German"]},
    {"person": ["Mary"], "location": [], "Misc": []},
]
PREDS_A = [  # the 3-sentence case of tests/test_protocols.py
    {"person": ["John"], "location": ["paris"], "Misc": ["French"]},
    {"person": ["Bob"], "location": ["U.S."], "Misc": ["German"]},
    None,
]
PREDS_B = [  # B fixes s1's "paris" → "Paris" and finds s3's Mary
    {"person": ["John"], "location": ["Paris"], "Misc": ["French"]},
    {"person": ["Bob"], "location": ["U.S."], "Misc": ["German"]},
    {"person": ["Mary"], "location": [], "Misc": []},
]


def _sentences(preds: list, ids: list[str] | None = None) -> list[dict]:
    ids = ids or [f"s{i}" for i in range(len(preds))]
    return [{"sentence_id": sid, "sentence": f"sentence {sid}", "types": TYPES, "gold": gold, "pred": pred,
             "format_ok": pred is not None, "completions": ["..."]} for sid, gold, pred in zip(ids, GOLDS, preds)]


def _write_report(path: Path, datasets: dict[str, list[dict]]) -> Path:
    """A report.json as evaluate.py writes it (the aggregate report is not read by --compare)."""
    results = {name: {"report": {"f1": 0.0}, "seconds": 0.0, "format_ok": 1.0, "sentences": sents}
               for name, sents in datasets.items()}
    results["average"] = {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": {}, "results": results}))
    return path


def _counts(tp, n_pred, n_gold) -> SentenceCounts:
    return SentenceCounts(np.array(tp), np.array(n_pred), np.array(n_gold))


def test_bootstrap_of_identical_runs_is_exactly_zero():
    counts = _counts([0, 1, 3, 2], [1, 2, 3, 4], [2, 2, 3, 1])
    result = paired_bootstrap(counts, counts, n_resamples=1000, seed=0)
    # the same resamples of the same counts give the same F1 bit for bit: every difference is 0.0
    assert (result["delta"], result["ci_low"], result["ci_high"], result["share_b_better"]) == (0, 0, 0, 0)


def test_bootstrap_interval_is_positive_when_b_is_better_on_every_sentence():
    # n_pred = n_gold = [1, 2, 3, 4]; A tp [0, 1, 1, 2], B tp = A tp + 1 on each sentence.
    # Full sample: F1_A = 2·4/(10+10) = 0.4, F1_B = 2·8/20 = 0.8, Δ = 0.4. In any resample of k sentences
    # ΣtpB = ΣtpA + k > ΣtpA with the same denominator, so every Δ > 0.
    a = _counts([0, 1, 1, 2], [1, 2, 3, 4], [1, 2, 3, 4])
    b = _counts([1, 2, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4])
    result = paired_bootstrap(a, b, n_resamples=1000, seed=3)
    assert (result["f1_a"], result["f1_b"], result["delta"]) == pytest.approx((0.4, 0.8, 0.4))
    assert result["ci_low"] > 0 and result["ci_high"] >= result["ci_low"]
    assert result["share_b_better"] == 1.0


def _reference_bootstrap(a: SentenceCounts, b: SentenceCounts, n_resamples: int, seed: int) -> tuple:
    """Plain-Python loop over the same draws; the percentile by linear interpolation (numpy's default)."""
    n = len(a.tp)
    draws = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n)).tolist()
    deltas = []
    for row in draws:
        f1 = []
        for c in (a, b):
            tp = sum(int(c.tp[i]) for i in row)
            denom = sum(int(c.n_pred[i]) + int(c.n_gold[i]) for i in row)
            f1.append(2 * tp / denom if denom else 0.0)
        deltas.append(f1[1] - f1[0])
    ordered = sorted(deltas)

    def percentile(q: float) -> float:
        pos = q / 100 * (len(ordered) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return percentile(2.5), percentile(97.5), sum(d > 0 for d in deltas) / len(deltas)


@pytest.mark.parametrize("max_indices", [1 << 22, 10])  # one draw, then chunks of 2 resamples
def test_bootstrap_matches_a_plain_loop_on_the_same_draws(monkeypatch, max_indices):
    monkeypatch.setattr(compare, "_MAX_INDICES_PER_CHUNK", max_indices)
    a = _counts([0, 2, 1, 0, 3], [1, 3, 2, 0, 4], [2, 2, 1, 1, 3])
    b = _counts([1, 1, 1, 1, 3], [2, 1, 1, 1, 3], [2, 2, 1, 1, 3])
    result = paired_bootstrap(a, b, n_resamples=301, seed=11)
    low, high, share = _reference_bootstrap(a, b, 301, 11)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high), abs=1e-12)
    assert result["share_b_better"] == share
    assert low < high  # a case with spread, so the interpolation is exercised


def test_compare_dataset_by_hand():
    result = compare_dataset(_sentences(PREDS_A), _sentences(PREDS_B), n_resamples=1000, seed=0)
    per_type = result["per_type"]
    # A person: gold John×2 + Mary = 3, pred John + Bob = 2, tp 1 → P 1/2, R 1/3, F1 2·1/(2+3) = 0.4
    # B person: pred John, Bob, Mary = 3, tp 2 → P = R = F1 = 2/3
    assert [per_type["person"]["a"][k] for k in ("precision", "recall", "f1")] == pytest.approx([1 / 2, 1 / 3, 0.4])
    assert [per_type["person"]["b"][k] for k in ("precision", "recall", "f1")] == pytest.approx([2 / 3] * 3)
    # location: A 0 of 2 ("paris", "U.S." both wrong), B 1 of 2 (Paris) → ΔF1 = 1/2; Misc unchanged
    assert per_type["location"]["delta"]["f1"] == pytest.approx(0.5)
    assert per_type["Misc"]["delta"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # micro: A tp 2 / pred 6 / gold 6 → F1 1/3; B tp 4 / pred 7 / gold 6 → F1 8/13
    assert per_type["micro"]["delta"]["f1"] == pytest.approx(8 / 13 - 1 / 3)
    # A: s1 John missed, "paris"~Paris wrong boundary, French spurious; s2 Bob spurious, "U.S."~"The U.S." wrong
    #    boundary; s3 Mary missed → missed 2, spurious 2, wrong_type 0, wrong_boundary 2.
    # B: s1 John missed, French spurious; s2 as in A → missed 1, spurious 2, wrong_type 0, wrong_boundary 1.
    assert {k: (v["a"], v["b"], v["delta"]) for k, v in result["errors"].items()} == {
        "missed": (2, 1, -1), "spurious": (2, 2, 0), "wrong_type": (0, 0, 0), "wrong_boundary": (2, 1, -1)}
    # micro F1 by protocol (A from tests/test_protocols.py):
    #   strict 1/3 → 8/13; blog: B s1 2/2/2, s2 1/2/2, s3 1/1/1 → 2·4/(5+5) = 0.8 (A 4/9);
    #   reasoningner: B s1 2/2/2, s2 1/2/1, s3 1/1/1 → 2·4/(5+4) = 8/9 (A 3/4)
    protocols = result["protocols"]
    expected = {"strict": (1 / 3, 8 / 13), "blog": (4 / 9, 0.8), "reasoningner": (3 / 4, 8 / 9)}
    for name, (f1_a, f1_b) in expected.items():
        assert (protocols[name]["f1_a"], protocols[name]["f1_b"]) == pytest.approx((f1_a, f1_b))
        assert protocols[name]["delta"] == pytest.approx(f1_b - f1_a)
        # B is never worse on any sentence, so no resample has B < A
        assert protocols[name]["ci_low"] >= 0 and 0 < protocols[name]["share_b_better"] <= 1


def test_mismatched_runs_raise_errors_naming_the_file_and_the_first_differing_id(tmp_path):
    a = {"conll2003": _sentences(PREDS_A)}
    with pytest.raises(CompareError, match=r"sentence 1 is 's1' in A.json but 'x1' in B.json"):
        check_same_sentences("A.json", a, "B.json", {"conll2003": _sentences(PREDS_B, ["s0", "x1", "s2"])})
    with pytest.raises(CompareError, match=r"sentence 1 is 's1' in A.json but 's2' in B.json"):  # same ids, reordered
        check_same_sentences("A.json", a, "B.json", {"conll2003": _sentences(PREDS_B, ["s0", "s2", "s1"])})
    with pytest.raises(CompareError, match=r"sentence 2 is 's2' in A.json but '<missing>' in B.json"):
        check_same_sentences("A.json", a, "B.json", {"conll2003": _sentences(PREDS_B)[:2]})
    with pytest.raises(CompareError, match=r"different datasets: A.json has \['conll2003'\], B.json has \['other'\]"):
        check_same_sentences("A.json", a, "B.json", {"other": _sentences(PREDS_B)})
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"config": {}, "results": {"conll2003": {"report": {}, "format_ok": 1.0}}}))
    with pytest.raises(CompareError, match=r"old.json: dataset 'conll2003' has no per-sentence entries"):
        compare_reports(old, _write_report(tmp_path / "b.json", a))


def _run_evaluate(*args: str) -> subprocess.CompletedProcess:
    """evaluate.py in a fresh interpreter where importing torch or transformers fails: proof no model loads."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            f"sys.argv = ['evaluate.py', *{list(args)!r}]; runpy.run_path('evaluate.py', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_evaluate_compare_end_to_end_without_a_model(tmp_path):
    path_a = _write_report(tmp_path / "A" / "report.json", {"toy": _sentences(PREDS_A)})
    path_b = _write_report(tmp_path / "B" / "report.json", {"toy": _sentences(PREDS_B)})
    out_dir = tmp_path / "cmp"
    done = _run_evaluate("--compare", str(path_a), str(path_b), "--bootstrap", "1000", "--seed", "0",
                         "--out_dir", str(out_dir))
    assert done.returncode == 0, done.stderr
    assert "## toy (3 sentences)" in done.stdout
    # strict: 100·1/3 = 33.33, 100·8/13 = 61.54, Δ = +28.21 points
    assert "| strict | 33.33 | 61.54 | +28.21 |" in done.stdout
    assert "| wrong_boundary | 2 | 1 | -1 |" in done.stdout
    assert (out_dir / "compare.md").read_text() in done.stdout
    saved = json.loads((out_dir / "compare.json").read_text())
    assert saved["bootstrap"] == 1000 and list(saved["datasets"]) == ["toy"]
    assert saved["datasets"]["toy"]["protocols"]["blog"]["f1_b"] == pytest.approx(0.8)

    mismatched = _write_report(tmp_path / "C" / "report.json", {"toy": _sentences(PREDS_B, ["s0", "s9", "s2"])})
    done = _run_evaluate("--compare", str(path_a), str(mismatched))
    assert done.returncode == 2
    assert "sentence 1 is 's1'" in done.stderr and str(mismatched) in done.stderr
