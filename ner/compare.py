"""Compare two evaluation runs sentence by sentence: ``python evaluate.py --compare A/report.json B/report.json``.

Both report.json files must keep their per-sentence entries (``results[dataset]["sentences"]``, written by
evaluate.py) for the same datasets and the same sentence ids in the same order, so every difference is paired. For
each dataset the comparison has the strict per-type P/R/F1 and error buckets of A, B and B − A (``score_corpus``
in exact mode), and the micro F1 of A, B and B − A under every protocol of ``ner.protocols`` with a 95% paired
bootstrap interval of the difference: resample sentences with replacement, the same resample for A and B,
recompute both micro F1s from the resampled per-sentence counts, and take the 2.5th and 97.5th percentiles of
their difference (the percentile method). ``share_b_better`` is the fraction of resamples where B's F1 > A's.

Nothing here loads a model: it only reads JSON, so a comparison takes about a second.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ner.metrics import ERROR_BUCKETS, score_corpus
from ner.protocols import PROTOCOLS, SentenceCounts, micro_f1, micro_scores

# At most this many resampled indices are held at once; larger runs are drawn in chunks of resamples.
# Generator.integers draws int64 values one after another, so the chunks are the rows of one big draw.
_MAX_INDICES_PER_CHUNK = 1 << 22
MIN_CLI_RESAMPLES = 1000  # fewer makes the 2.5th / 97.5th percentiles noisy from one seed to the next


class CompareError(ValueError):
    """The two reports cannot be compared; the message names the file and what differs."""


def load_sentences(path: str | Path) -> dict[str, list[dict]]:
    """{dataset: its per-sentence entries} of one report.json; the ``average`` row (no entries) is skipped."""
    path = Path(path)
    try:
        results = json.loads(path.read_text())["results"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CompareError(f"{path}: cannot read an evaluate.py report.json ({type(exc).__name__}: {exc})") from exc
    out = {}
    for name, result in results.items():
        if name == "average" and "report" not in result:
            continue
        if "sentences" not in result:
            raise CompareError(f"{path}: dataset {name!r} has no per-sentence entries (a report written before "
                               f"they were kept); re-run evaluate.py to get them")
        out[name] = result["sentences"]
    return out


def check_same_sentences(path_a: str | Path, runs_a: dict[str, list[dict]], path_b: str | Path,
                         runs_b: dict[str, list[dict]]) -> None:
    """Raise ``CompareError`` unless both runs have the same datasets and, in each, the same ids in order."""
    if set(runs_a) != set(runs_b):
        raise CompareError(f"different datasets: {path_a} has {sorted(runs_a)}, {path_b} has {sorted(runs_b)}")
    for name, sents_a in runs_a.items():
        ids_a = [s["sentence_id"] for s in sents_a]
        ids_b = [s["sentence_id"] for s in runs_b[name]]
        for i in range(max(len(ids_a), len(ids_b))):
            id_a = ids_a[i] if i < len(ids_a) else "<missing>"
            id_b = ids_b[i] if i < len(ids_b) else "<missing>"
            if id_a != id_b:
                raise CompareError(
                    f"dataset {name!r}: sentence {i} is {id_a!r} in {path_a} but {id_b!r} in {path_b} "
                    f"({len(ids_a)} vs {len(ids_b)} sentences); compare runs on the same split and --limit")


def sentence_types(*runs: list[dict]) -> list[str]:
    """Every type asked about in the given sentence lists, in first-seen order (the dataset's schema order)."""
    types: dict[str, None] = {}
    for sentences in runs:
        for s in sentences:
            types.update(dict.fromkeys(s["types"]))
    return list(types)


def protocol_counts(sentences: list[dict], types: list[str]) -> dict[str, SentenceCounts]:
    """{protocol: per-sentence counts} of one run."""
    golds, preds = [s["gold"] for s in sentences], [s["pred"] for s in sentences]
    return {name: counts_fn(golds, preds, types) for name, counts_fn in PROTOCOLS.items()}


def paired_bootstrap(counts_a: SentenceCounts, counts_b: SentenceCounts, n_resamples: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """Micro F1 of A and B, their difference B − A, its 95% percentile interval and the share of resamples
    where B > A.

    Resample r takes the sentence indices ``rng.integers(0, n, size=(n_resamples, n))[r]`` with
    ``rng = np.random.default_rng(seed)``, the same for A and B (paired), and computes
    F1 = 2·Σtp / (Σn_pred + Σn_gold) over them. With A and B identical every difference is exactly 0.
    """
    n = len(counts_a.tp)
    if n != len(counts_b.tp):
        raise ValueError(f"A has {n} sentences but B has {len(counts_b.tp)}")
    if n == 0 or n_resamples < 1:
        raise ValueError(f"need at least one sentence and one resample, got {n} and {n_resamples}")
    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_INDICES_PER_CHUNK // n)
    deltas = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))

        def resampled_f1(c: SentenceCounts) -> np.ndarray:
            return micro_f1(c.tp[idx].sum(axis=1), c.n_pred[idx].sum(axis=1), c.n_gold[idx].sum(axis=1))

        deltas.append(resampled_f1(counts_b) - resampled_f1(counts_a))
    delta = np.concatenate(deltas)
    f1_a, f1_b = micro_scores(counts_a)["f1"], micro_scores(counts_b)["f1"]
    low, high = np.percentile(delta, [2.5, 97.5])
    return {"f1_a": f1_a, "f1_b": f1_b, "delta": f1_b - f1_a, "ci_low": float(low), "ci_high": float(high),
            "share_b_better": float(np.mean(delta > 0))}


