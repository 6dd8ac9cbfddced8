from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from grpo.checkpoint import (COMPLETE, CheckpointError, latest_checkpoint,
                             list_checkpoints, load_checkpoint, newest_valid_checkpoint, save_checkpoint,
                             verify_checkpoint)
from grpo.graceful_exit import GracefulExit, install_sigterm_handler
from grpo.config import parse_config
from grpo.distributed import clip_grad_norm
from grpo.models import tiny_llama
from grpo.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunConfig:
    lr: float = 1e-3
    name: str = "demo"


def make_run(seed: int = 0):
    model = tiny_llama(layers=1, seed=seed)
    optimizer = build_optimizer(model, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_ratio=0.2)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler) -> None:
    batch = torch.randint(0, 256, (2, 8))  # drawn from the global torch RNG, so RNG restore matters
    model(input_ids=batch, labels=batch).loss.backward()
    clip_grad_norm(model.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def draw_randoms() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def adam_state(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.clone() for k, v in optimizer.state[p].items()} for n, p in model.named_parameters()}


def test_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    torch.manual_seed(1)
    model, optimizer, scheduler = make_run(seed=0)
    for _ in range(3):
        train_step(model, optimizer, scheduler)
    saved_weights, saved_adam = params(model), adam_state(model, optimizer)
    saved_lr = optimizer.param_groups[0]["lr"]
    path = save_checkpoint(tmp_path, 3, model, None, optimizer, scheduler, {"epoch": 1, "position": 17},
                           config=RunConfig(lr=5e-6))
    after_save = draw_randoms()
    train_step(model, optimizer, scheduler)  # the step 4 an uninterrupted run would take
    continued = params(model)

    torch.manual_seed(99)  # a fresh process: other weights, empty optimizer, other RNG position
    random.seed(99)
    np.random.seed(99)
    model2, optimizer2, scheduler2 = make_run(seed=5)
    state = load_checkpoint(path, model2, optimizer2, scheduler2)

    assert state == {"step": 3, "world_size": 1, "epoch": 1, "position": 17, "config": {"lr": 5e-6, "name": "demo"}}
    for name, value in params(model2).items():
        assert torch.equal(value, saved_weights[name]), name
    restored_adam = adam_state(model2, optimizer2)
    for name, tensors in saved_adam.items():
        for key, value in tensors.items():
            assert torch.equal(restored_adam[name][key], value), (name, key)
    assert optimizer2.param_groups[0]["lr"] == saved_lr and scheduler2.last_epoch == 3
    assert [g["weight_decay"] for g in optimizer2.param_groups] == [0.1, 0.0]
    assert draw_randoms() == after_save  # python, numpy and torch streams continue where they were saved
    train_step(model2, optimizer2, scheduler2)
    for name, value in params(model2).items():  # same batch (RNG), same Adam moments, same lr => same step
        assert torch.equal(value, continued[name]), name
    assert parse_config(RunConfig, ["--config", str(path / "config.yaml")]) == RunConfig(lr=5e-6)


def test_checkpoint_is_a_hugging_face_model_folder(tmp_path, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, optimizer, scheduler = make_run()
    train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 1, model, smollm2_tokenizer, optimizer, scheduler, {})
    loaded = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # the tie survives the round trip
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("hello world").input_ids == smollm2_tokenizer("hello world").input_ids


