"""TorchEngine's continuous batching: waiting rows join the running batch, with the old path's tokens and log-probs.

A tiny random llama (tests/test_torch_engine.py's peaked head) with prompts of 3 to 15 tokens, several sharing a
12-token head (so joiners are prefilled with prefix sharing), and an EOS set chosen from its own completions so rows
finish at different steps; max_batch_tokens fits only a few rows, so rows wait and must join a running batch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from grpo.engine import TorchEngine  # noqa: E402
from test_torch_engine import peaked_tiny_llama, teacher_forced_logprobs  # noqa: E402

HEAD = [1, 17, 230, 4000, 12, 99, 5, 6, 7, 8, 9, 10]
PROMPTS = [HEAD + [50, 51], [1, 40, 41], HEAD + [60], [1, 800, 801, 802, 803, 804, 805, 806],
           HEAD + [50, 52, 53], [3, 4, 5, 6, 7], [1, 900, 901, 902, 903, 904, 905, 906, 907, 908, 909], [2, 2, 9, 11]]
MAX_NEW = 16
BUDGET = 3 * (15 + MAX_NEW)  # three rows of the longest prompt at a time


def eos_for_varied_lengths(completions: list[list[int]]) -> list[int]:
    """Tokens that end rows at different steps: the first new token at position 2, 5, 8, ... of every other row."""
    eos = []
    for i, ids in enumerate(completions[::2]):
        k = 2 + 3 * i
        if k < len(ids) and ids[k] not in ids[:k]:
            eos.append(ids[k])
    return eos


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer):
    """(model, tokenizer, eos ids for greedy, {top_p: eos ids for seeded sampling at n=2})."""
    model = peaked_tiny_llama(len(smollm2_tokenizer)).eval()
    tok = smollm2_tokenizer
    plain = TorchEngine(model, tok, eos_token_ids=[], continuous=False)
    greedy = plain.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=0)
    sampled = {top_p: plain.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, temperature=1.0, top_p=top_p, seed=7)
               for top_p in (0.95, 1.0)}
    return (model, tok, eos_for_varied_lengths([r.completion_ids for r in greedy]),
            {top_p: eos_for_varied_lengths([r.completion_ids for r in rollouts])
             for top_p, rollouts in sampled.items()})


def both_paths(model, tok, eos, share_prefixes: bool = True, **kwargs):
    """(old chunked rollouts, continuous rollouts, the continuous engine) for the same call."""
    old = TorchEngine(model, tok, max_batch_tokens=BUDGET, eos_token_ids=eos, continuous=False,
                      share_prefixes=share_prefixes)
    new = TorchEngine(model, tok, max_batch_tokens=BUDGET, eos_token_ids=eos, share_prefixes=share_prefixes)
    return old.generate(PROMPTS, max_new_tokens=MAX_NEW, **kwargs), \
        new.generate(PROMPTS, max_new_tokens=MAX_NEW, **kwargs), new


def assert_same(old, new, tol: float = 1e-5) -> None:
    assert [r.completion_ids for r in new] == [r.completion_ids for r in old]
    assert [r.finish_reason for r in new] == [r.finish_reason for r in old]
    assert [r.prompt_ids for r in new] == [r.prompt_ids for r in old]
    for a, b in zip(old, new):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < tol


@pytest.mark.parametrize("share_prefixes", [True, False])
def test_greedy_continuous_equals_chunked(setup, share_prefixes):
    model, tok, eos, _ = setup
    old, new, engine = both_paths(model, tok, eos, share_prefixes, temperature=0)
    assert_same(old, new)
    lengths = {len(r.completion_ids) for r in new}
    assert len(lengths) >= 3 and MAX_NEW in lengths  # rows really finish at different steps
    assert engine.stats["joins"] > 0


@pytest.mark.parametrize("top_p", [0.95, 1.0])  # the nucleus race and the two-stage race
def test_seeded_sampling_continuous_equals_chunked(setup, top_p):
    """n = 2: a prompt's samples share one prefill (also when they join a running batch), each its own RNG row."""
    model, tok, _, eos = setup
    old, new, engine = both_paths(model, tok, eos[top_p], n=2, temperature=1.0, top_p=top_p, seed=7)
    assert_same(old, new)
    assert len({len(r.completion_ids) for r in new}) >= 3
    assert engine.stats["joins"] > 0
    assert any(new[2 * i].completion_ids != new[2 * i + 1].completion_ids for i in range(len(PROMPTS)))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_logprobs_match_teacher_forcing(setup, temperature):
    model, tok, greedy_eos, sampled_eos = setup
    engine = TorchEngine(model, tok, max_batch_tokens=BUDGET,
                         eos_token_ids=sampled_eos[0.95] if temperature else greedy_eos)
    rollouts = engine.generate(PROMPTS, n=2, max_new_tokens=MAX_NEW, temperature=temperature, top_p=0.95, seed=7)
    assert engine.stats["joins"] > 0
    for r in rollouts:
        expected = teacher_forced_logprobs(model, r, temperature or 1.0)
        assert (torch.tensor(r.logprobs) - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("share_prefixes", [True, False])
def test_waiting_rows_join_the_running_batch(setup, share_prefixes):
    """Refill happens: prefills into a running batch, and the same rows take fewer decode steps (a fuller batch
    per step) than the chunked path; the batch never holds more rows than the budget allows. (With shared
    prefixes the running rows' own caches are narrower, so a join can admit more rows at once.)"""
    model, tok, eos, _ = setup
    budget = 2 * BUDGET  # six rows of the longest prompt; the chunked path then runs 6 + 2 rows
    old = TorchEngine(model, tok, max_batch_tokens=budget, eos_token_ids=eos, continuous=False,
                      share_prefixes=share_prefixes)
    new = TorchEngine(model, tok, max_batch_tokens=budget, eos_token_ids=eos, share_prefixes=share_prefixes)
    old.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=0)
    new.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=0)
    assert old.stats["joins"] == 0
    assert new.stats["joins"] >= 1 and new.stats["prefills"] == 1 + new.stats["joins"]
    assert new.stats["row_steps"] == old.stats["row_steps"]  # the same work (no finished row lingers here) ...
    assert new.stats["decode_steps"] < old.stats["decode_steps"]  # ... in fewer, fuller steps
    # Every row costs at least (3 + MAX_NEW) tokens of KV buffer: the budget bounds the rows.
    assert new.stats["peak_rows"] <= budget // (3 + MAX_NEW)


def test_a_single_row_over_budget_still_runs(setup):
    model, tok, eos, _ = setup
    engine = TorchEngine(model, tok, max_batch_tokens=1, eos_token_ids=eos)
    old = TorchEngine(model, tok, max_batch_tokens=1, eos_token_ids=eos, continuous=False)
    assert_same(old.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=0),
                engine.generate(PROMPTS, max_new_tokens=MAX_NEW, temperature=0))
    assert engine.stats["peak_rows"] == 1 and engine.stats["joins"] == 0
