"""grpo.packed_linear: the oneDNN prepacked forward equals nn.Linear, never outlives the weights, restores itself."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from grpo.models import tiny_llama
from grpo.packed_linear import packed_linears, packing_available


def test_the_cpu_wheel_has_packing():
    # Without oneDNN the context silently packs nothing (correct, just slower); the CI wheel must have it.
    assert packing_available(), "the CPU torch wheel is expected to ship oneDNN (torch.backends.mkldnn)"


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(8, 64), (3, 5, 64), (1, 64), (0, 64)])
def test_packed_forward_equals_f_linear(bias, shape):
    torch.manual_seed(0)
    layer = nn.Linear(64, 96, bias=bias)
    x = torch.randn(*shape)
    expected = x @ layer.weight.T + (layer.bias if bias else 0)  # the definition, not nn.Linear's own kernel
    with torch.no_grad(), packed_linears(layer) as count:
        assert count == 1
        got = layer(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-5)


def test_tiny_llama_logits_match_and_forward_is_restored():
    model = tiny_llama(vocab_size=300, seed=0).eval()
    ids = torch.randint(0, 300, (3, 11), generator=torch.Generator().manual_seed(0))
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    with torch.no_grad():
        plain = model(ids).logits
        with packed_linears(model) as count:
            assert count == len(linears)  # q k v o gate up down per layer + the (tied) head
            assert all("forward" in m.__dict__ for m in linears)
            packed = model(ids).logits
        after = model(ids).logits
    assert all("forward" not in m.__dict__ for m in linears)
    torch.testing.assert_close(packed, plain, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, plain)  # the plain kernels are back, bit for bit


def test_a_new_block_sees_updated_weights():
    layer = nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16)
    with torch.no_grad():
        with packed_linears(layer):
            before = layer(x)
        layer.weight.mul_(2.0)  # an optimizer step between two generate calls
        with packed_linears(layer):
            after = layer(x)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-6)


def test_gradient_mode_and_unsupported_layers_are_left_alone():
    layer = nn.Linear(16, 8)
    with packed_linears(layer) as count:  # grad enabled: the packed op has no backward, so nothing is packed
        assert count == 0 and "forward" not in layer.__dict__
    with torch.no_grad(), packed_linears(layer, enabled=False) as count:
        assert count == 0
    half = nn.Linear(16, 8).half()  # oneDNN's packed path is fp32 / bf16 only
    with torch.no_grad(), packed_linears(half) as count:
        assert count == 0


def test_bf16_layers_pack_only_where_the_cpu_runs_onednn_bf16():
    # The bf16 presets (configs/grpo_qwen*.yaml) on a CPU without AVX512-BW/VL/DQ or AVX-NE-CONVERT: oneDNN refuses to
    # reorder a bf16 weight there, so such layers must keep nn.Linear's kernel instead of crashing the engine.
    torch.manual_seed(0)
    layer = nn.Linear(64, 32).bfloat16()
    x = torch.randn(4, 64).bfloat16()
    supported = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    with torch.no_grad(), packed_linears(layer) as count:
        assert count == (1 if supported else 0)
        got = layer(x)
    expected = (x.float() @ layer.weight.float().T + layer.bias.float())
    torch.testing.assert_close(got.float(), expected.detach(), rtol=2e-2, atol=2e-2)


def test_forward_is_restored_when_the_block_raises():
    layer = nn.Linear(16, 8)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), packed_linears(layer):
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__


def test_nested_blocks_leave_the_outer_pack_in_place():
    layer = nn.Linear(16, 8)
    x = torch.randn(2, 16)
    with torch.no_grad(), packed_linears(layer) as outer:
        packed_forward = layer.__dict__["forward"]
        with packed_linears(layer) as inner:
            assert (outer, inner) == (1, 0)
        assert layer.__dict__["forward"] is packed_forward
        torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias, rtol=1e-5, atol=1e-5)
    assert "forward" not in layer.__dict__
