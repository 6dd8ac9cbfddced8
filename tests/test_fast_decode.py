"""grpo/fast_decode.py: the lean forward computes what transformers' forward computes, on TorchEngine's cache.

Each model is fed the same left-padded prompts (a prefill of several tokens per row, padding in front) and then
several one-token steps, once through transformers' forward (the engine's attention function in place) and once
through LeanDecoder, each on a cache of its own; the logits of every feed and the cached K/V must agree to fp32
round-off. The models cover what the lean path claims: grouped-query attention, q/k/v biases (Qwen2), an o_proj
bias (llama with attention_bias), and rope scaling (llama3 rope type, read from the model's own rotary module).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from grpo import fast_decode  # noqa: E402
from grpo.batch_plan import left_pad  # noqa: E402
from grpo.engine import TorchEngine  # noqa: E402
from grpo.fast_decode import LeanDecoder, unsupported_reason  # noqa: E402
from grpo.gqa_attention import gqa_attention  # noqa: E402
from grpo.kv_cache import new_cache, padded_positions  # noqa: E402
from grpo.packed_linear import packable_dtypes  # noqa: E402
from test_torch_engine import as_loaded_in_bf16, peaked_tiny_llama, teacher_forced_logprobs  # noqa: E402

VOCAB = 300
PROMPTS = [[1, 17, 230, 40, 12, 99, 5, 6, 7], [1, 40, 41, 42], [3, 80, 81, 82, 83, 84]]


def small_model(kind: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if kind == "qwen2":  # q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False))
    elif kind == "llama-bias":  # q/k/v and o_proj biases
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=True))
    else:  # llama3 rope scaling
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}))
    for p in model.parameters():  # random biases too (HF initialises them to zero, which would hide a dropped one)
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def feed_both(model, steps: int = 5):
    """([(logits of each feed (prefill, then `steps` one-token steps), final cache)] for transformers and lean,
    (B, W) True at the cache's real columns)."""
    ids, mask = left_pad(PROMPTS, pad_id=0)
    results = []
    for lean in (None, LeanDecoder(model)):
        cache = new_cache(model, ids.shape[1] + steps)
        feed_ids, feed_mask, positions = ids, mask, padded_positions(mask)
        logits = []
        with torch.inference_mode(), gqa_attention(model):
            for step in range(steps + 1):
                if lean is None:
                    out = model(input_ids=feed_ids, attention_mask=feed_mask, position_ids=positions,
                                past_key_values=cache, use_cache=True).logits[:, -1].float()
                else:
                    out = lean.forward(feed_ids, feed_mask, positions, cache)
                logits.append(out)
                feed_ids = torch.tensor([[(7 * step + 13 * b) % VOCAB] for b in range(len(PROMPTS))])
                feed_mask = torch.cat([feed_mask, torch.ones(len(PROMPTS), 1, dtype=torch.long)], dim=1)
                positions = positions[:, -1:] + 1
        results.append((logits, cache))
    return results, feed_mask[:, :-1].bool()


@pytest.mark.parametrize("kind", ["llama-rope-scaling", "qwen2", "llama-bias"])
def test_lean_forward_equals_transformers(kind):
    model = small_model(kind)
    assert unsupported_reason(model) is None
    ((hf_logits, hf_cache), (lean_logits, lean_cache)), real = feed_both(model)
    for expected, got in zip(hf_logits, lean_logits):
        assert expected.std() > 0.1  # not a degenerate model
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # (Padding columns hold whatever each path computes for a pad token; only real ones are ever read.)
    for expected, got in zip(hf_cache.layers, lean_cache.layers):
        for part in ("keys", "values"):
            torch.testing.assert_close(getattr(got, part).transpose(1, 2)[real],
                                       getattr(expected, part).transpose(1, 2)[real], rtol=1e-5, atol=1e-5)


def test_lean_forward_ignores_padding_columns():
    """Real rows' logits do not depend on what the padding columns hold: replacing the pad token changes nothing."""
    model = small_model("qwen2")
    outs = []
    for pad in (0, 250):
        ids, mask = left_pad(PROMPTS, pad_id=pad)
        cache = new_cache(model, ids.shape[1])
        with torch.inference_mode():
            outs.append(LeanDecoder(model).forward(ids, mask, padded_positions(mask), cache))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_unsupported_models_say_why():
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2))
    assert "architecture GPT2LMHeadModel" in unsupported_reason(gpt2)
    mixed = small_model("qwen2")
    mixed.lm_head.to(torch.bfloat16)
    assert "several dtypes (bfloat16, float32)" in unsupported_reason(mixed)
    with pytest.raises(ValueError, match="cannot run this model: weights of several dtypes"):
        LeanDecoder(mixed)
    assert "no oneDNN float16 matmul" in unsupported_reason(small_model("qwen2"), torch.float16)


