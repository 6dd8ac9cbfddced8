"""TorchEngine: log-probs vs teacher forcing, greedy vs HF generate, stops, seeds, chunking, modes, FSDP2.

Run as a script under torchrun, this file is the FSDP2 worker that `test_fsdp2_two_ranks` launches.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from grpo.batch_plan import length_buckets, prefix_groups, rows_that_fit  # noqa: E402
from grpo.engine import Rollout, TorchEngine  # noqa: E402
from grpo.guide import Steer  # noqa: E402
from grpo.kv_cache import padded_positions  # noqa: E402
from grpo.models import tiny_llama  # noqa: E402
from grpo.sampling import row_generators, sample_next_tokens  # noqa: E402

CHATS = ["Hi", "Name the capital of France in one word.",
         "Find every person entity in the sentence and list them: West Indian all-rounder Phil Simmons took four "
         "for 38 on Friday as Leicestershire beat Somerset by an innings and 39 runs in two days."]


def chat_prompts(tok) -> list[list[int]]:
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
             for c in CHATS]
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def teacher_forced_logprobs(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each completion token from one unpadded forward over prompt + completion."""
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(rollout.prompt_ids) - 1:-1].float()
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(rollout.completion_ids)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def smol_greedy(smollm2):
    model, tok = smollm2
    prompts = chat_prompts(tok)
    return prompts, TorchEngine(model, tok).generate(prompts, n=1, max_new_tokens=24, temperature=0)


def peaked_tiny_llama(vocab_size: int):
    """tiny_llama with an untied random output head scaled to logits of std ~4.

    The stock tiny model ties its head to the embeddings, so greedy decoding just repeats the last prompt token and
    sampling sees an almost uniform distribution over 49k tokens, where fp32 rounding differences between batch
    shapes can move an inverse-CDF pick to a neighbouring token. A peaked head gives varied greedy text and
    sampling that is stable under such rounding.
    """
    model = tiny_llama(vocab_size=vocab_size, seed=0)
    gen = torch.Generator().manual_seed(1)
    hidden = model.config.hidden_size
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, hidden, generator=gen) * 4 / hidden**0.5)
    model.config.tie_word_embeddings = False
    return model


def as_loaded_in_bf16(model):
    """A bf16 copy of `model` as from_pretrained(dtype=bf16) would load it: rotary frequencies stay fp32 (.to()
    alone would round them too)."""
    loaded = copy.deepcopy(model).to(torch.bfloat16)
    loaded.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq.clone()
    return loaded


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer):
    """(model, tokenizer, prompts of lengths 9/4/6): a random llama over SmolLM2's vocabulary, eval mode."""
    model = peaked_tiny_llama(len(smollm2_tokenizer)).eval()
    prompts = [[1, 17, 230, 4000, 12, 99, 5, 6, 7], [1, 40, 41, 42], [1, 800, 801, 802, 803, 804]]
    return model, smollm2_tokenizer, prompts


# ---------------------------------------------------------------- SmolLM2: exactness against independent paths

def test_logprobs_match_teacher_forcing(smollm2):
    model, tok = smollm2
    prompts = chat_prompts(tok)
    assert len({len(p) for p in prompts}) == 3  # different lengths: left padding is exercised
    rollouts = TorchEngine(model, tok).generate(prompts, n=2, max_new_tokens=24, temperature=0.7, top_p=0.9, seed=0)
    assert len(rollouts) == 6
    for i, r in enumerate(rollouts):
        assert r.prompt_ids == prompts[i // 2]
        assert len(r.logprobs) == len(r.completion_ids) >= 1
        expected = teacher_forced_logprobs(model, r, 0.7)
        assert (torch.tensor(r.logprobs) - expected).abs().max().item() < 1e-4


def test_greedy_equals_hf_generate(smollm2, smol_greedy):
    model, tok = smollm2
    prompts, rollouts = smol_greedy
    for p, r in zip(prompts, rollouts):
        with torch.no_grad():  # one unpadded prompt at a time: HF's own path, no batching effects
            out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 do_sample=False, max_new_tokens=24, pad_token_id=tok.pad_token_id)
        assert out[0, len(p):].tolist() == r.completion_ids
        stopped_on_eos = r.completion_ids[-1] == tok.eos_token_id
        assert r.finish_reason == ("stop" if stopped_on_eos else "length")
        assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True)
    # greedy log-probs are scored at temperature 1
    assert max((torch.tensor(r.logprobs) - teacher_forced_logprobs(model, r, 1.0)).abs().max().item()
               for r in rollouts) < 1e-4


