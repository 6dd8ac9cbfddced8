"""scripts/plot_run.py: the numbers it reads are the files' (a resumed step counted once, its last value), and it
writes a real PNG, also when inputs are missing."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plot_run():
    spec = importlib.util.spec_from_file_location("plot_run", ROOT / "scripts" / "plot_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(run: Path) -> None:
    """Steps 1-4, then a resume from the step-2 checkpoint that re-runs steps 3-4; dev evals at 0 and 4; a last
    line cut by a crash."""
    lines = [{"step": 0, "eval/f1": 0.20, "eval/precision": 0.25},
             {"step": 1, "reward/mean": 0.5, "reward/std": 0.1, "lr": 1e-6},
             {"step": 2, "reward/mean": 0.7, "reward/std": 0.2, "lr": 2e-6},
             {"step": 3, "reward/mean": 9.0, "reward/std": 0.3, "lr": 3e-6},
             {"step": 4, "reward/mean": 9.0, "reward/std": 0.4, "lr": 4e-6},
             {"step": 3, "reward/mean": 0.9, "reward/std": 0.3, "lr": 3e-6},
             {"step": 4, "reward/mean": 1.1, "reward/std": 0.4, "lr": 4e-6, "flag": True},
             {"step": 4, "eval/f1": 0.30, "eval/precision": 0.35}]
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 5, "rew')


def _write_report(path: Path, per_type: dict[str, float], micro: float) -> None:
    report = {"f1": micro, "precision": micro, "recall": micro,
              "per_type": {t: {"precision": f, "recall": f, "f1": f, "support": 3, "n_pred": 3, "tp": 1}
                           for t, f in per_type.items()}}
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"config": {}, "results": {"conll2003": {"report": report, "format_ok": 1.0}}}))


def test_read_metrics_keeps_the_last_line_of_each_step(tmp_path, plot_run):
    _write_run(tmp_path / "run")
    m = plot_run.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert m["reward/mean"] == [(1, 0.5), (2, 0.7), (3, 0.9), (4, 1.1)]
    assert m["reward/std"] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.4)]
    assert m["eval/f1"] == [(0, 0.20), (4, 0.30)]
    assert m["eval/precision"] == [(0, 0.25), (4, 0.35)]
    assert set(m) == {"reward/mean", "reward/std", "lr", "eval/f1", "eval/precision"}  # no bool "flag"
    assert plot_run.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_read_report(tmp_path, plot_run):
    path = tmp_path / "sft" / "report.json"
    _write_report(path, {"location": 0.5, "person": 0.25}, 0.4)
    assert plot_run.read_report(path) == ("conll2003", {"location": 0.5, "person": 0.25, "micro": 0.4})
    with pytest.raises(ValueError, match="no dataset 'crossner_ai'"):
        plot_run.read_report(path, "crossner_ai")


def test_dev_f1_falls_back_to_tensorboard(tmp_path, plot_run):
    """RunLogger sends eval/* to TensorBoard only; a resumed run's second event file wins for a repeated step."""
    from torch.utils.tensorboard import SummaryWriter

    for values in ({0: 0.1, 10: 0.2}, {10: 0.4, 20: 0.5}):
        writer = SummaryWriter(str(tmp_path / "tb"))
        for step, v in values.items():
            writer.add_scalar("eval/f1", v, step)
            writer.add_scalar("reward/mean", 1.0, step)
        writer.close()
    series = plot_run.read_tensorboard(tmp_path / "tb")
    assert list(series) == ["eval/f1"]
    assert series["eval/f1"] == [(0, pytest.approx(0.1)), (10, pytest.approx(0.4)), (20, pytest.approx(0.5))]


def _run_script(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "scripts/plot_run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000


def test_script_writes_a_png(tmp_path):
    _write_run(tmp_path / "run")
    _write_report(tmp_path / "base" / "report.json", {"location": 0.0, "person": 0.0}, 0.0)
    _write_report(tmp_path / "sft" / "report.json", {"location": 0.5, "person": 0.25}, 0.4)
    out = tmp_path / "docs" / "main_job.png"
    proc = _run_script("--grpo_run", str(tmp_path / "run"), "--report", f"base={tmp_path / 'base' / 'report.json'}",
                       "--report", f"sft={tmp_path / 'sft' / 'report.json'}", "--out", str(out))
    _assert_png(out)
    assert "note:" not in proc.stdout


def test_missing_inputs_are_notes_not_crashes(tmp_path):
    out = tmp_path / "empty.png"
    proc = _run_script("--grpo_run", str(tmp_path / "no_run"), "--report", f"grpo={tmp_path / 'none.json'}",
                       "--out", str(out))
    _assert_png(out)
    assert "note: skipped: no" in proc.stdout and "note: skipped report grpo" in proc.stdout
