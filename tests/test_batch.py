"""completion_logprobs with the shared prompt prefix equals the plain forward: values, entropy and gradients."""
from __future__ import annotations

import pytest
import torch

from grpo.batch import supports_shared_prefix, collate_rollouts, completion_logprobs
from grpo.models import tiny_llama

PAD = 0


def grouped_batch(pad_in_prompt: bool = False):
    """Two prompts of different lengths (so one is left-padded) × 3 completions of lengths 1..5 each."""
    gen = torch.Generator().manual_seed(11)
    prompts = [torch.randint(1, 64, (n,), generator=gen).tolist() for n in (4, 7)]
    if pad_in_prompt:  # pad = eos chat models: the pad id occurs inside real prompts
        prompts[0][0] = PAD
    rows_p, rows_c, rows_lp = [], [], []
    for i, p in enumerate(prompts):
        for j in range(3):
            c = torch.randint(1, 64, (1 + (2 * i + j) % 5,), generator=gen).tolist()
            rows_p.append(p)
            rows_c.append(c)
            rows_lp.append([0.0] * len(c))
    return collate_rollouts(rows_p, rows_c, rows_lp, PAD)


def logp_and_grads(model, batch, share: bool):
    model.zero_grad(set_to_none=True)
    logp, entropy = completion_logprobs(model, batch, temperature=0.7, with_entropy=True, share_prompts=share)
    # A loss that weights every completion token differently, so any misplaced row/column changes the gradient.
    weights = torch.arange(1, logp.numel() + 1, dtype=torch.float32).reshape(logp.shape) / logp.numel()
    ((logp * weights * batch.completion_mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logp.detach(), entropy, grads


@pytest.mark.parametrize("pad_in_prompt", [False, True])
def test_shared_prefix_equals_plain_forward(pad_in_prompt):
    model = tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, seed=5)
    model.train()
    batch = grouped_batch(pad_in_prompt)
    assert supports_shared_prefix(model)
    plain = logp_and_grads(model, batch, share=False)
    shared = logp_and_grads(model, batch, share=True)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(shared[0][mask], plain[0][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared[1][mask], plain[1][mask], atol=1e-5, rtol=1e-5)
    for name, g in plain[2].items():
        torch.testing.assert_close(shared[2][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_shared_prefix_single_token_completions_and_distinct_prompts():
    model = tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, seed=5)
    one_token = collate_rollouts([[5, 6, 7]] * 3, [[8], [9], [10]], [[0.0]] * 3, PAD)  # C = 1: prefix pass only
    distinct = collate_rollouts([[5, 6], [7, 8, 9]], [[1, 2], [3]], [[0.0, 0.0], [0.0]], PAD)  # nothing to share
    for batch in (one_token, distinct):
        a = completion_logprobs(model, batch, 1.0, share_prompts=False)[0]
        b = completion_logprobs(model, batch, 1.0, share_prompts=True)[0]
        torch.testing.assert_close(b * batch.completion_mask, a * batch.completion_mask, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_falls_back_to_the_plain_forward():
    model = tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, seed=5)
    model.gradient_checkpointing_enable()
    model.train()
    assert not supports_shared_prefix(model)
    model.eval()
    assert supports_shared_prefix(model)