def test_stop_strings_end_completion_right_after_the_string(smollm2, smol_greedy):
    model, tok = smollm2
    prompts, greedy = smol_greedy
    full = greedy[2].completion_ids
    assert len(full) >= 8
    # A stop string taken from the middle of the unstopped greedy text; it may end inside a token.
    text = tok.decode(full, skip_special_tokens=False)
    cut = len(tok.decode(full[:5], skip_special_tokens=False))
    stop = text[cut - 4:cut + 2]
    rollouts = TorchEngine(model, tok).generate(prompts, max_new_tokens=24, temperature=0,
                                                stop=["</entity>", stop])
    for g, r in zip(greedy, rollouts):
        # Expected by brute force: the shortest prefix of the unstopped completion whose full decode contains it.
        k = next((k for k in range(1, len(g.completion_ids) + 1)
                  if stop in tok.decode(g.completion_ids[:k], skip_special_tokens=False)), None)
        if k is None:
            assert r.completion_ids == g.completion_ids and r.finish_reason == g.finish_reason
        else:
            assert r.completion_ids == g.completion_ids[:k] and r.finish_reason == "stop"
    assert stop in rollouts[2].text and len(rollouts[2].completion_ids) < len(full)


def test_top_p_near_zero_is_greedy(smollm2, smol_greedy):
    model, tok = smollm2
    prompts, greedy = smol_greedy
    rollouts = TorchEngine(model, tok).generate(prompts, max_new_tokens=24, temperature=0.7, top_p=1e-6, seed=5)
    assert [r.completion_ids for r in rollouts] == [g.completion_ids for g in greedy]


# ---------------------------------------------------------------- sampling arithmetic

def test_sampling_frequencies_follow_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 20000
    logits = probs.log().expand(rows, 4)
    tokens, logprobs = sample_next_tokens(logits, 1.0, 0.7, row_generators(0, list(range(rows))))
    # Mass before token 1 is .5 < .7 (kept), before token 2 is .8 >= .7 (dropped): nucleus {0, 1} renormalised to
    # .5/.8 = .625 and .3/.8 = .375. Binomial sd = sqrt(.625 * .375 / 20000) = .0034; allow 4 sd.
    counts = torch.bincount(tokens, minlength=4).float() / rows
    assert counts[2:].tolist() == [0.0, 0.0]
    assert abs(counts[0].item() - 0.625) < 4 * 0.0034
    # log-probs are before truncation: log .5 or log .3
    expected = torch.where(tokens == 0, math.log(0.5), math.log(0.3))
    assert torch.allclose(logprobs, expected, atol=1e-6)
    # Temperature 2 flattens to p^(1/2) / sum = [.379, .294, .208, .120] with no truncation; sd <= .0035.
    flat = probs.sqrt() / probs.sqrt().sum()
    tokens, _ = sample_next_tokens(logits, 2.0, 1.0, row_generators(1, list(range(rows))))
    counts = torch.bincount(tokens, minlength=4).float() / rows
    assert (counts - flat).abs().max().item() < 4 * 0.0035


