from __future__ import annotations

import math

import pytest
import torch

from grpo.models import tiny_llama
from grpo.optim import build_optimizer, build_scheduler, param_groups


def test_param_groups_split_by_ndim():
    model = tiny_llama(layers=2)
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    # Per layer: q,k,v,o,gate,up,down matrices (7) decay; 2 RMSNorm gains do not. Plus the embedding matrix
    # (tied with lm_head, counted once) decays and the final norm gain does not: 2*7+1 = 15 and 2*2+1 = 5.
    assert len(groups["decay"]["params"]) == 15 and groups["decay"]["weight_decay"] == 0.1
    assert len(groups["no_decay"]["params"]) == 5 and groups["no_decay"]["weight_decay"] == 0.0
    names_no_decay = {n for n, p in model.named_parameters()
                      if any(p is q for q in groups["no_decay"]["params"])}
    assert all("norm" in n for n in names_no_decay)
    total = sum(p.numel() for g in groups.values() for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())  # every parameter exactly once


def test_update_is_textbook_adamw():
    """Two steps of build_optimizer's AdamW (fused on CPU) against the AdamW formula written out by hand."""
    model = tiny_llama(layers=1)
    lr, (b1, b2), wd, eps = 0.01, (0.9, 0.95), 0.1, 1e-8
    opt = build_optimizer(model, lr=lr, betas=(b1, b2), weight_decay=wd, eps=eps)
    assert opt.defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    expected = {n: p.detach().clone() for n, p in params.items()}
    m = {n: torch.zeros_like(p) for n, p in expected.items()}
    v = {n: torch.zeros_like(p) for n, p in expected.items()}
    for t in (1, 2):
        for name, p in params.items():
            p.grad = torch.randn(p.shape, generator=gen)
            decay = wd if p.ndim >= 2 else 0.0
            m[name] = b1 * m[name] + (1 - b1) * p.grad
            v[name] = b2 * v[name] + (1 - b2) * p.grad**2
            m_hat, v_hat = m[name] / (1 - b1**t), v[name] / (1 - b2**t)
            expected[name] = expected[name] * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
        opt.step()
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-5, atol=1e-6)


def test_weight_decay_is_decoupled_and_skips_norms():
    model = tiny_llama(layers=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lr, wd = 0.1, 0.5
    opt = build_optimizer(model, lr=lr, betas=(0.9, 0.95), weight_decay=wd)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    # Zero gradient => Adam moments are 0 and the Adam update is 0/(0+eps) = 0; only the decoupled decay acts:
    # p <- p * (1 - lr * wd) = p * 0.95 for matrices, unchanged for norm gains.
    for name, p in model.named_parameters():
        factor = 1.0 if p.ndim < 2 else 1 - lr * wd
        torch.testing.assert_close(p.detach(), before[name] * factor, rtol=0, atol=1e-7)


def lrs_by_step(total, warmup_ratio, kind, min_lr_ratio, peak=2.0):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = build_scheduler(opt, total, warmup_ratio, kind, min_lr_ratio)
    out = []
    for _ in range(total + 2):
        out.append(opt.param_groups[0]["lr"] / peak)  # lr used by the update with this index
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_closed_form():
    # total 10, warmup ceil(0.2*10) = 2: steps 0,1 -> 1/2, 2/2. Decay over 10-2 = 8 steps, min ratio 0.1:
    # step 4: progress 2/8 -> 0.1 + 0.9*0.5*(1+cos(pi/4)) = 0.1 + 0.9*0.8535534 = 0.8681981
    # step 6: progress 4/8 -> 0.1 + 0.9*0.5 = 0.55;  step 9: progress 7/8 -> 0.1 + 0.9*0.5*(1+cos(7pi/8))
    # = 0.1 + 0.9*0.0380602 = 0.1342542;  step >= 10: progress clamps to 1 -> 0.1.
    got = lrs_by_step(10, 0.2, "cosine", 0.1)
    expected = {0: 0.5, 1: 1.0, 2: 1.0, 4: 0.8681981, 6: 0.55, 9: 0.1342542, 10: 0.1, 11: 0.1}
    for step, value in expected.items():
        assert got[step] == pytest.approx(value, abs=1e-6), step


def test_linear_and_constant_schedules():
    # total 8, warmup ceil(0.15*8) = ceil(1.2) = 2 steps; linear decay over 6 steps to 0:
    # step 2: 1.0, step 5: 1 - 3/6 = 0.5, step 7: 1 - 5/6 = 0.1666667, step 8: 0.
    got = lrs_by_step(8, 0.15, "linear", 0.0)
    for step, value in {0: 0.5, 1: 1.0, 2: 1.0, 5: 0.5, 7: 1 / 6, 8: 0.0}.items():
        assert got[step] == pytest.approx(value, abs=1e-7), step
    const = lrs_by_step(5, 0.4, "constant", 0.0)  # warmup ceil(2.0) = 2
    assert const == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_no_warmup_cosine_matches_formula_everywhere():
    total = 7
    got = lrs_by_step(total, 0.0, "cosine", 0.0)
    for step in range(total):
        assert got[step] == pytest.approx(0.5 * (1 + math.cos(math.pi * step / total)), abs=1e-9)


@pytest.mark.parametrize("kwargs", [dict(kind="step"), dict(total_steps=0), dict(warmup_ratio=1.5),
                                    dict(min_lr_ratio=-0.1)])
def test_scheduler_rejects_bad_arguments(kwargs):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    args = dict(total_steps=10, warmup_ratio=0.1, kind="cosine", min_lr_ratio=0.0) | kwargs
    with pytest.raises(ValueError):
        build_scheduler(opt, **args)