def _prf_of(score) -> dict[str, float]:
    return {"precision": score.precision, "recall": score.recall, "f1": score.f1}


def compare_dataset(sents_a: list[dict], sents_b: list[dict], n_resamples: int = 1000, seed: int = 0) -> dict:
    """Per-type strict scores, error buckets and every protocol's paired bootstrap of one dataset."""
    types = sentence_types(sents_a, sents_b)
    reports = [score_corpus([s["gold"] for s in sents], [s["pred"] for s in sents], types, mode="exact")
               for sents in (sents_a, sents_b)]
    rows = {t: (_prf_of(reports[0].per_type[t]), _prf_of(reports[1].per_type[t])) for t in types}
    rows["micro"] = (_prf_of(reports[0]), _prf_of(reports[1]))
    per_type = {t: {"a": a, "b": b, "delta": {k: b[k] - a[k] for k in a}} for t, (a, b) in rows.items()}
    errors = {k: {"a": getattr(reports[0], k), "b": getattr(reports[1], k),
                  "delta": getattr(reports[1], k) - getattr(reports[0], k)} for k in ERROR_BUCKETS}
    counts_a, counts_b = protocol_counts(sents_a, types), protocol_counts(sents_b, types)
    protocols = {name: paired_bootstrap(counts_a[name], counts_b[name], n_resamples, seed) for name in PROTOCOLS}
    return {"n_sentences": len(sents_a), "types": types, "per_type": per_type, "errors": errors,
            "protocols": protocols}


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _signed_pct(x: float) -> str:
    return f"{100 * x:+.2f}"


def format_dataset(name: str, result: dict) -> str:
    """Markdown for one dataset's comparison; scores and differences in percentage points."""
    lines = [f"## {name} ({result['n_sentences']} sentences)", "", "### Per type (strict)", "",
             "| type | P A | R A | F1 A | P B | R B | F1 B | ΔP | ΔR | ΔF1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t, row in result["per_type"].items():
        cells = [_pct(row[run][k]) for run in ("a", "b") for k in ("precision", "recall", "f1")]
        cells += [_signed_pct(row["delta"][k]) for k in ("precision", "recall", "f1")]
        lines.append(f"| {'**micro**' if t == 'micro' else t} | " + " | ".join(cells) + " |")
    lines += ["", "### Errors (strict)", "", "| bucket | A | B | Δ |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['a']} | {v['b']} | {v['delta']:+d} |" for k, v in result["errors"].items()]
    lines += ["", "### Micro F1 by protocol", "", "| protocol | F1 A | F1 B | ΔF1 | 95% CI of ΔF1 | share B > A |",
              "|---|---:|---:|---:|---|---:|"]
    for p, s in result["protocols"].items():
        lines.append(f"| {p} | {_pct(s['f1_a'])} | {_pct(s['f1_b'])} | {_signed_pct(s['delta'])} | "
                     f"[{_signed_pct(s['ci_low'])}, {_signed_pct(s['ci_high'])}] | {s['share_b_better']:.3f} |")
    return "\n".join(lines)


def compare_reports(path_a: str | Path, path_b: str | Path, n_resamples: int = 1000, seed: int = 0) -> dict:
    """Load, check and compare two report.json files: {"a", "b", "bootstrap", "seed", "datasets": {...}}."""
    runs_a, runs_b = load_sentences(path_a), load_sentences(path_b)
    check_same_sentences(path_a, runs_a, path_b, runs_b)
    datasets = {name: compare_dataset(runs_a[name], runs_b[name], n_resamples, seed) for name in runs_a}
    return {"a": str(path_a), "b": str(path_b), "bootstrap": n_resamples, "seed": seed, "datasets": datasets}


def format_comparison(comparison: dict) -> str:
    """The whole comparison as one markdown document."""
    head = ["# Comparison: B − A", "", f"- A: `{comparison['a']}`", f"- B: `{comparison['b']}`",
            f"- paired bootstrap: {comparison['bootstrap']} resamples of sentences, seed {comparison['seed']}; "
            f"scores in %, differences in points", ""]
    return "\n".join(head + ["\n\n".join(format_dataset(n, r) for n, r in comparison["datasets"].items())]) + "\n"


def main(argv: list[str]) -> dict:
    """The ``evaluate.py --compare`` command line: print the markdown, write compare.md/.json to --out_dir."""
    parser = argparse.ArgumentParser(prog="evaluate.py",
                                     description="Compare two evaluate.py runs (B − A) on the same sentences.")
    parser.add_argument("--compare", nargs=2, required=True, metavar=("A_REPORT_JSON", "B_REPORT_JSON"))
    parser.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples (>= 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples")
    parser.add_argument("--out_dir", "--out-dir", default=None, help="also write compare.md and compare.json here")
    args = parser.parse_args(argv)
    if args.bootstrap < MIN_CLI_RESAMPLES:
        parser.error(f"--bootstrap must be at least {MIN_CLI_RESAMPLES}, got {args.bootstrap}")
    try:
        comparison = compare_reports(*args.compare, n_resamples=args.bootstrap, seed=args.seed)
    except CompareError as exc:
        parser.exit(2, f"evaluate.py --compare: error: {exc}\n")
    markdown = format_comparison(comparison)
    print(markdown, end="")
    if args.out_dir:
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "compare.md").write_text(markdown)
        (out / "compare.json").write_text(json.dumps(comparison, indent=2))
        print(f"wrote {out / 'compare.md'} and {out / 'compare.json'}")
    return comparison
