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
    # (A weight of its row and column alone, so a batch narrowed to fewer columns weights its tokens the same.)
    rows, cols = torch.meshgrid(torch.arange(logp.shape[0]), torch.arange(logp.shape[1]), indexing="ij")
    weights = (1 + 11 * rows + cols).float() / 64
    ((logp * weights * batch.completion_mask).sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return logp.detach(), entropy, grads


def assert_same_scores(actual, expected, batch) -> None:
    """logp_and_grads results agree on the completion tokens: log-probs, entropies and every parameter's gradient."""
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(actual[0][mask], expected[0][mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual[1][mask], expected[1][mask], atol=1e-5, rtol=1e-5)
    for name, g in expected[2].items():
        torch.testing.assert_close(actual[2][name], g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pad_in_prompt", [False, True])
def test_shared_prefix_equals_plain_forward(pad_in_prompt):
    model = tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, seed=5)
    model.train()
    batch = grouped_batch(pad_in_prompt)
    assert supports_shared_prefix(model)
    plain = logp_and_grads(model, batch, share=False)
    shared = logp_and_grads(model, batch, share=True)
    assert_same_scores(shared, plain, batch)


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


@pytest.mark.parametrize("share", [False, True])
def test_narrowed_micro_batch_scores_its_rows_as_the_whole_batch_does(share):
    """A micro-batch of the short rows drops the columns that are padding in all of its rows (the long prompt's
    left padding, the long completion's right padding) and gives the same log-probs and gradients there."""
    model = tiny_llama(vocab_size=64, hidden=32, layers=2, heads=4, seed=5)
    model.train()
    batch = grouped_batch()                 # prompts of 4 and 7 tokens, completions of 1..5 tokens
    rows = torch.tensor([0, 1, 2])          # the 4-token prompt, completions of 1, 2 and 3 tokens
    whole = batch.select(rows)
    narrow = whole.narrow()
    P, C = batch.prompt_len, batch.completion_mask.shape[1]
    assert (P, C) == (7, 5) and (narrow.prompt_len, narrow.completion_mask.shape[1]) == (4, 3)
    assert narrow.input_ids.shape == (3, 4 + 3) and narrow.attention_mask.all(dim=1).any()  # no all-pad column left
    assert torch.equal(narrow.input_ids, whole.input_ids[:, 3:10])
    a = logp_and_grads(model, whole, share)
    b = logp_and_grads(model, narrow, share)
    mask = narrow.completion_mask.bool()
    torch.testing.assert_close(b[0][mask], a[0][:, :3][mask], atol=1e-5, rtol=1e-5)
    for name, g in a[2].items():
        torch.testing.assert_close(b[2][name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert batch.narrow().input_ids.shape == batch.input_ids.shape  # the whole batch uses every column


def gqa_llama():
    """tiny_llama with grouped-query attention: 4 query heads over 2 K/V heads (SmolLM2 has 9 over 3)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("share", [False, True])
def test_cpu_forward_runs_grouped_query_attention_natively(share, monkeypatch):
    # Under a padding mask transformers' sdpa repeats K/V per query head; on CPU the trainer's forward instead runs
    # the project's attention with enable_gqa. Same log-probs, entropies and gradients as the repeated K/V.
    import contextlib

    import grpo.batch
    from grpo.gqa_attention import GQA_SDPA

    model = gqa_llama()
    model.train()
    batch = grouped_batch()  # two prompt lengths: a padding mask
    seen: list[str] = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(model.config._attn_implementation))
    native = logp_and_grads(model, batch, share)
    assert set(seen) == {GQA_SDPA} and model.config._attn_implementation == "sdpa"
    seen.clear()
    monkeypatch.setattr(grpo.batch, "_native_gqa_on_cpu", lambda model: contextlib.nullcontext())
    repeated = logp_and_grads(model, batch, share)
    assert set(seen) == {"sdpa"}
    assert_same_scores(native, repeated, batch)


def test_gradient_checkpointing_keeps_transformers_attention():
    # Checkpointing recomputes the forward in backward, outside completion_logprobs: it must save the same tensors
    # as the forward did, so the forward keeps the model's own attention there.
    model = gqa_llama()
    model.gradient_checkpointing_enable()
    model.train()
    seen: list[str] = []
    model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: seen.append(model.config._attn_implementation))
    logp, _, grads = logp_and_grads(model, grouped_batch(), share=True)
    assert set(seen) == {"sdpa"} and torch.isfinite(logp).all()
    assert all(torch.isfinite(g).all() for g in grads.values())
