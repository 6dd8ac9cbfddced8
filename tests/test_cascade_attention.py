"""TorchEngine's cascade attention: a prompt's n samples read one copy of its K/V (grpo/kv_cache.SharedKV,
grpo/gqa_attention.cascade_attention) and get exactly what copying it into every row gives.

The tiny peaked llama and prompts of tests/test_continuous_batching.py: prompts of 3 to 15 tokens, three sharing a
12-token head (so a prompt's cache has holes: [pad | shared head | pad | own suffix]), EOS tokens that end rows at
different steps (so rows leave, and the rows of a prompt stop being adjacent), and a budget that makes rows wait
and join a running batch (so SharedKV holds several prefills' blocks).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpo.fast_decode as fast_decode  # noqa: E402
import grpo.gqa_attention as gqa_attention  # noqa: E402
from grpo.engine import TorchEngine  # noqa: E402
from test_continuous_batching import BUDGET, MAX_NEW, PROMPTS, assert_same, eos_for_varied_lengths  # noqa: E402
from test_torch_engine import peaked_tiny_llama, teacher_forced_logprobs  # noqa: E402


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer):
    """(model, tokenizer, eos ids that end seeded n=3 samples at varied steps)."""
    model = peaked_tiny_llama(len(smollm2_tokenizer)).eval()
    plain = TorchEngine(model, smollm2_tokenizer, eos_token_ids=[], continuous=False)
    # Seed 1: its samples give EOS tokens under which the test's call has joins, departures and a higher peak.
    sampled = plain.generate(PROMPTS, n=3, max_new_tokens=MAX_NEW, temperature=1.0, seed=1)
    return model, smollm2_tokenizer, eos_for_varied_lengths([r.completion_ids for r in sampled])


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "transformers"])
@pytest.mark.parametrize("budget", [BUDGET, 10**6])
def test_cascade_equals_copied_prompts(setup, monkeypatch, budget, lean):
    """Same samples, finish reasons and log-probs (1e-5; teacher forcing 1e-4) as with the prompt copied into every
    row, with joins and departures (BUDGET) and in one batch (10**6), through grpo/fast_decode.py's forward and
    through transformers'; the cascade path really ran."""
    model, tok, eos = setup
    calls = []
    original = gqa_attention.cascade_attention
    monkeypatch.setattr(gqa_attention, "cascade_attention", lambda *a: calls.append(a[-1]) or original(*a))
    kwargs = dict(n=3, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.95, seed=3)
    copied = TorchEngine(model, tok, max_batch_tokens=budget, eos_token_ids=eos, cascade_attention=False,
                         lean_decode=lean)
    cascade = TorchEngine(model, tok, max_batch_tokens=budget, eos_token_ids=eos, lean_decode=lean)
    expected = copied.generate(PROMPTS, **kwargs)
    assert not calls
    got = cascade.generate(PROMPTS, **kwargs)
    assert_same(expected, got)
    for r in got:
        assert (torch.tensor(r.logprobs) - teacher_forced_logprobs(model, r, 1.0)).abs().max().item() < 1e-4
    assert len(calls) == cascade.stats["decode_steps"] * model.config.num_hidden_layers
    assert len({len(r.completion_ids) for r in got}) >= 3  # rows finish at different steps ...
    assert any(not isinstance(gather, slice) for plan in calls for _, _, gather, _, _ in plan)  # ... and leave
    if budget == BUDGET:
        assert cascade.stats["joins"] > 0
        # One copy of a prompt per 3 rows: more rows fit the same budget.
        assert cascade.stats["peak_rows"] > copied.stats["peak_rows"]


def test_cascade_only_when_prompts_repeat(setup, monkeypatch):
    """n = 1 has nothing to share: rows hold their prompts as before and the cascade path never runs."""
    model, tok, eos = setup
    calls = []
    monkeypatch.setattr(gqa_attention, "cascade_attention", lambda *a: calls.append(1))
    TorchEngine(model, tok, eos_token_ids=eos).generate(PROMPTS, n=1, max_new_tokens=4, temperature=0)
    assert not calls


def test_cascade_thread_count_counts_the_shared_prompts(setup, monkeypatch):
    """Under cascade attention a step's K/V bytes are the rows' own plus the shared prompt blocks'. With the one-thread
    limit set between the two, a step that reads less than the limit from its own caches but more in all runs on
    every thread; each step's thread count follows own + shared < limit, and the samples do not depend on it."""
    model, tok, eos = setup
    seen = []
    original = gqa_attention.cascade_attention

    def recorded(layer, folded, keys, values, mask, scaling, plan):
        own = 2 * keys.numel() * keys.element_size()
        shared = sum(2 * block.keys[layer].numel() * keys.element_size() for block, *_ in plan)
        seen.append((own, shared, torch.get_num_threads()))
        return original(layer, folded, keys, values, mask, scaling, plan)

    monkeypatch.setattr(gqa_attention, "cascade_attention", recorded)
    kwargs = dict(n=3, max_new_tokens=MAX_NEW, temperature=1.0, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(fast_decode, "ONE_THREAD_ATTENTION_BYTES", 10**12)
        expected = TorchEngine(model, tok, eos_token_ids=eos).generate(PROMPTS, **kwargs)
        assert {t for _, _, t in seen} == {1}
        own, shared, _ = seen[len(seen) // 2]
        limit = own + shared
        monkeypatch.setattr(fast_decode, "ONE_THREAD_ATTENTION_BYTES", limit)
        seen.clear()
        got = TorchEngine(model, tok, eos_token_ids=eos).generate(PROMPTS, **kwargs)
    finally:
        torch.set_num_threads(threads)
    assert_same(expected, got)
    assert all(t == (1 if o + s < limit else 2) for o, s, t in seen)
    assert any(o < limit <= o + s and t == 2 for o, s, t in seen)
    assert any(t == 1 for _, _, t in seen)
