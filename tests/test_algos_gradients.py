"""Gradients of the GRPO loss: gradcheck, the REINFORCE identity, and the gradient-accumulation contract."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from grpo.algos import aggregate_loss, group_advantages, kl_penalty, normaliser_counts, policy_loss
from grpo.logprobs import token_logprobs

D = torch.float64


def _logp_away_from_kinks(seed: int, shape=(3, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    # ratios drawn in [.5, 2] but kept >= 0.01 away from the clip edges .8 / 1.28 and the dual cap 1.5
    # (where -ratio * A = -1.5 * A), where the loss has kinks and finite differences would straddle them.
    gen = torch.Generator().manual_seed(seed)
    ratio = 0.5 + 1.5 * torch.rand(shape, generator=gen, dtype=D)
    for edge in (0.8, 1.28, 1.5):
        near = (ratio - edge).abs() < 0.01
        ratio = torch.where(near, ratio + 0.05, ratio)
    old = -torch.rand(shape, generator=gen, dtype=D) * 3
    return (old + ratio.log()).requires_grad_(), old


@pytest.mark.parametrize("dual_clip", [None, 1.5])
def test_gradcheck_policy_loss(dual_clip):
    logp, old = _logp_away_from_kinks(0)
    adv = torch.tensor([[1.0, -2.0, 0.5, -0.3], [0.7, -1.0, 2.0, -0.1], [-1.5, 1.0, -0.4, 0.9]], dtype=D)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    is_w = torch.rand(3, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(
        lambda lp: policy_loss(lp, old, adv, mask, 0.2, 0.28, dual_clip=dual_clip, is_weights=is_w)[0], (logp,))


@pytest.mark.parametrize("mode", ["seq_mean", "token_mean", "constant"])
def test_gradcheck_aggregate_loss(mode):
    per_tok = torch.randn(3, 5, dtype=D, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert torch.autograd.gradcheck(lambda x: aggregate_loss(x, mask, mode, max_len=7), (per_tok,))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_gradcheck_kl_penalty(estimator):
    logp = -torch.rand(2, 4, dtype=D, generator=torch.Generator().manual_seed(2)) * 3
    ref = -torch.rand(2, 4, dtype=D, generator=torch.Generator().manual_seed(3)) * 3
    assert torch.autograd.gradcheck(lambda lp, rf: kl_penalty(lp, rf, estimator),
                                    (logp.requires_grad_(), ref.requires_grad_()))


def test_k3_gradient_closed_form():
    # d k3 / d logp = d/dlogp [e^x - x - 1], x = ref - logp  ->  1 - e^x = 1 - pi_ref / pi_theta
    logp = torch.tensor([[-0.5, -2.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]], dtype=D)
    kl_penalty(logp, ref, "k3").sum().backward()
    np.testing.assert_allclose(logp.grad.numpy(), 1 - np.exp(np.array([[-0.5, 1.0]])), atol=1e-12)


def test_grpo_gradient_equals_reinforce_with_group_baseline():
    """With mu = 1 (old_logp == logp, ratio 1, no clip active) and beta = 0, the seq_mean GRPO loss gradient
    w.r.t. a tiny categorical policy's logits z[i, t, :] is minus the REINFORCE estimate

        grad_z J = 1/N sum_i A_i / |o_i| sum_t d log pi(o_it) / d z_it,
        d log softmax(z / tau)[o] / d z = (onehot(o) - softmax(z / tau)) / tau

    Everything on the right is computed in numpy: softmax by hand, advantages with ddof=1 std.
    """
    N, G, T, V, tau = 6, 3, 4, 5, 0.8
    rng = np.random.default_rng(0)
    z_np = rng.normal(size=(N, T, V))
    tokens_np = rng.integers(0, V, size=(N, T))
    lengths = np.array([4, 1, 3, 2, 4, 3])
    mask_np = (np.arange(T)[None, :] < lengths[:, None]).astype(float)
    rewards_np = np.array([1.0, 0.0, 0.5, 2.0, -1.0, 2.0])

    z = torch.tensor(z_np, requires_grad=True)
    logp = token_logprobs(z, torch.tensor(tokens_np), temperature=tau, chunk_size=5)
    adv = group_advantages(torch.tensor(rewards_np), G, "group")
    per_tok, metrics = policy_loss(logp, logp.detach(), adv, torch.tensor(mask_np), 0.2, 0.28)
    assert metrics["clip_frac"].item() == 0.0 and metrics["ratio_max"].item() == 1.0
    aggregate_loss(per_tok, torch.tensor(mask_np), "seq_mean").backward()

    groups = rewards_np.reshape(-1, G)
    adv_np = ((groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-6)).ravel()
    exp = np.exp(z_np / tau - (z_np / tau).max(-1, keepdims=True))
    probs = exp / exp.sum(-1, keepdims=True)
    onehot = np.eye(V)[tokens_np]
    score = (onehot - probs) / tau                                          # [N, T, V]
    weight = adv_np[:, None] / lengths[:, None] * mask_np / N               # [N, T]
    reinforce_grad_of_objective = weight[..., None] * score
    np.testing.assert_allclose(z.grad.numpy(), -reinforce_grad_of_objective, atol=1e-12)


@pytest.mark.parametrize("mode", ["seq_mean", "token_mean", "constant"])
def test_micro_batches_sum_to_full_batch(mode):
    """The gradient-accumulation contract: 6 uneven sequences split into micro-batches of 1, 2 and 3 rows
    (each trimmed to its own longest sequence, as a trainer pads per micro-batch), each aggregated with
    the step's global normalisers, sum to the full-batch loss and gradient."""
    gen = torch.Generator().manual_seed(4)
    lengths = torch.tensor([2, 7, 1, 5, 3, 6])
    T = int(lengths.max())
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(D)
    logp = (-3 * torch.rand(6, T, generator=gen, dtype=D)).requires_grad_()
    old = logp.detach() + 0.3 * torch.randn(6, T, generator=gen, dtype=D)  # ratios spread over clip edges
    adv = torch.randn(6, generator=gen, dtype=D)

    def loss_of(rows: slice, trim_to: int, **norm) -> torch.Tensor:
        per_tok, _ = policy_loss(logp[rows, :trim_to], old[rows, :trim_to], adv[rows], mask[rows, :trim_to],
                                 0.2, 0.28, dual_clip=3.0)
        return aggregate_loss(per_tok, mask[rows, :trim_to], mode, max_len=T, **norm)

    full = loss_of(slice(0, 6), T)
    (full_grad,) = torch.autograd.grad(full, logp)

    num_tokens, num_seqs = 0.0, 0.0
    splits = [slice(0, 1), slice(1, 3), slice(3, 6)]
    for rows in splits:
        t, s = normaliser_counts(mask[rows])
        num_tokens, num_seqs = num_tokens + t, num_seqs + s
    assert (num_tokens, num_seqs) == (24.0, 6.0)  # 2+7+1+5+3+6 tokens
    accumulated = sum(loss_of(rows, int(lengths[rows].max()), num_tokens=num_tokens, num_seqs=num_seqs)
                      for rows in splits)
    (acc_grad,) = torch.autograd.grad(accumulated, logp)

    assert abs(accumulated.item() - full.item()) < 1e-12
    assert (acc_grad - full_grad).abs().max().item() < 1e-6
    assert full_grad.abs().sum() > 0  # non-trivial: some tokens carry gradient
    # and the per-call defaults would NOT satisfy the contract (why the trainer must pass global counts)
    if mode != "constant":
        local = sum(loss_of(rows, int(lengths[rows].max())) for rows in splits)
        assert abs(local.item() - full.item()) > 1e-3
