"""grpo/algos.py: one hand-computed example per function (arithmetic in the comments) and the error paths."""
from __future__ import annotations

import math

import pytest
import torch

from grpo.algos import (aggregate_loss, check_finite, group_advantages, kl_in_reward, kl_penalty, masked_mean,
                        masked_sum, normaliser_counts, overlong_penalty, policy_loss, rollout_correction_weights,
                        truncation_mask, zero_variance_groups)

D = torch.float64


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=D), torch.as_tensor(expected, dtype=D),
                               atol=atol, rtol=0)


# ---------------------------------------------------------------- advantages
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=D)


def test_group_advantages_by_hand():
    # group 1 [1,0,0,1]: mean .5, deviations +-.5, unbiased var = 4 * .25 / 3 = 1/3, std = 0.577350
    #   -> A = +-.5 / (0.577350 + 1e-6) = +-0.866024;  group 2 [2,2,2,2]: all equal -> A = 0 exactly.
    a = .5 / (math.sqrt(1 / 3) + 1e-6)
    close(group_advantages(REWARDS, 4, "group"), [a, -a, -a, a, 0, 0, 0, 0], atol=1e-9)
    # none (Dr. GRPO): centering only -> [.5, -.5, -.5, .5, 0, 0, 0, 0]
    close(group_advantages(REWARDS, 4, "none"), [.5, -.5, -.5, .5, 0, 0, 0, 0], atol=0)
    # batch: std of all 8 rewards. mean = 10/8 = 1.25; squared deviations .0625 + 1.5625 + 1.5625 + .0625
    #   + 4 * .5625 = 5.5; unbiased var 5.5 / 7 = 0.785714, std 0.886405 -> A = +-.5 / 0.886405 = +-0.564076
    b = .5 / (math.sqrt(5.5 / 7) + 1e-6)
    close(group_advantages(REWARDS, 4, "batch"), [b, -b, -b, b, 0, 0, 0, 0], atol=1e-9)


def test_zero_variance_groups_and_size_one_groups():
    assert zero_variance_groups(REWARDS, 4).tolist() == [False, True]
    # 0.1 + 0.2 style values: equal rewards must give exactly 0, not round-off / eps
    assert group_advantages(torch.full((3,), 0.1 + 0.2, dtype=D), 3).tolist() == [0.0, 0.0, 0.0]
    # G = 1: unbiased std undefined -> advantage 0 in every scale, no NaN
    for scale in ("group", "batch", "none"):
        assert group_advantages(torch.tensor([3.0, -1.0]), 1, scale).tolist() == [0.0, 0.0]
    # integer rewards are accepted (float32 out): [0, 2] -> mean 1, unbiased std sqrt(2) -> -+0.707106
    close(group_advantages(torch.tensor([0, 2]), 2), [-1 / (math.sqrt(2) + 1e-6), 1 / (math.sqrt(2) + 1e-6)])


def test_group_advantages_rejects_bad_input():
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, "std")  # type: ignore[arg-type]
    with pytest.raises(FloatingPointError, match=r"rewards has 1 non-finite entries of 4 \(1 nan"):
        group_advantages(torch.tensor([1.0, float("nan"), 0.0, 1.0]), 2)
    with pytest.raises(FloatingPointError, match="rewards"):
        zero_variance_groups(torch.tensor([1.0, float("inf")]), 2)