def test_two_stage_race_draws_every_token_at_its_probability():
    # 3 candidates hold .6 of the mass; the other 7 tokens .4, so the tail branch runs for ~40% of the rows.
    probs = torch.tensor([0.1, 0.3, 0.08, 0.2, 0.07, 0.06, 0.1, 0.05, 0.03, 0.01])
    rows = 40000
    tokens, logprobs = sample_next_tokens(probs.log().expand(rows, 10), 1.0, 1.0,
                                          row_generators(7, list(range(rows))), candidates=3)
    # Binomial sd = sqrt(p (1 - p) / 40000) <= .0023 for every token; allow 4 sd.
    counts = torch.bincount(tokens, minlength=10).float() / rows
    assert (counts - probs).abs().max().item() < 4 * 0.0023
    assert torch.allclose(logprobs, probs.log()[tokens], atol=1e-6)


def test_a_rows_sample_depends_only_on_its_logits_and_generator():
    logits = torch.randn(12, 300) * 2
    logits[3] = torch.full((300,), -50.0).index_fill_(0, torch.tensor([5]), 0.0)  # one token holds all the mass
    together, _ = sample_next_tokens(logits, 1.0, 1.0, row_generators(3, list(range(12))), candidates=8)
    alone = [sample_next_tokens(logits[r:r + 1], 1.0, 1.0, row_generators(3, [r]), candidates=8)[0].item()
             for r in range(12)]
    assert together.tolist() == alone
    assert together[3].item() == 5


def test_rows_that_fit_respects_the_budget():
    # widths 10+6 = 16 -> 40 // 16 = 2 rows; 5+6 = 11 -> 40 // 11 = 3 rows
    assert rows_that_fit(0, 10, 6, 40) == 2
    assert rows_that_fit(0, 5, 6, 40) == 3
    # a row wider than the budget still runs alone in an empty batch
    assert rows_that_fit(0, 50, 6, 40) == 1
    # into a running batch, only the room left: 1 row beside 1, none beside 2 (nothing is forced in)
    assert rows_that_fit(1, 10, 6, 40) == 1
    assert rows_that_fit(2, 10, 6, 40) == 0
    assert rows_that_fit(1, 50, 6, 40) == 0


def test_padded_positions_count_real_tokens_only():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 1]])  # left pad; last row has an inner gap
    assert padded_positions(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 2]]


def test_prefix_groups_by_hand():
    head = [1] * 40
    a1, a2 = head + [2] * 140 + [3, 4, 5], head + [2] * 140 + [6, 7]   # pairs sharing 180 tokens, all sharing 40
    b1, b2 = head + [9] * 140 + [3], head + [9] * 140 + [8, 8]
    lone = [5, 5, 5]
    groups = prefix_groups([a1, b1, lone, a2, b2])
    # 2 pairs saving 180 each beat one group of 4 saving 3 * 40; the loner shares nothing
    assert sorted(groups) == [(0, [2]), (180, [0, 3]), (180, [1, 4])]
    assert prefix_groups([head + [1], head + [2], head + [3]]) == [(40, [0, 1, 2])]
    # an identical prompt still keeps one token to feed after the prefix
    assert prefix_groups([head, head]) == [(39, [0, 1])]
    # saving fewer than min_saved tokens is not worth a second pass
    assert prefix_groups([[1, 2, 3], [1, 2, 4]], min_saved=8) == [(0, [0]), (0, [1])]


def test_prefix_groups_invariants():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        prompts = [torch.randint(0, 3, (int(torch.randint(1, 30, (), generator=gen)),), generator=gen).tolist()
                   for _ in range(int(torch.randint(1, 12, (), generator=gen)))]
        groups = prefix_groups(prompts, min_saved=2)
        assert sorted(i for _, members in groups for i in members) == list(range(len(prompts)))
        for shared, members in groups:
            assert all(shared < len(prompts[i]) for i in members)
            assert len({tuple(prompts[i][:shared]) for i in members}) == 1


