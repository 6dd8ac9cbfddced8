"""One out_dir, one run (grpo.run_dir): through the real trainer entry points on the tiny task, in process.

A new run refuses an out_dir that holds a run unless --overwrite (which moves it aside); --resume auto skips a
damaged newest checkpoint, naming the bad file, and lands exactly where the uninterrupted run was; a resume refuses
a changed config (listing the differences) unless --allow_config_change, which then really uses the new values;
a resumed step is logged once in metrics.jsonl, samples.jsonl and TensorBoard.
"""
from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo.checkpoint import list_checkpoints, verify_checkpoint
from grpo.config import ConfigError
from grpo.optim import lr_multiplier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import tiny_grpo_run  # noqa: E402

# The base run every test copies: 6 steps, checkpoints at 2, 4 and 6 (lr 1e-2, cosine, no warmup: tiny_grpo_run).
BASE = ["--total_steps", "6", "--save_every", "2", "--keep_last", "3"]


def grpo(out: Path, *args: str) -> None:
    tiny_grpo_run.main(["--out_dir", str(out), *args])


def logged_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def tensorboard_steps(tb_dir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def snapshot(out: Path) -> dict[str, int]:
    """Every file under ``out`` with its size: what a refused start must leave exactly as it was."""
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    grpo(out, *BASE)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-0000002", "checkpoint-0000004",
                                                       "checkpoint-0000006"]
    return out


@pytest.fixture
def run_copy(base_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    (out / "history-rank0.json").unlink()  # the test script appends to it; each test reads only its own steps
    return out


def test_new_run_refuses_an_out_dir_holding_a_run_and_overwrite_moves_it_aside(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(ConfigError) as refused:
        grpo(run_copy, "--total_steps", "3", "--save_every", "1")
    message = str(refused.value)
    for expected in ("already holds a training run", "checkpoint-0000006", "config.yaml", "--resume auto",
                     "--overwrite"):
        assert expected in message, message
    assert snapshot(run_copy) == before  # refused before writing anything

    grpo(run_copy, "--total_steps", "3", "--save_every", "1", "--keep_last", "3", "--overwrite")
    # Only the new run is left in out_dir (before the fix, rotation deleted the new step-3 checkpoint at once
    # because the old run's steps were higher, and metrics.jsonl mixed both runs).
    assert [p.name for p in list_checkpoints(run_copy)] == ["checkpoint-0000001", "checkpoint-0000002",
                                                            "checkpoint-0000003"]
    assert logged_steps(run_copy / "metrics.jsonl") == [1, 2, 3]
    from grpo.models import resolve_model_path

    assert resolve_model_path(str(run_copy)) == str(run_copy / "checkpoint-0000003")
    # The old run is moved, whole, next to it.
    (old,) = run_copy.parent.glob("run.old-*")
    assert snapshot(old) == before


@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.pt", "trainer_state.json", "rng_state_rank0.pt",
                                    "flipped byte"])