BF16 = torch.bfloat16 in packable_dtypes()


@pytest.mark.parametrize("kind", ["llama-rope-scaling", "qwen2", "llama-bias"])
def test_lean_bf16_is_transformers_in_bf16(kind):
    """A bf16 model (on a CPU whose oneDNN has bf16 kernels) runs the lean forward, and its logits and K/V are
    transformers' bf16 ones up to bf16 rounding: bf16 keeps 8 significant bits (0.4% per rounding), and the two
    paths round at different points (fused matmuls, norms), which after three layers gave 0.5-0.9% of the logits'
    scale (3% allowed; a dropped bias or rotary moves them by tens of percent). Elsewhere the model is refused."""
    model = small_model(kind).to(torch.bfloat16)
    if not BF16:
        assert "no oneDNN bfloat16 matmul" in unsupported_reason(model)
        return
    assert unsupported_reason(model) is None
    ((hf_logits, hf_cache), (lean_logits, lean_cache)), real = feed_both(model)
    for expected, got in zip(hf_logits, lean_logits):
        assert got.dtype == torch.float32
        assert (got - expected).abs().max() < 0.03 * expected.abs().max()
    for expected, got in zip(hf_cache.layers, lean_cache.layers):
        for part in ("keys", "values"):
            want, have = (getattr(c, part).transpose(1, 2)[real].float() for c in (expected, got))
            assert getattr(got, part).dtype == torch.bfloat16
            assert (have - want).abs().max() < 0.03 * want.abs().max()


def test_engine_takes_the_lean_path_with_the_same_rollouts(smollm2_tokenizer, monkeypatch):
    """TorchEngine feeds every prefill and step through LeanDecoder when it can, and samples exactly what the
    transformers path samples (log-probs 1e-5, teacher forcing 1e-4)."""
    model = peaked_tiny_llama(len(smollm2_tokenizer)).eval()
    calls = []
    original = fast_decode.LeanDecoder.forward
    monkeypatch.setattr(fast_decode.LeanDecoder, "forward", lambda self, *a: calls.append(1) or original(self, *a))
    kwargs = dict(n=2, max_new_tokens=12, temperature=1.0, seed=5)
    prompts = [[1, 17, 230, 4000, 12, 99, 5, 6, 7], [1, 40, 41, 42], [1, 800, 801, 802, 803, 804]]
    expected = TorchEngine(model, smollm2_tokenizer, lean_decode=False, eos_token_ids=[]).generate(prompts, **kwargs)
    assert not calls
    engine = TorchEngine(model, smollm2_tokenizer, eos_token_ids=[])
    got = engine.generate(prompts, **kwargs)
    assert len(calls) == engine.stats["prefills"] + engine.stats["decode_steps"]
    for e, g in zip(expected, got):
        assert g.completion_ids == e.completion_ids
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(e.logprobs), rtol=0, atol=1e-5)
        assert (torch.tensor(g.logprobs) - teacher_forced_logprobs(model, g, 1.0)).abs().max().item() < 1e-4