# ---------------------------------------------------------------- KL
def test_kl_estimators_by_hand():
    # pi = .5, pi_ref = .25: x = ln(.25 / .5) = -ln 2 = -0.693147
    # k1 = -x = 0.693147; k2 = x^2 / 2 = 0.480453 / 2 = 0.240227; k3 = e^x - x - 1 = .5 + .693147 - 1 = 0.193147
    logp, ref = torch.tensor([[math.log(.5)]], dtype=D), torch.tensor([[math.log(.25)]], dtype=D)
    close(kl_penalty(logp, ref, "k1"), [[math.log(2)]])
    close(kl_penalty(logp, ref, "k2"), [[0.5 * math.log(2) ** 2]])
    close(kl_penalty(logp, ref, "k3"), [[0.5 + math.log(2) - 1]])
    # clamps: x = -30 -> clamped to -20 -> k3 = e^-20 + 20 - 1 = 19 -> clamped to 10; k1 = 20
    far = torch.tensor([[-30.0]], dtype=D)
    close(kl_penalty(torch.zeros(1, 1, dtype=D), far, "k3"), [[10.0]])
    close(kl_penalty(torch.zeros(1, 1, dtype=D), far, "k1"), [[20.0]])
    with pytest.raises(ValueError, match="estimator"):
        kl_penalty(logp, ref, "k4")  # type: ignore[arg-type]
    with pytest.raises(FloatingPointError, match="ref_logp"):
        kl_penalty(logp, torch.tensor([[float("-inf")]], dtype=D))


def test_kl_in_reward_by_hand():
    # k1 = logp - ref = [[.5, -1], [0, .5]]; row sums under mask [[1,1],[1,0]]: -0.5 and 0
    # r' = r - .1 * sum = [1 + .05, 2 - 0] = [1.05, 2.0]
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.5]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0], [-0.5, -1.0]], dtype=D)
    out = kl_in_reward(torch.tensor([1.0, 2.0], dtype=D), logp, ref, torch.tensor([[1, 1], [1, 0]]), beta=0.1)
    close(out, [1.05, 2.0], atol=1e-12)
    assert not out.requires_grad