def test_resume_auto_skips_a_damaged_newest_checkpoint(base_run, run_copy, damage, capsys):
    newest = run_copy / "checkpoint-0000006"
    if damage == "flipped byte":  # same size, other contents: only the checksum sees it
        bad = newest / "model.safetensors"
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0xFF
        bad.write_bytes(bytes(data))
    else:
        bad = newest / damage
        bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    assert verify_checkpoint(newest) is not None

    grpo(run_copy, *BASE, "--resume", "auto")
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {newest}" in err and str(bad) in err, err
    history = json.loads((run_copy / "history-rank0.json").read_text())
    assert [h["step"] for h in history] == [5, 6]  # resumed from step 4, the newest valid checkpoint
    assert (run_copy / "checkpoint-0000006.damaged").is_dir()  # kept for inspection, out of the rotation
    assert verify_checkpoint(run_copy / "checkpoint-0000006") is None
    # Steps 5-6 re-run from checkpoint 4 reproduce the uninterrupted run's step-6 weights.
    redone = load_file(run_copy / "checkpoint-0000006" / "model.safetensors")
    original = load_file(base_run / "checkpoint-0000006" / "model.safetensors")
    for name, tensor in original.items():
        torch.testing.assert_close(redone[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_resume_auto_refuses_when_every_checkpoint_is_damaged(run_copy):
    for checkpoint in list_checkpoints(run_copy):
        (checkpoint / "optimizer.pt").write_bytes(b"")
    before = snapshot(run_copy)
    with pytest.raises(ConfigError, match="every checkpoint is damaged") as refused:
        grpo(run_copy, *BASE, "--resume", "auto")
    assert str(run_copy / "checkpoint-0000002" / "optimizer.pt") in str(refused.value)
    assert snapshot(run_copy) == before


def test_resume_refuses_a_changed_config_unless_allowed_and_then_uses_it(run_copy):
    before = snapshot(run_copy)
    with pytest.raises(ConfigError) as refused:
        grpo(run_copy, "--total_steps", "8", "--save_every", "2", "--resume", "auto", "--lr", "0.5", "--seed", "7")
    message = str(refused.value)
    for line in ("lr: 0.01 -> 0.5", "seed: 0 -> 7", "total_steps: 6 -> 8", "--allow_config_change"):
        assert line in message, message
    assert "save_every" not in message  # bookkeeping fields may change on resume
    assert snapshot(run_copy) == before

    grpo(run_copy, "--total_steps", "8", "--save_every", "1", "--keep_last", "9", "--resume", "auto", "--lr", "0.02",
         "--allow_config_change")
    (record,) = [json.loads(line) for line in (run_copy / "config_changes.jsonl").read_text().splitlines()]
    assert record["step"] == 6
    assert record["changes"] == {"total_steps": {"saved": 6, "now": 8}, "lr": {"saved": 0.01, "now": 0.02}}
    assert "lr: 0.02" in (run_copy / "config.yaml").read_text()
    # The logged lr (after each step's update) follows the NEW peak on the NEW 8-step cosine: without re-applying
    # it, the optimizer would keep the restored peak 0.01 (half these values).
    metrics = {m["step"]: m for m in map(json.loads, (run_copy / "metrics.jsonl").read_text().splitlines())}
    for step in (7, 8):
        assert metrics[step]["lr"] == pytest.approx(0.02 * lr_multiplier(step, 8, 0, "cosine", 0.0), abs=1e-12)
    assert logged_steps(run_copy / "metrics.jsonl") == list(range(1, 9))


def test_resumed_steps_are_logged_once(run_copy):
    # A crash after logging steps 5 and 6 but before the step-6 checkpoint: they are logged again on resume.
    shutil.rmtree(run_copy / "checkpoint-0000006")
    grpo(run_copy, *BASE, "--resume", "auto")
    assert logged_steps(run_copy / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert Counter(logged_steps(run_copy / "samples.jsonl")) == {s: 2 for s in range(1, 7)}  # sample_log_count 2
    assert tensorboard_steps(run_copy / "tb", "reward/mean") == [1, 2, 3, 4, 5, 6]


def test_resume_auto_restarts_a_run_that_died_before_its_first_checkpoint(run_copy):
    for checkpoint in list_checkpoints(run_copy):
        shutil.rmtree(checkpoint)
    with pytest.raises(ConfigError, match="stopped before its first checkpoint"):
        grpo(run_copy, *BASE, "--resume", "auto", "--lr", "0.5")  # another run's config: not this run's restart
    grpo(run_copy, *BASE, "--resume", "auto")
    assert logged_steps(run_copy / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
    assert tensorboard_steps(run_copy / "tb", "reward/mean") == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_path_refuses_later_checkpoints_in_out_dir(run_copy):
    with pytest.raises(ConfigError, match="checkpoint-0000006"):
        grpo(run_copy, *BASE, "--resume", str(run_copy / "checkpoint-0000004"))
    (run_copy / "checkpoint-0000004" / "scheduler.pt").write_bytes(b"x")
    with pytest.raises(ConfigError, match="scheduler.pt: 1 bytes"):
        grpo(run_copy, *BASE, "--resume", str(run_copy / "checkpoint-0000004"))


def test_save_every_zero_saves_only_the_final_step_and_keep_last_zero_is_refused(tmp_path):
    grpo(tmp_path / "run", "--total_steps", "3", "--save_every", "0")
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-0000003"]
    from grpo.config import parse_config
    from grpo.grpo_config import GRPOConfig
    from grpo.sft import SFTConfig

    for cls, extra in ((GRPOConfig, ["--reward_weights", "r=1"]), (SFTConfig, ["--data", "x.jsonl"])):
        with pytest.raises(ConfigError, match="keep_last=0 must be ≥ 1"):
            parse_config(cls, extra + ["--keep_last", "0"])
        with pytest.raises(ConfigError, match="overwrite starts a new run"):
            parse_config(cls, extra + ["--resume", "auto", "--overwrite"])
    with pytest.raises(ConfigError, match="save_every=-1"):
        parse_config(GRPOConfig, ["--reward_weights", "r=1", "--save_every", "-1"])


@pytest.mark.parametrize("script", ["train_grpo", "train_sft"])
def test_scripts_refuse_a_reused_out_dir_before_loading_the_model(tmp_path, script):
    import importlib

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")
    main = importlib.import_module(script).main
    # The model folder passes the path check but holds no model: had it been loaded first, the error would be
    # about the model.
    model = tmp_path / "not-a-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "x.jsonl"
    data.write_text("")
    with pytest.raises(ConfigError, match="already holds a training run"):
        main(["--model", str(model), "--out_dir", str(out), "--data", str(data)]
             if script == "train_sft" else ["--model", str(model), "--out_dir", str(out), "--reward_weights", "f1=1"])


# ----------------------------------------------------------------------------- SFT: the same rules in grpo.sft

def _sft(out: Path, tokenizer, **overrides):
    from test_sft import CPU, _pairs, _tiny_smol

    from grpo.sft import SFTConfig, tokenize_pairs, train_sft

    cfg = dict(data="unused", out_dir=str(out), max_steps=4, save_every=2, keep_last=3, batch_size=2, lr=1e-2,
               warmup_ratio=0.0, lr_scheduler="cosine", max_len=64)
    cfg.update(overrides)
    rows, _ = tokenize_pairs(tokenizer, _pairs(), max_len=64)
    return train_sft(SFTConfig(**cfg), _tiny_smol(), tokenizer, rows, CPU)


def test_sft_refuses_reuse_skips_damage_refuses_config_change_and_logs_once(tmp_path, smollm2_tokenizer, capsys):
    base = tmp_path / "base"
    _sft(base, smollm2_tokenizer)
    with pytest.raises(ConfigError, match="already holds a training run"):
        _sft(base, smollm2_tokenizer, max_steps=2)
    with pytest.raises(ConfigError, match="lr: 0.01 -> 0.5"):
        _sft(base, smollm2_tokenizer, resume="auto", lr=0.5)

    run = tmp_path / "run"
    shutil.copytree(base, run)
    bad = run / "checkpoint-0000004" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])
    state = _sft(run, smollm2_tokenizer, resume="auto")
    assert state["step"] == 4 and str(bad) in capsys.readouterr().err
    redone = load_file(run / "checkpoint-0000004" / "model.safetensors")
    for name, tensor in load_file(base / "checkpoint-0000004" / "model.safetensors").items():
        torch.testing.assert_close(redone[name], tensor, rtol=0, atol=1e-6, msg=name)
    assert tensorboard_steps(run / "tb", "sft/loss") == [1, 2, 3, 4]  # steps 3-4 of the first run are purged


def test_checkpoints_saved_before_manifests_still_resume_and_are_compared(run_copy):
    """Older GRPO checkpoints: no MANIFEST.json, no config.yaml, the config as a YAML string in trainer_state.json."""
    import yaml

    for checkpoint in list_checkpoints(run_copy):
        (checkpoint / "MANIFEST.json").unlink()
        config = yaml.safe_load((checkpoint / "config.yaml").read_text())
        (checkpoint / "config.yaml").unlink()
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        state["config"] = yaml.safe_dump(config)
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="lr: 0.01 -> 0.5"):
        grpo(run_copy, *BASE, "--resume", "auto", "--lr", "0.5")
    shutil.rmtree(run_copy / "checkpoint-0000006")
    grpo(run_copy, *BASE, "--resume", "auto")
    assert logged_steps(run_copy / "metrics.jsonl") == [1, 2, 3, 4, 5, 6]
