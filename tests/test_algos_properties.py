"""Hypothesis properties of grpo/algos.py that must hold for every input, not just the hand examples."""
from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.algos import aggregate_loss, group_advantages, kl_penalty, policy_loss

D = torch.float64
FAST = settings(max_examples=40, deadline=None)
reward = st.floats(-10, 10, allow_nan=False, allow_subnormal=False)


@FAST
@given(data=st.data(), G=st.integers(1, 6), n_groups=st.integers(1, 4), scale=st.sampled_from(["group", "none"]))
def test_advantages_sum_to_zero_per_group(data, G, n_groups, scale):
    rewards = torch.tensor(data.draw(st.lists(reward, min_size=G * n_groups, max_size=G * n_groups)), dtype=D)
    adv = group_advantages(rewards, G, scale)
    assert torch.isfinite(adv).all()
    per_group = adv.view(n_groups, G).sum(1)
    assert per_group.abs().max().item() < 1e-6


@FAST
@given(logp=st.floats(-15, 0), ref=st.floats(-15, 0))
def test_k3_nonnegative_and_zero_iff_equal(logp, ref):
    k3 = kl_penalty(torch.tensor([[logp]], dtype=D), torch.tensor([[ref]], dtype=D), "k3").item()
    assert k3 >= 0
    assert kl_penalty(torch.tensor([[logp]], dtype=D), torch.tensor([[logp]], dtype=D), "k3").item() == 0.0
    # below |x| ~ 1e-8, e^x - x - 1 ~ x^2/2 rounds to 0 in float64; the property is about distinct policies
    if abs(logp - ref) > 1e-6:
        assert k3 > 0


@FAST
@given(data=st.data(), eps_low=st.floats(0.0, 0.5), eps_high=st.floats(0.0, 0.5))
def test_clipping_never_increases_the_objective(data, eps_low, eps_high):
    # loss = -min(ratio*A, clip(ratio)*A) >= -ratio*A: the clipped surrogate is a pessimistic lower bound.
    n = 6
    log_ratio = torch.tensor(data.draw(st.lists(st.floats(-3, 3), min_size=n, max_size=n)), dtype=D)[None]
    adv = torch.tensor(data.draw(st.lists(reward, min_size=n, max_size=n)), dtype=D)[None]
    old = torch.full_like(log_ratio, -1.0)
    loss, metrics = policy_loss(old + log_ratio, old, adv, torch.ones(1, n), eps_low, eps_high)
    unclipped = -torch.exp(log_ratio) * adv
    assert (loss - unclipped).min().item() >= -1e-12
    assert 0.0 <= metrics["clip_frac"].item() <= 1.0


@FAST
@given(data=st.data(), c=st.floats(1.01, 10))
def test_dual_clip_caps_negative_advantage_loss(data, c):
    n = 6
    log_ratio = torch.tensor(data.draw(st.lists(st.floats(-3, 5), min_size=n, max_size=n)), dtype=D)[None]
    adv = torch.tensor(data.draw(st.lists(reward, min_size=n, max_size=n)), dtype=D)[None]
    old = torch.zeros_like(log_ratio)
    loss, _ = policy_loss(old + log_ratio, old, adv, torch.ones(1, n), 0.2, 0.28, dual_clip=c)
    plain, _ = policy_loss(old + log_ratio, old, adv, torch.ones(1, n), 0.2, 0.28)
    neg = adv < 0
    assert (loss[neg] <= (-c * adv)[neg] + 1e-12).all()           # capped at c * |A|
    assert torch.equal(loss[~neg], plain[~neg])                     # A >= 0 untouched


@FAST
@given(B=st.integers(1, 5), L=st.integers(1, 6), pad=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_aggregations_agree_for_equal_lengths(B, L, pad, seed):
    gen = torch.Generator().manual_seed(seed)
    per_tok = torch.randn(B, L + pad, generator=gen, dtype=D)
    mask = torch.zeros(B, L + pad)
    mask[:, :L] = 1
    seq = aggregate_loss(per_tok, mask, "seq_mean").item()
    tok = aggregate_loss(per_tok, mask, "token_mean").item()
    const = aggregate_loss(per_tok, mask, "constant", max_len=L).item()
    assert math.isclose(seq, tok, abs_tol=1e-12) and math.isclose(tok, const, abs_tol=1e-12)


@FAST
@given(data=st.data())
def test_uneven_lengths_weight_tokens_differently(data):
    # The converse, so the previous property is not vacuous: seq_mean gives each token of a short
    # sequence more weight than token_mean does. With loss 1 on a 1-token sequence and 0 on a 3-token one:
    # seq_mean = (1/1 + 0/3) / 2 = .5, token_mean = 1 / 4 = .25.
    scale = data.draw(st.floats(0.1, 10))
    per_tok = torch.tensor([[scale, 0, 0], [0, 0, 0]], dtype=D)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    assert math.isclose(aggregate_loss(per_tok, mask, "seq_mean").item(), scale / 2)
    assert math.isclose(aggregate_loss(per_tok, mask, "token_mean").item(), scale / 4)


@FAST
@given(nan_at=st.integers(0, 5), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       which=st.sampled_from(["logp", "old_logp", "advantages"]))
def test_non_finite_inputs_raise_never_silent_nan(nan_at, value, which):
    tensors = {"logp": torch.zeros(2, 3, dtype=D), "old_logp": torch.zeros(2, 3, dtype=D),
               "advantages": torch.ones(2, 3, dtype=D)}
    tensors[which].view(-1)[nan_at] = value
    try:
        policy_loss(tensors["logp"], tensors["old_logp"], tensors["advantages"], torch.ones(2, 3))
    except FloatingPointError as err:
        assert str(err).startswith(which + " has 1 non-finite")
    else:
        raise AssertionError("non-finite input was accepted")
