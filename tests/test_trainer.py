"""The GRPO loop end to end on a tiny real task (character-level chat tokenizer, random tiny llama):
it learns, it resumes after SIGKILL exactly where an uninterrupted run would be, it stops cleanly on SIGTERM,
and one update on 2 torchrun ranks equals the same update in one process."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "tiny_grpo_run.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
sys.path.insert(0, str(ROOT / "tests" / "dist_scripts"))  # grpo_update.global_rollouts: the fixed rollout batch
sys.path.insert(0, str(ROOT / "tests"))  # tiny_grpo_run, run in-process


def run(out: Path, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(RUN), "--out_dir", str(out), *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def history(out: Path) -> list[dict]:
    return json.loads((out / "history-rank0.json").read_text())


def test_reward_rises_to_the_known_optimum(tmp_path):
    # Reward = fraction of lowercase letters; a uniform policy over the 102-token vocabulary scores ~26/102 ≈ 0.25
    # and the optimum is 1.0. Measured: first-5 mean 0.31, last-5 mean 0.93 over 40 steps (lr 1e-2).
    run(tmp_path, "--total_steps", "40", "--save_every", "100")
    rewards = [h["reward/mean"] for h in history(tmp_path)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.45, rewards
    assert last > 0.75 and last - first > 0.3, rewards


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path):
    steps = ["--total_steps", "8", "--save_every", "2", "--keep_last", "10"]
    run(tmp_path / "straight", *steps)
    reference = {h["step"]: h for h in history(tmp_path / "straight")}

    killed = tmp_path / "killed"
    # Slow each step down (longer completions) so the kill lands between checkpoints, mid-run.
    proc = subprocess.Popen([sys.executable, str(RUN), "--out_dir", str(killed), *steps], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint-0000004").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its step-4 checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "history-rank0.json").exists()  # it really died before finishing

    run(killed, *steps, "--resume", "auto")
    resumed = history(killed)
    first_resumed = resumed[0]["step"]
    assert 5 <= first_resumed <= 8 and resumed[-1]["step"] == 8
    for h in resumed:
        ref = reference[h["step"]]
        for key in ("reward/mean", "train/loss", "train/grad_norm", "completion/len_mean", "lr"):
            assert h[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (h["step"], key)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen([sys.executable, str(RUN), "--out_dir", str(tmp_path), "--total_steps", "400",
                             "--save_every", "1000"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not (tmp_path / "samples.jsonl").exists() or not (tmp_path / "samples.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    checkpoints = sorted(tmp_path.glob("checkpoint-*"))
    assert len(checkpoints) == 1
    step = int(checkpoints[0].name.split("-")[1])
    assert 1 <= step < 400 and history(tmp_path)[-1]["step"] == step


# "mixed": rank 0 repeats prompts and has a micro-batch of 1-token completions, rank 1 does not (no hang, same update).
# "masked": rows 4–6 have no loss tokens, so rank 1 runs one live row and pads with a masked forward (no hang).
@pytest.mark.parametrize("loss_agg,shared", [("token_mean", ""), ("seq_mean", "shared"), ("constant", "mixed"),
                                             ("token_mean", "masked")])
def test_two_rank_update_equals_one_process_update(tmp_path, loss_agg, shared):
    script = ROOT / "tests" / "dist_scripts" / "grpo_update.py"
    extra = [shared] if shared else []
    single = subprocess.run([sys.executable, str(script), str(tmp_path), loss_agg, *extra], env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(script), str(tmp_path), loss_agg, *extra], env=ENV, capture_output=True, text=True,
                           timeout=240)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = torch.load(tmp_path / "world1.pt"), torch.load(tmp_path / "world2.pt")
    # The gradient norm is scale-sensitive (Adam's first step is not), so it catches a wrong cross-rank reduction.
    assert two["metrics"]["grad_norm"] == pytest.approx(one["metrics"]["grad_norm"], rel=1e-5)
    assert two["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-5, abs=1e-7)
    for name, tensor in one["state"].items():
        torch.testing.assert_close(two["state"][name], tensor, atol=1e-6, rtol=0, msg=name)


def one_process_update_setup(scheduled_updates: int, **fields):
    """The fixed 8-rollout batch of tests/dist_scripts/grpo_update.py and a tiny policy with its AdamW and constant
    schedule, in one process: (cfg, policy, optimizer, scheduler, batch, advantages, info)."""
    from grpo_update import global_rollouts

    from grpo.batch import collate_rollouts
    from grpo.distributed import DistInfo
    from grpo.grpo_config import GRPOConfig
    from grpo.models import tiny_llama
    from grpo.optim import build_optimizer, build_scheduler

    cfg = GRPOConfig(reward_weights={"r": 1.0}, prompts_per_step=2, group_size=4, micro_batch_size=4, beta=0.0,
                     max_completion_len=8, lr=1e-2, **fields)
    policy = tiny_llama(vocab_size=128, hidden=32, layers=2, heads=2, seed=3)
    optimizer = build_optimizer(policy, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    scheduler = build_scheduler(optimizer, scheduled_updates, 0.0, "constant")
    prompts, completions, old, advantages = global_rollouts()
    batch = collate_rollouts(prompts, completions, old, pad_id=0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return cfg, policy, optimizer, scheduler, batch, advantages, info


def test_non_finite_gradient_skips_the_update_and_keeps_the_weights():
    from grpo.trainer import policy_update

    cfg, policy, optimizer, scheduler, batch, advantages, info = one_process_update_setup(2)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    poisoned = policy.model.layers[0].mlp.up_proj.weight
    handle = poisoned.register_hook(lambda g: torch.full_like(g, float("nan")))
    metrics = policy_update(policy, optimizer, scheduler, batch, advantages, batch.completion_mask, None, None,
                            cfg, info)
    handle.remove()
    assert metrics["skipped_updates"] == 1.0
    for n, p in policy.named_parameters():
        assert torch.equal(p, before[n]), n
    assert all(p.grad is None for p in policy.parameters())  # nothing left over to leak into the next update
    metrics = policy_update(policy, optimizer, scheduler, batch, advantages, batch.completion_mask, None, None,
                            cfg, info)  # and the next, healthy update does move the weights
    assert metrics["skipped_updates"] == 0.0 and not torch.equal(poisoned, before["model.layers.0.mlp.up_proj.weight"])
    # Same weights as the engine that sampled them, so the on-policy log-prob gap is just the rollouts' fake values.
    assert metrics["engine_logprob_gap"] > 0


def test_mini_batch_without_loss_tokens_leaves_weights_and_adam_state_untouched():
    """Every row masked (all groups zero-variance, or all truncated): no update at all — AdamW with weight decay
    would otherwise shrink every weight and start its moments from a zero gradient. The schedule still advances."""
    from grpo.optim import build_optimizer, build_scheduler
    from grpo.trainer import policy_update

    cfg, policy, optimizer, scheduler, batch, advantages, info = one_process_update_setup(
        4, weight_decay=0.1, num_mini_batches=2)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    metrics = policy_update(policy, optimizer, scheduler, batch, advantages, torch.zeros_like(batch.completion_mask),
                            None, None, cfg, info)
    assert metrics == {"skipped_updates": 1.0}  # two mini-batches, both skipped; no loss or grad_norm invented
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert not optimizer.state and scheduler.last_epoch == 2
    # One group masked: of the two mini-batches (one whole group each) one is skipped, and grad_norm is the other
    # update's norm — measured here alone, on a copy of the policy — not its average with a skipped update's.
    mask = batch.completion_mask.clone()
    mask[:4] = 0
    alone = copy.deepcopy(policy)
    alone_optimizer = build_optimizer(alone, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    alone_cfg = dataclasses.replace(cfg, num_mini_batches=1, prompts_per_step=1)
    rows = torch.arange(4, 8)
    expected = policy_update(alone, alone_optimizer, build_scheduler(alone_optimizer, 4, 0.0, "constant"),
                             batch.select(rows), advantages[rows], mask[rows], None, None, alone_cfg, info)
    metrics = policy_update(policy, optimizer, scheduler, batch, advantages, mask, None, None, cfg, info)
    assert metrics["skipped_updates"] == 0.5
    assert metrics["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-6) and expected["grad_norm"] > 0


def test_rows_without_loss_tokens_are_not_run_and_leave_the_update_unchanged():
    """A zero-variance group (all-zero loss mask) adds exactly 0 to the loss, so its forwards are skipped: the
    update, and the forwards it runs, are those of the live rows alone (same mask-derived normaliser)."""
    from grpo.optim import build_optimizer, build_scheduler
    from grpo.trainer import policy_update

    cfg, policy, optimizer, scheduler, batch, advantages, info = one_process_update_setup(1)
    mask = batch.completion_mask.clone()
    mask[:4] = 0  # group 0 of the two
    alone = copy.deepcopy(policy)
    alone_optimizer = build_optimizer(alone, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    rows = torch.arange(4, 8)
    calls = {"full": 0, "alone": 0}
    hooks = [m.lm_head.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
             for m, key in ((policy, "full"), (alone, "alone"))]
    metrics = policy_update(policy, optimizer, scheduler, batch, advantages, mask, None, None, cfg, info)
    expected = policy_update(alone, alone_optimizer, build_scheduler(alone_optimizer, 1, 0.0, "constant"),
                             batch.select(rows), advantages[rows], mask[rows], None, None,
                             dataclasses.replace(cfg, prompts_per_step=1), info)
    for h in hooks:
        h.remove()
    assert calls["full"] == calls["alone"] >= 1
    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    for (name, a), b in zip(alone.named_parameters(), policy.parameters()):
        torch.testing.assert_close(b, a, atol=1e-7, rtol=0, msg=name)


def test_mini_batch_order_changes_with_the_step_and_keeps_groups_whole():
    from grpo.grpo_config import GRPOConfig
    from grpo.trainer import mini_batch_order

    cfg = GRPOConfig(reward_weights={"r": 1.0}, prompts_per_step=4, group_size=4, num_mini_batches=2)
    orders = [mini_batch_order(16, cfg, step, 0).tolist() for step in range(3)]
    assert len({tuple(o) for o in orders}) == 3  # a new shuffle every step (not the same one every step)
    assert orders[1] == mini_batch_order(16, cfg, 1, 0).tolist()  # reproducible: a resumed run draws the same
    for order in orders:
        assert sorted(order) == list(range(16))
        assert all(order[i] // 4 == order[i + 1] // 4 for i in range(0, 16, 4) for i in (i, i + 1, i + 2))


def test_a_stop_signal_between_two_polls_still_saves(tmp_path, monkeypatch):
    """SIGTERM is polled once per step: had the save condition and the exit condition each polled, a signal landing
    between the two would end the run with no checkpoint of its last steps (here: none at all)."""
    import tiny_grpo_run

    import grpo.trainer

    polls = []

    def install():
        def stop_requested() -> bool:
            polls.append(len(polls))
            return len(polls) >= 2  # the signal arrives right after the first poll
        return stop_requested

    monkeypatch.setattr(grpo.trainer, "install_sigterm_handler", install)
    tiny_grpo_run.main(["--out_dir", str(tmp_path), "--total_steps", "5", "--save_every", "100"])
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-0000002"]
    assert [h["step"] for h in history(tmp_path)] == [1, 2]