# ---------------------------------------------------------------- clipped surrogate
def test_policy_loss_by_hand():
    # eps_low .2, eps_high .28, dual clip c = 3; the last token is padding (ratio 100 must not show anywhere)
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.7, 4.0, 100.0]], dtype=D)
    adv = torch.tensor([[1.0, -1.0, 1.0, 2.0, -1.0, -1.0]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    old = torch.full_like(ratio, -2.0)
    loss, m = policy_loss(old + ratio.log(), old, adv, mask, eps_low=0.2, eps_high=0.28, dual_clip=3.0)
    # 1.5, A=+1: max(-1.5, -1.28) = -1.28                 high clip
    # 0.5, A=-1: max(.5, .8) = .8                         low clip
    # 1.1, A=+1: max(-1.1, -1.1) = -1.1                    inside
    # 0.7, A=+2: max(-1.4, -2 * .8 = -1.6) = -1.4          A > 0 below 1 - eps: not clipped
    # 4.0, A=-1: max(4, 1.28) = 4, dual: min(4, 3 * 1) = 3 dual clip
    close(loss, [[-1.28, 0.8, -1.1, -1.4, 3.0, 0.0]], atol=1e-12)
    close(m["clip_frac_high"], 1 / 5)
    close(m["clip_frac_low"], 1 / 5)
    close(m["clip_frac"], 2 / 5)
    close(m["dual_clip_frac"], 1 / 5)
    close(m["ratio_mean"], (1.5 + .5 + 1.1 + .7 + 4.0) / 5)  # 7.8 / 5 = 1.56
    close(m["ratio_max"], 4.0)
    # without the dual clip the 4.0 token costs the full 4.0
    loss_no_dual, _ = policy_loss(old + ratio.log(), old, adv, mask, eps_low=0.2, eps_high=0.28)
    close(loss_no_dual[0, 4], 4.0, atol=1e-12)


def test_policy_loss_sequence_advantages_broadcast_and_is_weights():
    logp = torch.log(torch.tensor([[1.1, 0.9], [1.0, 1.0]], dtype=D))
    old = torch.zeros(2, 2, dtype=D)
    mask = torch.ones(2, 2)
    per_seq, _ = policy_loss(logp, old, torch.tensor([2.0, -1.0], dtype=D), mask)
    per_tok, _ = policy_loss(logp, old, torch.tensor([[2.0, 2.0], [-1.0, -1.0]], dtype=D), mask)
    close(per_seq, per_tok, atol=0)
    # IS weights multiply: row 0 is [-2.2, -1.8] (ratios inside .8..1.2) -> x [.5, 2] = [-1.1, -3.6]
    weighted, _ = policy_loss(logp, old, torch.tensor([2.0, -1.0], dtype=D), mask,
                              is_weights=torch.tensor([[0.5, 2.0], [1.0, 1.0]], dtype=D))
    close(weighted[0], [-1.1, -3.6], atol=1e-12)


def test_policy_loss_rejects_bad_input():
    z = torch.zeros(2, 3)
    with pytest.raises(FloatingPointError, match="logp has 2 non-finite entries of 6"):
        policy_loss(torch.tensor([[0.0, float("nan"), 0.0]] * 2), z, torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(FloatingPointError, match="advantages"):
        policy_loss(z, z, torch.tensor([1.0, float("inf")]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(z, z, torch.zeros(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        policy_loss(z, torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(z, z, torch.zeros(2), torch.ones(2, 3), dual_clip=0.5)


# ---------------------------------------------------------------- aggregation
def test_aggregate_loss_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]], dtype=D)  # 99 = padding, must not count
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert normaliser_counts(mask) == (4.0, 2.0)
    close(aggregate_loss(loss, mask, "token_mean"), 10 / 4)                # (1+2+3+4) / 4 = 2.5
    close(aggregate_loss(loss, mask, "seq_mean"), (6 / 3 + 4 / 1) / 2)     # (2 + 4) / 2 = 3
    close(aggregate_loss(loss, mask, "constant"), 10 / (2 * 3))             # max_len = T = 3
    close(aggregate_loss(loss, mask, "constant", max_len=5), 10 / (2 * 5))  # 1.0
    close(aggregate_loss(loss, mask, "token_mean", num_tokens=20), 10 / 20)
    close(aggregate_loss(loss, mask, "seq_mean", num_seqs=8), 6 / 8)
    # A fully masked third row (a truncated completion, a zero-variance group): seq_mean and token_mean ignore it,
    # Dr. GRPO's constant still counts it — its normaliser is rows x max_len, whatever the mask says.
    loss3, mask3 = torch.cat([loss, torch.full((1, 3), 5.0, dtype=D)]), torch.cat([mask, torch.zeros(1, 3)])
    assert normaliser_counts(mask3) == (4.0, 2.0) and normaliser_counts(mask3, "constant") == (4.0, 3.0)
    close(aggregate_loss(loss3, mask3, "seq_mean"), 3.0)
    close(aggregate_loss(loss3, mask3, "constant", max_len=5), 10 / (3 * 5))
    with pytest.raises(ValueError, match="mode"):
        aggregate_loss(loss, mask, "sum")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["seq_mean", "token_mean", "constant"])
def test_empty_mask_gives_zero_with_graph(mode):
    logp = torch.randn(2, 3, dtype=D, requires_grad=True)
    per_tok, metrics = policy_loss(logp, logp.detach() - 0.1, torch.tensor([1.0, -1.0], dtype=D), torch.zeros(2, 3))
    out = aggregate_loss(per_tok, torch.zeros(2, 3), mode)
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 3, dtype=D))
    assert all(v.item() == 0.0 for v in metrics.values())


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0], [3.0, 1e30]])
    m = torch.tensor([[True, False], [True, False]])
    assert masked_sum(x, m).item() == 4.0
    assert masked_mean(x, m).item() == 2.0
    assert masked_mean(x, m, dim=1).tolist() == [1.0, 3.0]
    assert masked_mean(x, torch.zeros(2, 2)).item() == 0.0


def test_check_finite_names_tensor_and_counts():
    check_finite("ok", torch.zeros(3))
    with pytest.raises(FloatingPointError, match=r"per_token_loss has 2 non-finite entries of 4 \(1 nan, 1 inf\)"):
        aggregate_loss(torch.tensor([[float("nan"), 1.0], [float("inf"), 0.0]]), torch.ones(2, 2))


# ---------------------------------------------------------------- rollout correction
LOG_RATIO = torch.log(torch.tensor([[3.0, 0.6, 1.0], [1.5, 0.25, 1.0]], dtype=D))  # old - rollout
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])