def test_shared_prefix_prefill_changes_nothing_but_the_work(smollm2):
    """Few-shot prompts that share a system prompt and examples: the same greedy text and log-probs (which also
    match teacher forcing) with and without prefix sharing, and with sharing the prefill feeds fewer tokens."""
    model, tok = smollm2
    shots = "Example: Peter Blackburn BRUSSELS 1996-08-22\n<entity>Peter Blackburn</entity>\n"
    contents = [f"{shots}Find the person entities: {s}" for s in
                ("EU rejects German call to boycott British lamb .", "Germany 's representative said on Wednesday .",
                 "Fischler proposed EU-wide measures .")] + ["Hi"]
    texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
             for c in contents]
    prompts = [tok(t, add_special_tokens=False).input_ids for t in texts]
    fed = []
    shared_engine = TorchEngine(model, tok)
    original = shared_engine._logits
    shared_engine._logits = lambda ids, *args: fed.append(ids.numel()) or original(ids, *args)
    shared = shared_engine.generate(prompts, n=2, max_new_tokens=12, temperature=0)
    plain = TorchEngine(model, tok, share_prefixes=False).generate(prompts, n=2, max_new_tokens=12, temperature=0)
    assert [r.completion_ids for r in shared] == [r.completion_ids for r in plain]
    for s, p in zip(shared, plain):
        assert max(abs(a - b) for a, b in zip(s.logprobs, p.logprobs)) < 1e-4
        assert (torch.tensor(s.logprobs) - teacher_forced_logprobs(model, s, 1.0)).abs().max().item() < 1e-4
    # Prefill = group prefixes, then suffixes, padded: 2 x 60 + 4 x 15 tokens (3 prompts share 60, "Hi" shares
    # nothing worth a pass), against 4 x 75 without sharing.
    assert len(fed) == 2 + 11 and sum(fed[:2]) <= 0.6 * len(prompts) * max(len(p) for p in prompts)


# ---------------------------------------------------------------- tiny llama: seeds, chunking, EOS, modes

def test_prefix_sharing_equals_plain_prefill_on_tiny(tiny):
    """Groups, loners and a 1-token prompt (which turns sharing off for its chunk) against share_prefixes=False."""
    model, tok, _ = tiny
    head = [1, 17, 230, 4000, 12, 99, 5, 6, 7, 8, 9, 10]
    prompts = [head + [50, 51], head + [60], head + [50, 52, 53], [1, 800, 801], [7]]
    for batch in (prompts[:4], prompts):
        shared = TorchEngine(model, tok).generate(batch, n=2, max_new_tokens=8, temperature=1.0, seed=3)
        plain = TorchEngine(model, tok, share_prefixes=False).generate(batch, n=2, max_new_tokens=8,
                                                                       temperature=1.0, seed=3)
        assert [r.completion_ids for r in shared] == [r.completion_ids for r in plain]
        for s, p in zip(shared, plain):
            assert max(abs(a - b) for a, b in zip(s.logprobs, p.logprobs)) < 1e-5
            assert all(math.isfinite(x) for x in s.logprobs)


