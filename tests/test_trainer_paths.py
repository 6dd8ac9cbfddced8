"""Every configuration path through the real GRPO loop (grpo.trainer.train), on the tiny character-level task:
dynamic sampling, the overlong penalty and the truncation mask, TIS/MIS, μ > 1 and several mini-batches, the KL in
the reward, batch-scaled advantages over 2 ranks, and ReasoningNER's combination stopped and resumed.

Each test runs `train` with a real tiny llama and the real TorchEngine (wrapped only to record what it sampled)
and checks what the trainer logged against a value derived here: rewards, penalties and advantages from the
recorded rollouts with the papers' formulas, and the first update's gradient norm from a second, row-by-row
implementation of the loss (tests/grpo_reference.py). `train/grad_norm` is the norm before clipping.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo.distributed import DistInfo
from grpo.engine import Rollout, TorchEngine
from grpo.grpo_config import GRPOConfig
from grpo.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from grpo_reference import (RecordingEngine, RecordingReward, hand_advantages, hand_overlong_penalty,  # noqa: E402
                            reference_grad_norm, row_logprobs)
from tiny_task import char_tokenizer, lowercase_reward, tiny_policy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
# A completion stops at its first vowel or digit (kept in the completion): p ≈ 15/102 per token, so lengths spread
# over 1..12 and some hit the limit, instead of nearly all running to max_completion_len.
STOP = list("aeiou0123456789")
TINY = dict(reward_weights={"r": 1.0}, beta=0.0, prompts_per_step=4, group_size=4, max_completion_len=12,
            micro_batch_size=8, lr=1e-2, max_grad_norm=1.0, warmup_ratio=0.0, total_steps=1, save_every=100,
            sample_log_count=0, engine="torch", stop=STOP)
# Prompts flagged "constant" get the same reward for every completion: their groups have zero variance.
PROMPTS = [{"messages": [{"role": "user", "content": text}], "constant": i % 2 == 1} for i, text in
           enumerate(["Write a word.", "Say hi!", "Type: abc", "Go on...", "42?", "Yes or no", "Tell me", "Hi"])]


def half_constant_reward(completions: list[str], samples: list[dict]) -> list[float]:
    return [0.5 if s["constant"] else r for s, r in zip(samples, lowercase_reward(completions, samples))]


def run_grpo(out_dir: Path, reward=lowercase_reward, ref_seed: int = 0, logprob_shift: float = 0.0, **fields):
    """`train` on the tiny task → (history, per-step rollouts, the reward's recorded calls, the trained policy)."""
    cfg = GRPOConfig(**{**TINY, **fields, "out_dir": str(out_dir)})
    tok, policy = char_tokenizer(), tiny_policy(seed=0)
    ref = tiny_policy(seed=ref_seed).eval().requires_grad_(False) if cfg.beta > 0 else None
    engine, recorded = RecordingEngine(TorchEngine(policy, tok), logprob_shift), RecordingReward(reward)
    history = train(cfg, policy, tok, PROMPTS, [("r", 1.0, recorded)], ONE_PROCESS, engine, ref_model=ref)
    return history, engine.steps, recorded.calls, policy


def lengths_of(rollouts) -> list[int]:
    return [len(r.completion_ids) for r in rollouts]


# ------------------------------------------------------------------------------------------------ dynamic sampling
@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean", "constant"])
def test_dynamic_sampling_drops_zero_variance_groups_from_the_gradient(tmp_path, loss_agg):
    """Groups of a constant-reward prompt are dropped: the first update's gradient is that of the other groups
    alone, with token_mean / seq_mean normalised by the kept tokens / rows and Dr. GRPO's constant by EVERY row."""
    history, (rollouts,), (call,), _ = run_grpo(tmp_path, half_constant_reward, dynamic_sampling=True,
                                                loss_agg=loss_agg)
    constant_groups = [s["constant"] for s in call["samples"][::4]]
    assert 0 < sum(constant_groups) < 4, "the step must mix constant and varying prompts for this test to bite"
    assert history[0]["frac_reward_zero_std"] == sum(constant_groups) / 4

    keep = [not s["constant"] for s in call["samples"]]
    advantages = hand_advantages(call["values"], 4, "group")
    expected = reference_grad_norm(tiny_policy(seed=0), rollouts, advantages, keep, loss_agg, 12)
    assert history[0]["train/grad_norm"] == pytest.approx(expected, rel=1e-4)
    # The normaliser is what dynamic sampling changes; had it counted every row, the norm would differ this much.
    every_row = reference_grad_norm(tiny_policy(seed=0), rollouts, advantages, [True] * 16, loss_agg, 12)
    if loss_agg == "constant":
        assert every_row == pytest.approx(expected, rel=1e-6)
    else:
        assert abs(every_row - expected) > 0.05 * expected


# ------------------------------------------------------------------------------------ overlong penalty, truncation
@pytest.mark.parametrize("mask_truncated", [True, False])
def test_overlong_penalty_and_truncation_mask(tmp_path, mask_truncated):
    """With a constant task reward the only signal is DAPO's overlong penalty: a completion's advantage is its
    penalty minus its group's mean penalty (Dr. GRPO scaling), so long ones are pushed down. The trainer's
    advantages are checked through the two things they drive: the on-policy token-mean loss −Σ A_i|o_i| / Σ|o_i|
    and the gradient Σ_i −A_i ∇log π(o_i) / Σ|o_i| (a wrong sign or size on any row changes its norm). With
    mask_truncated, completions cut at max_completion_len add nothing to the loss or its normaliser."""
    max_len, buffer, factor = 12, 6, 0.5
    history, (rollouts,), (call,), _ = run_grpo(
        tmp_path, lambda completions, samples: [1.0] * len(completions), overlong_buffer=buffer,
        overlong_penalty=factor, mask_truncated=mask_truncated, adv_scale="none", loss_agg="token_mean")
    lengths = lengths_of(rollouts)
    truncated = [r.finish_reason == "length" for r in rollouts]
    assert any(truncated) and not all(truncated)
    assert any(max_len - buffer < n < max_len for n in lengths), "no completion in the soft-penalty zone"
    penalties = [hand_overlong_penalty(n, max_len, buffer, factor) for n in lengths]
    assert history[0]["reward/mean"] == pytest.approx(1.0 + sum(penalties) / 16, rel=1e-6)
    assert history[0]["reward/r"] == 1.0  # the task reward is logged without the penalty

    # A_i = p_i − mean of its group's p: negative for the group's longer completions, positive for its shorter.
    advantages = hand_advantages([1.0 + p for p in penalties], 4, "none")
    assert sum(a != 0 for a in advantages) >= 4  # some groups carry a penalty signal
    keep = [not (mask_truncated and t) for t in truncated]
    # On-policy, ratio = 1: the token-mean loss is −Σ A_i |o_i| / Σ |o_i| over the kept rows.
    expected_loss = -sum(a * n for a, n, k in zip(advantages, lengths, keep) if k) / sum(
        n for n, k in zip(lengths, keep) if k)
    assert history[0]["train/loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)
    expected = reference_grad_norm(tiny_policy(seed=0), rollouts, advantages, keep, "token_mean", max_len)
    assert history[0]["train/grad_norm"] == pytest.approx(expected, rel=1e-4)
    if mask_truncated:  # and the truncated rows do carry a gradient of their own, which the mask removed
        unmasked = reference_grad_norm(tiny_policy(seed=0), rollouts, advantages, [True] * 16, "token_mean", max_len)
        assert abs(unmasked - expected) > 0.05 * expected


# --------------------------------------------------------------------------------------------- π_old from the engine
def test_engine_logprobs_as_old_logprobs_train_as_the_recomputed_ones(tmp_path):
    """old_logprobs=rollout skips the π_old forward: with the torch engine in float32 its sampling log-probs are
    the trainer's own, so two off-policy steps (2 mini-batches each) end on the same weights as with π_old
    recomputed, and the engine gap is still reported, from the first update where the policy is still π_old."""
    off_policy = dict(num_mini_batches=2, total_steps=2, lr=3e-2)
    recomputed, _, _, p_recomputed = run_grpo(tmp_path / "recompute", **off_policy)
    from_engine, _, _, p_engine = run_grpo(tmp_path / "rollout", old_logprobs="rollout", **off_policy)
    assert "engine_logprob_gap/mean" in recomputed[0] and "engine_logprob_gap/mean" not in from_engine[0]
    assert from_engine[0]["train/engine_logprob_gap"] < 1e-5
    assert recomputed[1]["train/ratio_max"] != pytest.approx(1.0, abs=1e-3)  # the second update is off-policy
    for h_r, h_e in zip(recomputed, from_engine):
        assert h_e["train/loss"] == pytest.approx(h_r["train/loss"], rel=1e-4, abs=1e-6)
        assert h_e["train/ratio_max"] == pytest.approx(h_r["train/ratio_max"], rel=1e-4)
    for (name, a), b in zip(p_recomputed.named_parameters(), p_engine.parameters()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=name)


def test_engine_logprobs_cannot_be_corrected_against_themselves():
    with pytest.raises(Exception, match="old_logprobs=rollout"):
        GRPOConfig(**TINY, old_logprobs="rollout", rollout_correction="token").validate()


# ------------------------------------------------------------------------------------------------------- TIS / MIS
def test_tis_weights_are_one_on_policy_and_fixed_across_epochs(tmp_path):
    """μ = 1, one mini-batch: π_old is the very policy being differentiated (ratio exactly 1, nothing clipped), and
    the TIS weight π_old/π_rollout is 1 up to the engine's float noise. μ = 2: the second epoch's ratio moves off 1,
    but the TIS weights do not: they compare π_old with the engine, both fixed for the step."""
    common = dict(rollout_correction="token", rollout_correction_mode="truncate", rollout_correction_threshold=2.0)
    (one,), _, _, _ = run_grpo(tmp_path / "mu1", **common)
    assert one["train/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert one["train/ratio_max"] == pytest.approx(1.0, abs=1e-6)
    assert one["train/clip_frac"] == 0.0
    # The TIS log-ratio is the engine gap the trainer logs beside it: both are token means of |π_old − π_rollout|.
    gap = one["engine_logprob_gap/max"]
    assert gap < 1e-4
    assert one["train/correction/logp_gap_abs_mean"] == pytest.approx(one["engine_logprob_gap/mean"], rel=1e-5)
    assert one["train/correction/weight_mean"] == pytest.approx(1.0, abs=gap * 1.01 + 1e-9)
    assert one["train/correction/frac_corrected"] == 0.0

    (two,), _, _, _ = run_grpo(tmp_path / "mu2", mu=2, **common)
    # Averaged over the two updates: the first has ratio 1 everywhere, so the second's must have left it.
    # approx_kl is the mean of old_logp - logp (k1): non-zero once the policy moved, of either sign.
    assert two["train/ratio_max"] > 1.05 and two["train/clip_frac"] > 0 and abs(two["train/approx_kl"]) > 1e-4
    for key in ("weight_mean", "logp_gap_abs_mean", "kl_k3"):
        assert two[f"train/correction/{key}"] == pytest.approx(one[f"train/correction/{key}"], rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("level,mode,ratio", [("token", "truncate", 3.0), ("token", "mask", 3.0),
                                              ("token", "truncate", 1.5), ("sequence", "truncate", 1.5)])
def test_rollout_correction_weights_scale_the_gradient(tmp_path, level, mode, ratio):
    """An engine whose log-probs are ln(ratio) below the trainer's: every token has ρ = π_old/π_rollout = ratio
    (a sequence: ratio^|o|). With C = 2, TIS weighs a token min(ρ, 2) and MIS ρ·1[1/2 ≤ ρ ≤ 2], so the first
    update's gradient is the uncorrected one scaled row by row by those weights."""
    history, (rollouts,), (call,), _ = run_grpo(
        tmp_path, logprob_shift=math.log(ratio), rollout_correction=level, rollout_correction_mode=mode,
        rollout_correction_threshold=2.0)
    rho = [ratio ** (len(r.completion_ids) if level == "sequence" else 1) for r in rollouts]
    weights = [min(p, 2.0) if mode == "truncate" else (p if 0.5 <= p <= 2.0 else 0.0) for p in rho]
    tokens = lengths_of(rollouts)
    per_token = [w for w, n in zip(weights, tokens) for _ in range(n)]
    metrics = history[0]
    assert metrics["train/correction/weight_mean"] == pytest.approx(sum(per_token) / len(per_token), rel=1e-5)
    if level == "token":  # (at sequence level the logged fraction is token-weighted over micro-batches: not checked)
        corrected = [p > 2.0 for p, n in zip(rho, tokens) for _ in range(n)]
        assert metrics["train/correction/frac_corrected"] == pytest.approx(sum(corrected) / len(corrected))
    advantages = hand_advantages(call["values"], 4, "group")
    expected = reference_grad_norm(tiny_policy(seed=0), rollouts, advantages, [True] * 16, "seq_mean", 12,
                                   row_weights=weights)
    assert metrics["train/grad_norm"] == pytest.approx(expected, rel=1e-4, abs=1e-9)


# ------------------------------------------------------------------------------------ μ > 1, several mini-batches
def test_shuffled_mini_batches_read_pi_old_and_rollout_logprobs_of_their_own_rows(tmp_path):
    """μ = 2 epochs × 2 mini-batches, each drawing its rows in a new shuffled order, with an lr so small that every
    update rounds away in fp32: the policy stays the step's π_old, so if each row's π_old and engine log-probs
    are that row's, every ratio is 1 and every TIS weight within the engine's float noise of 1."""
    (metrics,), _, _, _ = run_grpo(tmp_path, mu=2, num_mini_batches=2, micro_batch_size=4, lr=1e-12,
                                   weight_decay=0.0, rollout_correction="token")
    assert metrics["train/skipped_updates"] == 0.0
    assert metrics["train/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["train/clip_frac"] == 0.0
    assert metrics["train/correction/logp_gap_max"] < 1e-4
    assert metrics["train/correction/weight_mean"] == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------------------------------------- KL in the reward
def test_kl_in_reward_shapes_advantages_but_not_the_zero_variance_test(tmp_path):
    """r'_i = r_i − β Σ_t (log π_rollout − log π_ref): the logged reward is the task's, the penalty is logged beside
    it, the advantages are those of r', and a group whose TASK rewards are all equal is still dropped (the KL term
    differs between any two samples and would otherwise hide every group without task signal)."""
    beta = 0.5
    history, (rollouts,), (call,), _ = run_grpo(tmp_path, half_constant_reward, ref_seed=1, beta=beta,
                                                kl_in_reward=True, dynamic_sampling=True)
    metrics, task = history[0], call["values"]
    assert metrics["reward/mean"] == pytest.approx(sum(task) / 16, rel=1e-6)
    ref = tiny_policy(seed=1)
    with torch.no_grad():
        seq_kl = [float(sum(r.logprobs) - row_logprobs(ref, r.prompt_ids, r.completion_ids).sum()) for r in rollouts]
    assert metrics["reward/kl_penalty"] == pytest.approx(beta * sum(seq_kl) / 16, rel=1e-4)
    constant_groups = [s["constant"] for s in call["samples"][::4]]
    assert 0 < sum(constant_groups) < 4
    assert metrics["frac_reward_zero_std"] == sum(constant_groups) / 4
    advantages = hand_advantages([r - beta * k for r, k in zip(task, seq_kl)], 4, "group")
    keep = [not s["constant"] for s in call["samples"]]
    expected = reference_grad_norm(tiny_policy(seed=0), rollouts, advantages, keep, "seq_mean", 12)
    assert metrics["train/grad_norm"] == pytest.approx(expected, rel=1e-4)


# ------------------------------------------------------------------------------------ batch-scaled advantages, 2 ranks
def test_batch_scaled_advantages_on_two_ranks_use_every_ranks_rewards(tmp_path):
    """adv_scale: batch divides by the std of the WHOLE step's rewards, which live on two ranks: the first update's
    gradient is the reference gradient of all 16 rollouts with that global std (not each rank's own)."""
    fields = {**TINY, "adv_scale": "batch"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "tests" / "dist_scripts" / "recorded_grpo_run.py"), str(tmp_path),
                           json.dumps(fields)], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    rollouts = [Rollout(**r) for rank in ranks for r in rank["rollouts"]]  # rank 0's rows first, as all_gather
    assert len(rollouts) == 16
    rewards = lowercase_reward([r.text for r in rollouts], [])
    advantages = hand_advantages(rewards, 4, "batch")
    expected = reference_grad_norm(tiny_policy(seed=0), rollouts, advantages, [True] * 16, "seq_mean", 12)
    for rank in ranks:
        assert rank["history"][0]["train/grad_norm"] == pytest.approx(expected, rel=1e-4)
    own_std = hand_advantages(rewards[:8], 4, "batch") + hand_advantages(rewards[8:], 4, "batch")
    if_local = reference_grad_norm(tiny_policy(seed=0), rollouts, own_std, [True] * 16, "seq_mean", 12)
    assert abs(if_local - expected) > 20 * 1e-4 * expected  # the test can tell the two apart (20x its tolerance)


# ------------------------------------------------------------------------------------ ReasoningNER's combination
def reasoningner_algorithm() -> dict:
    """The preset's algorithm fields (μ, mini-batches, TIS, Dr. GRPO loss, β, clip range, AdamW, schedule)."""
    import yaml

    preset = yaml.safe_load((ROOT / "configs" / "grpo_qwen3-8b_reasoningner.yaml").read_text())
    keys = ("mu", "num_mini_batches", "micro_batch_size", "rollout_correction", "rollout_correction_mode",
            "rollout_correction_threshold", "loss_agg", "adv_scale", "beta", "kl_estimator", "eps_low", "eps_high",
            "beta1", "beta2", "weight_decay", "warmup_ratio", "lr_scheduler", "max_grad_norm")
    return {k: preset[k] for k in keys}


def test_reasoningner_combination_runs_three_steps_and_resumes_identically(tmp_path):
    algorithm = reasoningner_algorithm()
    assert (algorithm["mu"], algorithm["num_mini_batches"], algorithm["loss_agg"]) == (4, 4, "constant")
    lr = 1e-2  # not the preset's 1e-6: the weights and AdamW state must move for the resume check to mean anything
    run = dict(algorithm, lr=lr, total_steps=3, save_every=1, keep_last=3, resume="auto")
    straight, _, _, policy = run_grpo(tmp_path, **run)
    assert [h["step"] for h in straight] == [1, 2, 3]
    assert all(h["train/skipped_updates"] == 0.0 for h in straight)
    assert all(k in straight[-1] for k in ("train/kl", "train/correction/weight_mean", "train/clip_frac_high"))
    updates_per_step = algorithm["mu"] * algorithm["num_mini_batches"]
    total = 3 * updates_per_step
    optimizer = torch.load(tmp_path / "checkpoint-0000003" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {float(total)}
    warmup = math.ceil(algorithm["warmup_ratio"] * total)
    for h in straight:  # the lr after step s: cosine over all μ × mini-batches × steps updates, after warmup
        progress = (h["step"] * updates_per_step - warmup) / (total - warmup)
        assert h["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-6, abs=1e-12)
    final = {n: p.detach().clone() for n, p in policy.named_parameters()}

    shutil.rmtree(tmp_path / "checkpoint-0000003")  # as if the run had stopped after step 2
    resumed, _, _, policy = run_grpo(tmp_path, **run)
    assert [h["step"] for h in resumed] == [3]
    for key, value in straight[-1].items():
        if not key.startswith("time/") and key != "tokens_per_s":
            assert resumed[0][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    for name, param in policy.named_parameters():
        torch.testing.assert_close(param.detach(), final[name], rtol=0, atol=1e-7, msg=name)
