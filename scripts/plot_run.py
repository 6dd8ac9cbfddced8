"""One figure of a GRPO run and the evaluations around it, for the README.

    python scripts/plot_run.py --grpo_run runs/grpo_smollm2_conll \\
        --report base=outputs/test_smollm2-135m-instruct/report.json \\
        --report sft=outputs/test_sft_smollm2_conll/report.json \\
        --report grpo=outputs/test_grpo_smollm2_conll/report.json --out docs/main_job.png

Panels: (1) the GRPO run's mean reward per step, raw and a trailing moving average; (2) dev F1 at the steps
where the run evaluated (``eval_limit`` > 0); (3) per-type and micro F1 of each ``--report`` (evaluate.py's
report.json), as grouped bars. Any missing input (no run folder, no metrics.jsonl, no eval, a missing report) is
skipped with a note on stdout and in its panel, so the figure is always written.

Where the numbers come from: grpo.rollout_io.RunLogger appends one JSON object per training step to
``<run>/metrics.jsonl`` ({"step": s, "reward/mean": …, …}). Dev evaluations (``eval/f1`` …) go to TensorBoard
(``<run>/tb``) and the console; lines carrying them in metrics.jsonl are used when present, else the TensorBoard
events are read.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on CI machines or over ssh
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Series = dict[str, list[tuple[int, float]]]


def read_metrics(path: str | Path) -> Series:
    """{metric: [(step, value)]} of a metrics.jsonl, sorted by step, each step once.

    A resumed run re-runs the steps after its last checkpoint and appends them again: the LAST line of a step wins
    (it is the run that continued). Lines that are not JSON objects with an int "step" (a line cut by a crash) and
    non-numeric values are skipped.
    """
    by_step: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            continue
        for key, value in record.items():
            # bool is an int in Python but never a metric value here
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                by_step.setdefault(key, {})[record["step"]] = float(value)
    return {key: sorted(points.items()) for key, points in by_step.items()}


def read_tensorboard(tb_dir: str | Path, prefix: str = "eval/") -> Series:
    """{tag: [(step, value)]} of the scalar tags starting with ``prefix`` in a TensorBoard folder ({} if none).

    A step logged twice (a resumed run) keeps its latest value by wall time.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: Series = {}
    for events in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            if tag.startswith(prefix):
                for e in acc.Scalars(tag):
                    out.setdefault(tag, []).append((e.wall_time, e.step, e.value))
    series = {}
    for tag, points in out.items():
        latest = {step: value for _, step, value in sorted(points)}  # sorted by wall time: the last one wins
        series[tag] = sorted(latest.items())
    return series


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def read_report(path: str | Path, dataset: str | None = None) -> tuple[str, dict[str, float]]:
    """(dataset, {type: F1, ..., "micro": F1}) from an evaluate.py report.json.

    ``results[dataset]["report"]`` holds ``per_type[type]["f1"]`` and the micro ``f1``; ``dataset`` defaults to the
    first one in the file (the "average" entry of a multi-dataset report has no per-type scores and is skipped).
    """
    results = json.loads(Path(path).read_text(encoding="utf-8"))["results"]
    names = [n for n, r in results.items() if isinstance(r, dict) and "report" in r]
    if dataset is None:
        if not names:
            raise ValueError(f"{path}: no dataset with a report in 'results'")
        dataset = names[0]
    elif dataset not in names:
        raise ValueError(f"{path}: no dataset {dataset!r} (it has {names})")
    report = results[dataset]["report"]
    scores = {t: float(s["f1"]) for t, s in report["per_type"].items()}
    scores["micro"] = float(report["f1"])
    return dataset, scores


def _note(ax, text: str) -> None:
    ax.set_xticks([])  # an empty panel: the note, not a meaningless 0..1 grid
    ax.set_yticks([])
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, transform=ax.transAxes, fontsize=9, color="0.4")