def test_length_buckets_minimise_padded_tokens_plus_overhead():
    """Against every split of the positions into contiguous runs (brute force over the 2^(n-1) cut sets)."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 9, (), generator=gen)),), generator=gen).tolist()
        overhead = int(torch.randint(0, 50, (), generator=gen))

        def cost(runs):
            return sum(len(run) * max(lengths[i] for i in run) + overhead for run in runs)
        best = math.inf
        for cuts in range(2 ** (len(lengths) - 1)):
            bounds = [0] + [i + 1 for i in range(len(lengths) - 1) if cuts >> i & 1] + [len(lengths)]
            best = min(best, cost([range(a, b) for a, b in zip(bounds, bounds[1:])]))
        runs = length_buckets(lengths, overhead)
        assert [i for run in runs for i in run] == list(range(len(lengths)))
        assert cost(runs) == best
    assert length_buckets([30, 29, 3, 2], overhead=10) == [range(0, 2), range(2, 4)]  # 70 + 16 < 104, 95, 130
    assert length_buckets([30, 29, 3, 2], overhead=1000) == [range(0, 4)]


def test_prefill_in_length_runs_changes_nothing_but_the_work(tiny):
    """Prompts of very different lengths, with and without shared prefixes: prefilled in several runs (overhead 0)
    they give the same samples and log-probs as in one padded batch (and as teacher forcing), and feed fewer
    tokens."""
    model, tok, _ = tiny
    head = list(range(100, 112))
    prompts = [head + list(range(200, 240)), head + list(range(300, 335)), head + [50, 51], head + [60],
               list(range(400, 430)), [1, 800, 801]]
    for share in (True, False):
        fed = {}
        results = {}
        for overhead in (0, 10**9):
            engine = TorchEngine(model, tok, share_prefixes=share, prefill_run_overhead=overhead)
            original = engine._logits
            fed[overhead] = []
            engine._logits = lambda ids, *args, o=overhead, f=original: fed[o].append(ids.numel()) or f(ids, *args)
            results[overhead] = engine.generate(prompts, n=2, max_new_tokens=8, temperature=1.0, seed=5)
        many, one = results[0], results[10**9]
        assert [r.completion_ids for r in many] == [r.completion_ids for r in one]
        for a, b in zip(many, one):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5
            assert (torch.tensor(a.logprobs) - teacher_forced_logprobs(model, a, 1.0)).abs().max().item() < 1e-4
        prefill_passes = 2 if share else 1
        assert len(fed[0]) - len(fed[10**9]) >= 2  # more than one run of suffixes
        assert sum(fed[0][:-7]) < sum(fed[10**9][:prefill_passes])  # the 7 decode steps feed as many tokens


def test_seeded_sampling_is_deterministic_and_chunking_independent(tiny):
    model, tok, prompts = tiny
    kwargs = dict(n=3, max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = TorchEngine(model, tok).generate(prompts, seed=11, **kwargs)
    b = TorchEngine(model, tok).generate(prompts, seed=11, **kwargs)
    one_row_chunks = TorchEngine(model, tok, max_batch_tokens=1).generate(prompts, seed=11, **kwargs)
    other = TorchEngine(model, tok).generate(prompts, seed=12, **kwargs)
    ids = [r.completion_ids for r in a]
    assert ids == [r.completion_ids for r in b] == [r.completion_ids for r in one_row_chunks]
    assert ids != [r.completion_ids for r in other]
    assert [r.prompt_ids for r in a] == [p for p in prompts for _ in range(3)]
    assert len({tuple(i) for i in ids[:3]}) > 1  # the n samples of one prompt differ
    for x, y in zip(a, one_row_chunks):
        assert max(abs(u - v) for u, v in zip(x.logprobs, y.logprobs)) < 1e-5


def test_budget_chunking_matches_one_chunk_for_greedy(tiny):
    model, tok, prompts = tiny
    one = TorchEngine(model, tok, max_batch_tokens=10**6).generate(prompts, n=2, max_new_tokens=12, temperature=0)
    # (9 + 12) * 1 <= 25 < (9 + 12) * 2: one row per chunk for the longest prompt, two for the others
    many = TorchEngine(model, tok, max_batch_tokens=25).generate(prompts, n=2, max_new_tokens=12, temperature=0)
    assert [r.completion_ids for r in one] == [r.completion_ids for r in many]
    assert all(r.finish_reason == "length" and len(r.completion_ids) == 12 for r in one)


def test_eos_stops_rows_and_compaction_keeps_the_rest_exact(tiny):
    model, tok, prompts = tiny
    base = TorchEngine(model, tok, eos_token_ids=[]).generate(prompts, max_new_tokens=12, temperature=0)
    # EOS := an early greedy token of the longest prompt's row, so the row that forces the most padding finishes
    # first and the others continue in a compacted, left-trimmed batch.
    first = base[0].completion_ids
    eos = next(t for j, t in enumerate(first) if j >= 1 and t not in first[:j])
    engine = TorchEngine(model, tok, eos_token_ids=[eos])
    rollouts = engine.generate(prompts, max_new_tokens=12, temperature=0)
    for g, r in zip(base, rollouts):
        if eos in g.completion_ids:
            k = g.completion_ids.index(eos) + 1
            assert r.completion_ids == g.completion_ids[:k] and r.finish_reason == "stop"
        else:
            assert r.completion_ids == g.completion_ids and r.finish_reason == "length"
        assert (torch.tensor(r.logprobs) - teacher_forced_logprobs(model, r, 1.0)).abs().max().item() < 1e-4
    assert rollouts[0].finish_reason == "stop"
    assert any(len(r.completion_ids) > len(rollouts[0].completion_ids) for r in rollouts[1:])
    ignored = engine.generate(prompts, max_new_tokens=12, temperature=0, ignore_eos=True)
    assert [r.completion_ids for r in ignored] == [g.completion_ids for g in base]


def test_guide_forces_tokens_then_sampling_resumes_as_from_the_longer_prompt(tiny):
    model, tok, prompts = tiny
    base = TorchEngine(model, tok, eos_token_ids=[]).generate(prompts, max_new_tokens=12, temperature=0)
    forced = [5, 6, 7]
    calls = []

    def guide(prompt_index: int, ids: list[int]):
        calls.append((prompt_index, len(ids)))
        if prompt_index == 0 and len(ids) == 3:
            return Steer(forced, stop=False)       # then go on sampling
        if prompt_index == 2 and len(ids) == 2:
            return Steer(forced[:2], stop=True, replace=True)  # in place of the newest token, then stop
        if prompt_index == 1 and len(ids) == 5:
            return Steer(stop=True)                # stop right here
        return None

    engine = TorchEngine(model, tok, eos_token_ids=[], continuous=True)
    guided = engine.generate(prompts, max_new_tokens=12, temperature=0, guide=guide)
    # Row 0: 3 own tokens, the forced 3, then greedy from prompt + those 6, i.e. what a second call continues.
    head = base[0].completion_ids[:3] + forced
    resumed = TorchEngine(model, tok, eos_token_ids=[]).generate([prompts[0] + head], max_new_tokens=6,
                                                                   temperature=0)[0]
    assert guided[0].completion_ids == head + resumed.completion_ids and guided[0].finish_reason == "length"
    assert guided[2].completion_ids == base[2].completion_ids[:1] + forced[:2] and guided[2].finish_reason == "stop"
    assert guided[1].completion_ids == base[1].completion_ids[:5] and guided[1].finish_reason == "stop"
    # Forced tokens carry the model's own log-probs; `overridden` counts those unlike the greedy pick they replaced.
    for r in guided:
        assert (torch.tensor(r.logprobs) - teacher_forced_logprobs(model, r, 1.0)).abs().max().item() < 1e-4
    picks = [base[0].completion_ids[3]] + resumed_picks(model, prompts[0], head)[:2]
    assert guided[0].overridden == sum(p != f for p, f in zip(picks, forced))
    assert guided[1].overridden == 0
    assert guided[2].overridden == (base[2].completion_ids[1] != forced[0]) + (resumed_picks(
        model, prompts[2], base[2].completion_ids[:1] + forced[:1], at=1)[0] != forced[1])
    # The guide is not asked while a row's forced tokens are being fed.
    assert not [n for p, n in calls if p == 0 and 4 <= n <= 5]


def resumed_picks(model, prompt: list[int], head: list[int], at: int = 3) -> list[int]:
    """The greedy tokens after completion positions at, at + 1, … of head (teacher forcing on prompt + head)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + head])).logits[0]
    return [int(logits[len(prompt) + j].argmax()) for j in range(at, len(head))]