def _weights(level, mode):
    return rollout_correction_weights(LOG_RATIO - 1.0, torch.full_like(LOG_RATIO, -1.0), MASK, level, mode, 2.0)


def test_rollout_correction_token_level_by_hand():
    # C = 2. truncate: min(rho, 2) = [[2, .6, 1], [1.5, .25, pad 0]]; 1 of 5 tokens truncated (the 3)
    w, m = _weights("token", "truncate")
    close(w, [[2.0, 0.6, 1.0], [1.5, 0.25, 0.0]], atol=1e-12)
    close(m["frac_corrected"], 1 / 5)
    # mask: keep 1/2 <= rho <= 2 -> 3 and .25 rejected -> [[0, .6, 1], [1.5, 0, 0]], 2 of 5
    w, m = _weights("token", "mask")
    close(w, [[0.0, 0.6, 1.0], [1.5, 0.0, 0.0]], atol=1e-12)
    close(m["frac_corrected"], 2 / 5)
    # metrics over the 5 loss tokens, x = old - rollout = ln [3, .6, 1, 1.5, .25]
    # |x| = 1.098612 + .510826 + 0 + .405465 + 1.386294 = 3.401197 -> mean .680239, max ln 4 = 1.386294
    close(m["logp_gap_abs_mean"], (math.log(3) - math.log(.6) + math.log(1.5) - math.log(.25)) / 5)
    close(m["logp_gap_max"], math.log(4))
    # k3 = e^x - x - 1: (3 - ln3 - 1) + (.6 - ln.6 - 1) + 0 + (1.5 - ln1.5 - 1) + (.25 - ln.25 - 1)
    #    = .901388 + .110826 + 0 + .094535 + .636294 = 1.743043 -> / 5 = .348609
    close(m["kl_k3"], 1.743043 / 5)


def test_rollout_correction_sequence_level_by_hand():
    # rho_0 = 3 * .6 * 1 = 1.8, rho_1 = 1.5 * .25 = .375 (padding excluded from the sum)
    w, m = _weights("sequence", "truncate")                 # both <= 2: nothing truncated
    close(w, [[1.8, 1.8, 1.8], [.375, .375, 0.0]], atol=1e-12)
    close(m["frac_corrected"], 0.0)
    w, m = _weights("sequence", "mask")                     # .375 < 1/2 -> sequence 1 rejected
    close(w, [[1.8, 1.8, 1.8], [0.0, 0.0, 0.0]], atol=1e-12)
    close(m["frac_corrected"], 1 / 2)


def test_rollout_correction_rejects_bad_input():
    with pytest.raises(ValueError, match="threshold"):
        rollout_correction_weights(LOG_RATIO, LOG_RATIO, MASK, threshold=1.0)
    with pytest.raises(FloatingPointError, match="rollout_logp"):
        rollout_correction_weights(LOG_RATIO, LOG_RATIO.log(), MASK)  # log of negatives -> nan


# ---------------------------------------------------------------- overlong handling
def test_overlong_penalty_by_hand():
    # L = 100, buffer 20 -> free up to 80; 85 -> -(85-80)/20 = -.25; 90 -> -.5; 100 -> -1; factor 2 doubles
    lengths = torch.tensor([50, 80, 85, 90, 100])
    close(overlong_penalty(lengths, 100, 20), [0, 0, -.25, -.5, -1.0])
    close(overlong_penalty(lengths, 100, 20, penalty_factor=2.0), [0, 0, -.5, -1.0, -2.0])
    close(overlong_penalty(lengths, 100, 0), [0, 0, 0, 0, -1.0])  # no buffer: hard step at L
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(lengths, 100, 101)


def test_truncation_mask():
    assert truncation_mask(["stop", "length", "eos"]).tolist() == [1.0, 0.0, 1.0]
    assert truncation_mask(torch.tensor([True, False])).tolist() == [0.0, 1.0]
    assert truncation_mask([False, True]).tolist() == [1.0, 0.0]
    with pytest.raises(TypeError, match="finish-reason"):
        truncation_mask(["stop", None])  # type: ignore[list-item]
