"""TorchEngine's cascade attention: a prompt's n samples read one copy of its K/V (grpo/kv_cache.SharedKV,
grpo/gqa_attention._cascade_decode_attention) and get exactly what copying it into every row gives.

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

import grpo.gqa_attention as gqa_attention  # noqa: E402
from grpo.engine import TorchEngine  # noqa: E402
from test_continuous_batching import BUDGET, MAX_NEW, PROMPTS, assert_same, eos_for_varied_lengths  # noqa: E402
from test_torch_engine import peaked_tiny_llama, teacher_forced_logprobs  # noqa: E402


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer):
    """(model, tokenizer, {n: eos ids that end seeded samples at varied steps} for n = 1 and 3)."""
    model = peaked_tiny_llama(len(smollm2_tokenizer)).eval()
    plain = TorchEngine(model, smollm2_tokenizer, eos_token_ids=[], continuous=False)
    eos = {}
    for n in (1, 3):
        sampled = plain.generate(PROMPTS, n=n, max_new_tokens=MAX_NEW, temperature=1.0, seed=3)
        eos[n] = eos_for_varied_lengths([r.completion_ids for r in sampled])
    return model, smollm2_tokenizer, eos


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "hf"])
@pytest.mark.parametrize("n", [3, 1])
@pytest.mark.parametrize("budget", [BUDGET, 10**6])
def test_cascade_equals_copied_prompts(setup, monkeypatch, budget, n, lean):
    """Same samples, finish reasons and log-probs (1e-5; teacher forcing 1e-4) as with the prompt copied into every
    row, with joins and departures (BUDGET) and in one batch (10**6), through the lean decode step and through
    transformers' forward; the cascade path really ran. n = 3: a prompt's samples share its K/V; n = 1: the prompts
    that share a 12-token head share that head's K/V."""
    model, tok, eos = setup
    eos = eos[n]
    calls = []
    original = gqa_attention.cascade_attention
    monkeypatch.setattr(gqa_attention, "cascade_attention", lambda *a: calls.append(a[-1]) or original(*a))
    kwargs = dict(n=n, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.95, seed=3)
    copied = TorchEngine(model, tok, max_batch_tokens=budget, eos_token_ids=eos, cascade_attention=False,
                         lean_decode=lean)
    cascade = TorchEngine(model, tok, max_batch_tokens=budget, eos_token_ids=eos, lean_decode=lean)
    expected = copied.generate(PROMPTS, **kwargs)
    assert not calls
    got = cascade.generate(PROMPTS, **kwargs)
    assert_same(expected, got)
    for r in got:
        assert (torch.tensor(r.logprobs) - teacher_forced_logprobs(model, r, 1.0)).abs().max().item() < 1e-4
    layers = model.config.num_hidden_layers
    if n > 1:  # every step reads shared prompts ...
        assert len(calls) == cascade.stats["decode_steps"] * layers
    else:  # ... at n = 1, the steps whose rows include prompts of a shared head
        assert 0 < len(calls) <= cascade.stats["decode_steps"] * layers and len(calls) % layers == 0
    assert len({len(r.completion_ids) for r in got}) >= 3  # rows finish at different steps ...
    if n > 1 or budget != BUDGET:  # ... and leave (at n = 1 and BUDGET one chunk holds the shared-head prompts)
        assert any(not isinstance(gather, slice) for plan in calls for _, _, gather, _, _ in plan)
    if budget == BUDGET:
        assert cascade.stats["joins"] > 0
    if budget == BUDGET and n > 1:
        # One copy of a prompt per 3 rows: more rows fit the same budget.
        assert cascade.stats["peak_rows"] > copied.stats["peak_rows"]


def test_no_cascade_without_anything_shared(setup, monkeypatch):
    """n = 1 and prompts that share no head: rows hold their prompts as before and the cascade path never runs."""
    model, tok, eos = setup
    calls = []
    monkeypatch.setattr(gqa_attention, "cascade_attention", lambda *a: calls.append(1))
    distinct = [[5 + i] + p[1:] for i, p in enumerate(PROMPTS)]
    TorchEngine(model, tok, eos_token_ids=eos[1]).generate(distinct, n=1, max_new_tokens=4, temperature=0)
    assert not calls