def test_keep_last_and_resave_same_step(tmp_path):
    model, optimizer, scheduler = make_run()
    for step in range(1, 5):
        save_checkpoint(tmp_path, step, model, None, optimizer, scheduler, {"n": step}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000003", "checkpoint-0000004"]
    save_checkpoint(tmp_path, 4, model, None, optimizer, scheduler, {"n": 40}, keep_last=2)
    assert json.loads((tmp_path / "checkpoint-0000004" / "trainer_state.json").read_text())["n"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000003", "checkpoint-0000004"]
    save_checkpoint(tmp_path, 5, model, None, optimizer, scheduler, {}, keep_last=None)
    assert len(list_checkpoints(tmp_path)) == 3
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 6, model, None, optimizer, scheduler, {}, keep_last=0)


def test_rotation_never_deletes_a_higher_step(tmp_path):
    """Checkpoints of higher steps (another run's, or a damaged one set aside) are not this save's to rotate."""
    model, optimizer, scheduler = make_run()
    for step in (10, 20, 1, 2):  # by hand: {10} → {20} → {1, 20} → {2, 20}
        save_checkpoint(tmp_path, step, model, None, optimizer, scheduler, {}, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000020"]


def test_manifest_records_every_file_and_finds_damage(tmp_path):
    import hashlib

    model, optimizer, scheduler = make_run()
    path = save_checkpoint(tmp_path, 1, model, None, optimizer, scheduler, {})
    manifest = json.loads((path / "MANIFEST.json").read_text())["files"]
    on_disk = sorted(p.name for p in path.iterdir() if p.name not in ("MANIFEST.json", COMPLETE))
    assert sorted(manifest) == on_disk and "optimizer.pt" in on_disk
    for name, entry in manifest.items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert verify_checkpoint(path) is None and newest_valid_checkpoint(tmp_path) == (path, [])

    older = save_checkpoint(tmp_path, 0, model, None, optimizer, scheduler, {})
    (path / "scheduler.pt").unlink()
    assert "scheduler.pt: missing" in verify_checkpoint(path)
    assert newest_valid_checkpoint(tmp_path) == (older, [(path, verify_checkpoint(path))])


def test_checkpoint_without_manifest_is_accepted_and_a_bad_file_is_named_at_load(tmp_path):
    model, optimizer, scheduler = make_run()
    path = save_checkpoint(tmp_path, 1, model, None, optimizer, scheduler, {})
    (path / "MANIFEST.json").unlink()  # as saved before manifests existed
    assert verify_checkpoint(path) is None
    (path / "optimizer.pt").write_bytes((path / "optimizer.pt").read_bytes()[:50])
    with pytest.raises(CheckpointError, match=f"{path / 'optimizer.pt'}: cannot be read"):
        load_checkpoint(path, *make_run())
    (path / "trainer_state.json").write_text('{"step": ')
    assert "trainer_state.json: unreadable" in verify_checkpoint(path)


def test_incomplete_and_temp_folders_are_never_returned(tmp_path):
    model, optimizer, scheduler = make_run()
    good = save_checkpoint(tmp_path, 2, model, None, optimizer, scheduler, {})
    # A crash mid-save leaves a temp folder; a hand-copied folder may lack the marker. Both have higher steps.
    stale = tmp_path / ".tmp-checkpoint-0000009"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (stale / COMPLETE).write_text("9\n")  # even with a marker inside, a temp folder is not a checkpoint
    incomplete = tmp_path / "checkpoint-0000008"
    incomplete.mkdir()
    assert latest_checkpoint(tmp_path) == good
    assert not stale.exists() and incomplete.exists()  # temp folders are cleaned, real names left alone
    with pytest.raises(FileNotFoundError, match="no COMPLETE marker"):
        load_checkpoint(incomplete, model)
    assert latest_checkpoint(tmp_path / "missing") is None


def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path):
    script = ROOT / "tests" / "dist_scripts" / "crash_during_save.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (tmp_path / ".tmp-checkpoint-0000003" / "model.safetensors").is_file()  # died mid-save
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "checkpoint-0000002"
    assert not (tmp_path / ".tmp-checkpoint-0000003").exists()
    model, optimizer, scheduler = make_run()
    assert load_checkpoint(latest, model, optimizer, scheduler)["marker"] == 2
    assert torch.all(model.model.norm.weight == 2.0)  # the weights of step 2, not the half-written step 3


def test_failed_save_raises_and_keeps_previous_checkpoint(tmp_path):
    class FullDiskTokenizer:
        def save_pretrained(self, path) -> None:
            raise OSError(28, "No space left on device")

    model, optimizer, scheduler = make_run()
    good = save_checkpoint(tmp_path, 1, model, None, optimizer, scheduler, {})
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, 2, model, FullDiskTokenizer(), optimizer, scheduler, {}, keep_last=1)
    assert latest_checkpoint(tmp_path) == good and list_checkpoints(tmp_path) == [good]
    with pytest.raises(TypeError, match="JSON serializable"):  # rejected before anything is written
        save_checkpoint(tmp_path, 3, model, None, optimizer, scheduler, {"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000001"]


def test_graceful_exit_turns_sigterm_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulExit() as stop:
        assert not stop() and not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before kill() returns
        assert stop.requested and stop() and stop.should_stop()
    assert signal.getsignal(signal.SIGTERM) is previous
    flag = install_sigterm_handler()
    try:
        assert signal.getsignal(signal.SIGTERM) == flag._handle and not flag()
    finally:
        flag.restore()
    assert signal.getsignal(signal.SIGTERM) is previous


def test_clip_grad_norm_is_the_global_norm_and_flags_nan_and_inf():
    """The trainers skip an update when the returned norm is not finite, so it must be inf/nan iff a grad is."""
    model = tiny_llama(layers=1)
    assert clip_grad_norm(model.parameters(), 1.0) == 0.0  # no gradients yet
    batch = torch.randint(0, 256, (2, 8))

    def fresh_grads():
        model.zero_grad(set_to_none=True)
        model(input_ids=batch, labels=batch).loss.backward()
        return model.model.layers[0].mlp.up_proj.weight.grad

    fresh_grads()
    by_hand = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()) ** 0.5
    assert clip_grad_norm(model.parameters(), float("inf")) == pytest.approx(by_hand, rel=1e-5)
    for poison in (float("nan"), float("inf"), -float("inf")):
        fresh_grads()[3, 5] = poison
        assert not math.isfinite(clip_grad_norm(model.parameters(), 1.0))