def plot_reward(ax, metrics: Series | None, window: int, note: str) -> None:
    """Panel 1: reward/mean per step and its moving average."""
    ax.set_title("GRPO mean reward per step")
    points = (metrics or {}).get("reward/mean", [])
    if not points:
        _note(ax, note or "no reward/mean in metrics.jsonl")
        return
    steps, values = zip(*points)
    ax.plot(steps, values, color="C0", alpha=0.35, lw=1, marker=".", label="reward/mean")
    ax.plot(steps, moving_average(list(values), window), color="C0", lw=2, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_ylabel("reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_dev_f1(ax, evals: Series | None, note: str) -> None:
    """Panel 2: eval/f1 (and precision/recall when logged) at the evaluated steps."""
    ax.set_title("dev F1 during GRPO")
    if not (evals or {}).get("eval/f1"):
        _note(ax, note or "no eval/f1 logged (the run had eval_limit 0)")
        return
    for key, style in (("eval/f1", "-o"), ("eval/precision", ":"), ("eval/recall", "--")):
        if evals.get(key):
            steps, values = zip(*evals[key])
            ax.plot(steps, values, style, lw=2 if key == "eval/f1" else 1, label=key.removeprefix("eval/"))
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("score")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_reports(ax, reports: list[tuple[str, str, dict[str, float]]], note: str) -> None:
    """Panel 3: grouped bars, one group per entity type (+ micro), one bar per report."""
    if not reports:
        ax.set_title("F1 by type")
        _note(ax, note or "no report.json given")
        return
    datasets = sorted({d for _, d, _ in reports})
    ax.set_title(f"F1 by type ({', '.join(datasets)})")
    types = [t for t in dict.fromkeys(t for _, _, s in reports for t in s) if t != "micro"] + ["micro"]
    width = 0.8 / len(reports)
    for k, (label, _, scores) in enumerate(reports):
        xs = [i + (k - (len(reports) - 1) / 2) * width for i in range(len(types))]
        heights = [scores.get(t, math.nan) for t in types]
        bars = ax.bar(xs, heights, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    ax.set_xticks(range(len(types)), types, rotation=20, fontsize=8)
    ax.set_ylabel("F1")
    ax.set_ylim(0, max(1.0, max(v for _, _, s in reports for v in s.values() if not math.isnan(v)) * 1.1))
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def main(argv: list[str] | None = None) -> list[str]:
    """Draw the figure; returns the notes about skipped inputs (also printed)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpo_run", default="", help="GRPO run folder (its metrics.jsonl and tb/)")
    parser.add_argument("--report", action="append", default=[], metavar="LABEL=PATH",
                        help="an evaluate.py report.json with its bar label; repeat for each model")
    parser.add_argument("--dataset", default=None, help="dataset inside the reports (default: each one's first)")
    parser.add_argument("--smooth", type=int, default=5, help="moving-average window in steps")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)

    notes: list[str] = []
    metrics = evals = None
    run_note = ""
    if args.grpo_run:
        path = Path(args.grpo_run) / "metrics.jsonl"
        if path.is_file():
            metrics = read_metrics(path)
            evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
            tb = Path(args.grpo_run) / "tb"
            if not evals.get("eval/f1") and tb.is_dir():
                evals = read_tensorboard(tb)
        else:
            run_note = f"skipped: no {path}"
            notes.append(run_note)
    else:
        run_note = "no --grpo_run given"
    reports = []
    for item in args.report:
        label, sep, path = item.partition("=")
        if not sep:
            label, path = Path(item).parent.name, item
        try:
            dataset, scores = read_report(path, args.dataset)
        except (OSError, ValueError, KeyError, TypeError) as exc:  # missing or not an evaluate.py report
            notes.append(f"skipped report {label}: {type(exc).__name__}: {exc}")
            continue
        reports.append((label, dataset, scores))

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    plot_reward(axes[0], metrics, max(1, args.smooth), run_note)
    plot_dev_f1(axes[1], evals, run_note)
    plot_reports(axes[2], reports, "; ".join(n for n in notes if n.startswith("skipped report")))
    fig.suptitle(f"GRPO run {args.grpo_run}" if args.grpo_run else "evaluation reports", fontsize=11)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out}")
    return notes


if __name__ == "__main__":
    main(sys.argv[1:])