def test_model_modes_and_requires_grad_are_untouched(tiny):
    model, tok, prompts = tiny
    greedy_eval = TorchEngine(model, tok).generate(prompts, max_new_tokens=8, temperature=0)
    train_model = peaked_tiny_llama(len(tok))
    for layer in train_model.model.layers:  # dropout that would change outputs if train mode leaked in
        layer.self_attn.attention_dropout = 0.5
    train_model.train()
    train_model.model.layers[1].eval()
    train_model.model.embed_tokens.weight.requires_grad_(False)
    before = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in train_model.modules()]
    engine = TorchEngine(train_model, tok)
    out = engine.generate(prompts, max_new_tokens=8, temperature=0)
    after = [(m.training, [p.requires_grad for p in m.parameters(recurse=False)]) for m in train_model.modules()]
    assert before == after
    assert [r.completion_ids for r in out] == [r.completion_ids for r in greedy_eval]
    assert train_model.config._attn_implementation == "sdpa"  # the generation-time attention swap is undone
    engine.update_weights(train_model)
    with pytest.raises(ValueError, match="different module"):
        engine.update_weights(model)


def test_bad_arguments_raise_clear_errors(tiny):
    model, tok, prompts = tiny
    engine = TorchEngine(model, tok)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []])
    with pytest.raises(ValueError, match="top_p"):
        engine.generate(prompts, top_p=0.0)
    with pytest.raises(ValueError, match="n must be"):
        engine.generate(prompts, n=0)
    assert engine.generate([], n=4) == []