def test_engine_compute_dtype_is_the_model_converted(smollm2_tokenizer):
    """TorchEngine(fp32 model, compute_dtype=bf16) samples exactly what the model loaded in bf16 samples (tokens and
    log-probs identical: the same bf16 weights, packed), its log-probs are the bf16 model's under teacher
    forcing within bf16 rounding, and the fp32 module is untouched. Without bf16 kernels the engine refuses."""
    model = peaked_tiny_llama(len(smollm2_tokenizer)).eval()
    if not BF16:
        with pytest.raises(ValueError, match="no kernels"):
            TorchEngine(model, smollm2_tokenizer, compute_dtype=torch.bfloat16)
        return
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(n=2, max_new_tokens=12, temperature=1.0, seed=5)
    prompts = [[1, 17, 230, 4000, 12, 99, 5, 6, 7], [1, 40, 41, 42], [1, 800, 801, 802, 803, 804]]
    got = TorchEngine(model, smollm2_tokenizer, eos_token_ids=[], compute_dtype=torch.bfloat16).generate(prompts,
                                                                                                          **kwargs)
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    converted = as_loaded_in_bf16(model)
    expected = TorchEngine(converted, smollm2_tokenizer, eos_token_ids=[]).generate(prompts, **kwargs)
    fp32 = TorchEngine(model, smollm2_tokenizer, eos_token_ids=[]).generate(prompts, **kwargs)
    assert any(g.completion_ids != f.completion_ids or g.logprobs != f.logprobs for g, f in zip(got, fp32))
    for e, g in zip(expected, got):
        assert (g.completion_ids, g.logprobs) == (e.completion_ids, e.logprobs)
        gap = (torch.tensor(g.logprobs) - teacher_forced_logprobs(converted, g, 1.0)).abs().max().item()
        assert gap < 0.1, gap


def test_engine_compute_dtype_needs_the_lean_forward(smollm2_tokenizer):
    model = peaked_tiny_llama(len(smollm2_tokenizer)).eval()
    with pytest.raises(ValueError, match="compute_dtype=torch.float16: this CPU's oneDNN has no kernels"):
        TorchEngine(model, smollm2_tokenizer, compute_dtype=torch.float16)
    if BF16:
        engine = TorchEngine(model, smollm2_tokenizer, compute_dtype=torch.bfloat16, lean_decode=False)
        with pytest.raises(ValueError, match="LeanDecoder, which cannot run here: lean_decode or pack_weights is off"):
            engine.generate([[1, 2, 3]], max_new_tokens=2)
    # Its own dtype needs nothing: an fp32 model with compute_dtype=fp32 may take transformers' forward.
    TorchEngine(model, smollm2_tokenizer, compute_dtype=torch.float32, lean_decode=False).generate([[1, 2, 3]],
                                                                                                    max_new_tokens=2)


def test_small_decode_attention_stays_on_one_thread(monkeypatch):
    """A one-token step's attention runs on one thread when its layer reads fewer K/V bytes than
    ONE_THREAD_ATTENTION_BYTES, on all of them otherwise, with the same logits either way."""
    model = small_model("qwen2")
    ids, mask = left_pad(PROMPTS, pad_id=0)
    # After the step: 3 rows x 2 K/V heads x (9 + 1) columns x head dim 16, K and V, float32.
    step_bytes = 2 * 3 * 2 * (ids.shape[1] + 1) * 16 * 4
    threads_seen = []
    flash = fast_decode._flash
    monkeypatch.setattr(fast_decode, "_flash",
                        lambda *a, **k: threads_seen.append(torch.get_num_threads()) or flash(*a, **k))
    outputs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for limit, expected in ((step_bytes + 1, 1), (step_bytes, 2)):
            monkeypatch.setattr(fast_decode, "ONE_THREAD_ATTENTION_BYTES", limit)
            cache, lean = new_cache(model, ids.shape[1] + 1), LeanDecoder(model)
            threads_seen.clear()
            with torch.inference_mode():
                lean.forward(ids, mask, padded_positions(mask), cache)
                step_mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=torch.long)], dim=1)
                outputs[limit] = lean.forward(torch.tensor([[5], [6], [7]]), step_mask,
                                              padded_positions(step_mask)[:, -1:], cache)
            assert threads_seen == [expected] * len(model.model.layers)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[step_bytes], outputs[step_bytes + 1])
