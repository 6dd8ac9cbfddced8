"""grpo/logprobs.py: chunked token log-probs / entropies against hand values and the naive formula."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grpo.logprobs import reference_token_logprobs, token_entropy, token_logprobs, token_logprobs_and_entropy


def naive_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    # The textbook expression the chunked function avoids materialising (in float64): the independent reference.
    return reference_token_logprobs(logits.double(), tokens, temperature)


def test_hand_example_with_temperature():
    # logits [0, ln 3] -> softmax [1/4, 3/4]: log p(token 1) = ln .75 = -0.287682, log p(token 0) = ln .25.
    # Temperature 2 on logits [0, 2 ln 3] divides back to [0, ln 3], so it must give the same numbers.
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, math.log(3)]]])
    tokens = torch.tensor([[1, 0]])
    expected = torch.tensor([[math.log(0.75), math.log(0.25)]])
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    torch.testing.assert_close(token_logprobs(2 * logits, tokens, temperature=2.0), expected)
    # and temperature 1 on the doubled logits is a different distribution: [1/10, 9/10]
    torch.testing.assert_close(token_logprobs(2 * logits, tokens), torch.tensor([[math.log(0.9), math.log(0.1)]]))


def test_entropy_hand_example():
    # [0, 0] -> uniform over 2: H = ln 2 = 0.693147.  [0, ln 3] -> [1/4, 3/4]:
    # H = -(.25 ln .25 + .75 ln .75) = .25*1.386294 + .75*0.287682 = 0.346574 + 0.215762 = 0.562335.
    # A -inf logit is a zero-probability entry and must add 0 (not nan): [0, ln 3, -inf] -> 0.562335.
    logits = torch.tensor([[[0.0, 0.0, -math.inf], [0.0, math.log(3), -math.inf]]])
    torch.testing.assert_close(token_entropy(logits), torch.tensor([[math.log(2), 0.562335]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(token_entropy(4 * logits, temperature=4.0),
                               torch.tensor([[math.log(2), 0.562335]]), atol=1e-6, rtol=0)


def test_entropy_matches_categorical_and_has_no_graph():
    logits = torch.randn(3, 5, 11, requires_grad=True)
    h = token_entropy(logits, temperature=0.7, chunk_size=4)
    assert not h.requires_grad
    reference = torch.distributions.Categorical(logits=logits.detach() / 0.7).entropy()
    torch.testing.assert_close(h, reference, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 6), V=st.integers(2, 40), chunk=st.integers(1, 20),
       temperature=st.floats(0.25, 3.0), shift=st.booleans(), masked=st.booleans(), seed=st.integers(0, 2**16))
def test_logprobs_and_entropy_in_one_walk(B, T, V, chunk, temperature, shift, masked, seed):
    # The fused pair equals the two functions: log-probs and their gradient exactly (same arithmetic), entropies
    # against torch.distributions.Categorical (an independent formula), also with -inf (masked) vocabulary entries
    # in some rows, where H = lse - sum p z meets 0 * -inf and must fall back to the definition.
    gen = torch.Generator().manual_seed(seed)
    raw = 3 * torch.randn(B, T + 1, V, generator=gen, dtype=torch.float64)
    if masked:
        raw[torch.rand(B, T + 1, V, generator=gen) < 0.3] = -math.inf
        raw[..., 0] = 0.0  # every row keeps one finite entry
    logits = (raw[:, :-1] if shift else raw[:, 1:].contiguous()).float().requires_grad_(True)
    tokens = torch.zeros(B, T, dtype=torch.long)  # entry 0 is finite in every row
    logp, entropy = token_logprobs_and_entropy(logits, tokens, temperature, chunk_size=chunk)
    assert not entropy.requires_grad and entropy.shape == (B, T)
    reference = torch.distributions.Categorical(logits=logits.detach().double() / temperature).entropy()
    torch.testing.assert_close(entropy.double(), reference, atol=1e-5, rtol=1e-5)
    assert torch.equal(logp, token_logprobs(logits, tokens, temperature, chunk_size=chunk))
    weights = torch.randn(B, T, generator=gen)
    fused_grad, = torch.autograd.grad((logp * weights).sum(), logits)
    plain_grad, = torch.autograd.grad((token_logprobs(logits, tokens, temperature, chunk) * weights).sum(), logits)
    assert torch.equal(fused_grad, plain_grad)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 1.7])
def test_gradcheck_float64(temperature):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 5))
    # chunk_size 3 puts chunk borders inside and across batch rows
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x, tokens, temperature, chunk_size=3), (logits,))


def test_gradcheck_on_non_contiguous_shifted_logits():
    # The trainer passes logits[:, :-1] (not viewable as [B*T, V]); chunks must then stay inside batch rows.
    torch.manual_seed(1)
    full = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 5, (3, 5))
    assert torch.autograd.gradcheck(lambda x: token_logprobs(x[:, :-1], tokens, 0.8, chunk_size=2), (full,))
    torch.testing.assert_close(token_logprobs(full[:, :-1], tokens, 0.8, chunk_size=2),
                               naive_logprobs(full[:, :-1], tokens, 0.8))


def test_gradient_equals_onehot_minus_softmax_over_temperature():
    # d logp / d z_v = (1[v = token] - softmax(z / T)_v) / T, checked against that closed form.
    z = torch.tensor([[[1.0, -0.5, 2.0]]], dtype=torch.float64, requires_grad=True)
    token_logprobs(z, torch.tensor([[2]]), temperature=0.5).sum().backward()
    p = torch.exp(z.detach() / 0.5) / torch.exp(z.detach() / 0.5).sum()
    expected = (torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) - p) / 0.5
    torch.testing.assert_close(z.grad, expected)


def test_bf16_logits_upcast_per_chunk():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 50).bfloat16().requires_grad_()
    tokens = torch.randint(0, 50, (2, 4))
    out = token_logprobs(logits, tokens, 0.9, chunk_size=3)
    assert out.dtype == torch.float32
    # the reference sees the same bf16 values, so only float32-vs-float64 round-off separates them
    torch.testing.assert_close(out.double(), naive_logprobs(logits.detach(), tokens, 0.9), atol=1e-5, rtol=0)
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1.0), (torch.float32, 0.7), (torch.bfloat16, 1.0),
                                                 (torch.bfloat16, 0.7)])
def test_gradient_values_in_each_backward_path(dtype, temperature):
    # float32 logits build the gradient in place (a subtraction at T = 1, a scaling otherwise); lower precisions in
    # a float32 scratch rounded once. Each must give (1[v = token] - softmax(z / T)) * upstream / T, here in float64
    # from the same (rounded) logits; bf16 keeps 8 bits, so it is held to half a bf16 step of the largest entry.
    gen = torch.Generator().manual_seed(11)
    logits = (2 * torch.randn(3, 9, 40, generator=gen)).to(dtype).requires_grad_()
    tokens = torch.randint(0, 40, (3, 9), generator=gen)
    upstream = torch.randn(3, 9, generator=gen)
    (grad,) = torch.autograd.grad((token_logprobs(logits, tokens, temperature, chunk_size=4) * upstream).sum(), logits)
    expected = torch.softmax(logits.detach().double() / temperature, -1).neg_()
    expected.scatter_add_(-1, tokens[..., None], torch.ones(3, 9, 1, dtype=torch.float64))
    expected *= upstream.double()[..., None] / temperature
    assert grad.dtype == dtype
    atol = 1e-6 if dtype == torch.float32 else float(expected.abs().max()) * 2.0 ** -9
    torch.testing.assert_close(grad.double(), expected, rtol=0, atol=atol)


def test_saves_no_vocab_sized_tensor_besides_the_logits():
    # Count bytes autograd keeps for backward. The naive path keeps a [B, T, V] float32 log-softmax; ours
    # keeps only the logits (a reference, no copy) plus O(B*T) tensors.
    B, T, V = 2, 8, 1000
    logits = torch.randn(B, T, V, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))

    def saved_bytes(fn) -> int:
        seen: list[torch.Tensor] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t) or t, lambda t: t):
            fn()
        return sum(t.numel() * t.element_size() for t in seen if t.data_ptr() != logits.data_ptr())

    ours = saved_bytes(lambda: token_logprobs(logits, tokens))
    naive = saved_bytes(lambda: torch.log_softmax(logits / 1.0, -1).gather(-1, tokens[..., None]))
    assert naive >= B * T * V * 4          # the full float32 log-softmax
    assert ours <= B * T * 16              # tokens (int64) + one logsumexp (float32) per row


def test_bad_inputs_raise_clear_errors():
    logits = torch.randn(1, 2, 4)
    with pytest.raises(ValueError, match="token ids must lie in"):
        token_logprobs(logits, torch.tensor([[0, 4]]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.tensor([[0, 1]]), temperature=0.0)
    with pytest.raises(ValueError, match="tokens shape"):
        token_logprobs(logits, torch.tensor([[0, 1, 2]]))
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        token_entropy(torch.randn(2, 4))


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 6), V=st.integers(2, 40), chunk=st.integers(1, 20),
       temperature=st.floats(0.25, 3.0), shift=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_naive_log_softmax(B, T, V, chunk, temperature, shift, seed):
    gen = torch.Generator().manual_seed(seed)
    raw = 3 * torch.randn(B, T + 1, V, generator=gen)
    logits = raw[:, :-1] if shift else raw[:, 1:].contiguous()
    tokens = torch.randint(0, V, (B, T), generator=gen)
    out = token_logprobs(logits, tokens, temperature, chunk_size=chunk)
    torch.testing.assert_close(out.double(), naive_logprobs(logits, tokens, temperature), atol=1e-5, rtol=0)


def test_default_cpu_chunks_are_16_mib_and_exact():
    from grpo.logprobs import default_chunk_rows

    assert default_chunk_rows(torch.empty(1, 1, 49152)) == 85  # floor(16 MiB / (49152 * 4 B))
    assert default_chunk_rows(torch.empty(1, 1, 152064)) == 27
    assert default_chunk_rows(torch.empty(1, 1, 10**8)) == 1   # a huge vocabulary still gets one row per chunk
    # 3 x 70 = 210 rows over a 60k vocabulary: default chunks of 69 rows, borders inside batch rows.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 70, 60000, generator=gen, dtype=torch.float64).float().requires_grad_(True)
    tokens = torch.randint(0, 60000, (3, 70), generator=gen)
    got = token_logprobs(logits, tokens, 0.7)
    torch.testing.assert_close(got.double(), naive_logprobs(logits.detach(), tokens, 0.7), rtol=0, atol=1e-5)
    got.sum().backward()
    expected = torch.softmax(logits.detach().double() / 0.7, -1).neg_()
    expected.scatter_add_(-1, tokens[..., None], torch.ones(3, 70, 1, dtype=torch.float64))
    torch.testing.assert_close(logits.grad.double(), expected / 0.7, rtol=0, atol=1e-6)


def test_chunked_and_reference_agree_in_value_and_gradient():
    gen = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(3, 7, 50, generator=gen, dtype=torch.float64)).requires_grad_()
    tokens = torch.randint(0, 50, (3, 7), generator=gen)
    weights = torch.randn(3, 7, generator=gen, dtype=torch.float64)  # a generic upstream gradient
    chunked = token_logprobs(logits, tokens, 0.7, chunk_size=4)
    (g_chunked,) = torch.autograd.grad((chunked * weights).sum(), logits)
    reference = reference_token_logprobs(logits, tokens, 0.7)
    (g_reference,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(chunked, reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_chunked, g_reference, atol=1e-12, rtol=0)