# ---------------------------------------------------------------- FSDP2 under torchrun (gloo, CPU, 2 ranks)

RANK_PROMPTS = {0: ([[1, 5, 9, 13]], 3), 1: ([[1, 2, 3], [7, 8, 9, 10, 11]], 12)}  # rank -> (prompts, max_new)
FSDP_SEED = 7


def _fsdp_worker(out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from grpo.distributed import cleanup
    from grpo.models import load_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = load_tokenizer("smollm2-135m-instruct")
    model = peaked_tiny_llama(len(tok))
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.train()
    engine = TorchEngine(model, tok, eos_token_ids=[])
    prompts, max_new = RANK_PROMPTS[rank]
    first = engine.generate(prompts, n=2, max_new_tokens=max_new, temperature=1.0, seed=FSDP_SEED)
    # Rank 0 has nothing to do this round but must still take part in the unshard collective.
    engine.generate([] if rank == 0 else prompts, n=1, max_new_tokens=4, seed=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    after_step = engine.generate(prompts, n=2, max_new_tokens=max_new, temperature=1.0, seed=FSDP_SEED)
    report = {"first": [[r.completion_ids, r.logprobs, r.finish_reason] for r in first],
              "after_step_logprobs": [r.logprobs for r in after_step],
              "training": model.training,
              "all_dtensor": all(isinstance(p, DTensor) for p in model.parameters())}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
    cleanup()


def test_fsdp2_two_ranks(tmp_path, smollm2_tokenizer):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = TorchEngine(peaked_tiny_llama(len(smollm2_tokenizer)), smollm2_tokenizer,
                            eos_token_ids=[])
    for rank, (prompts, max_new) in RANK_PROMPTS.items():
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        expected = reference.generate(prompts, n=2, max_new_tokens=max_new, temperature=1.0, seed=FSDP_SEED)
        assert [c for c, _, _ in report["first"]] == [r.completion_ids for r in expected]
        assert all(len(c) == max_new and f == "length" for c, _, f in report["first"])
        for (_, lp, _), r in zip(report["first"], expected):
            assert max(abs(a - b) for a, b in zip(lp, r.logprobs)) < 1e-5
        # The optimizer step changed the sharded weights and generation saw the change.
        assert report["after_step_logprobs"] != [lp for _, lp, _ in report["first"]]
        assert report["training"] is True and report["all_dtensor"] is True


if __name__ == "__main__":
    _fsdp_worker(sys.argv[1])
