"""Inference-only fast path for every `nn.Linear` on CPU: oneDNN with weights prepacked once per block.

Why: a decode step multiplies a handful of rows (M = live sequences) by every weight matrix. PyTorch's default CPU
GEMM repacks the weight panel on every call, which for small M costs more than the arithmetic: over SmolLM2-135M's
211 weight matrices it streams 4-5 GB/s at M = 8-32 where a plain `sum()` reads ~15. oneDNN with each weight
reordered once into its blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, the layout inductor's CPU
freezing pass uses) skips that work: 1.8x faster at M = 8, 1.7x at M = 32, 1.2x at M = 256, no gain at M = 1
(bench/packed_linear.py). Full training-sized forwards (M in the thousands) gain nothing, so only the engine uses it
(and for fp32 Llama-family models it packs fused q/k/v and gate/up matrices itself instead: grpo/fast_decode.py).
Results differ from `F.linear` by fp32 accumulation order only (~1e-6 relative).

`packed_linears(model)` packs each plain `nn.Linear`'s current weight on entry (one read + write of the weights,
~0.25 s for 135M parameters) and routes its forward through the packed copy until exit, so a pack never outlives the
weights it was made from: the module stays the single source of truth and `TorchEngine.update_weights` stays free.
Only for blocks without autograd (generation, π_old / π_ref scoring): the packed op has no backward, so the context
refuses to pack when gradients are enabled.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
import torch.nn as nn


def packing_available() -> bool:
    """True when this torch build has oneDNN's prepacked linear (CPU builds for x86-64 and aarch64 do)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


@functools.cache
def packable_dtypes() -> tuple[torch.dtype, ...]:
    """fp32 always; bf16 only where oneDNN's bf16 kernels run on this CPU (AVX512-BW/VL/DQ, AVX-NE-CONVERT or Arm
    BF16). Elsewhere (e.g. AVX2-only x86) `_reorder_linear_weight` raises for a bf16 weight, so bf16 layers keep
    nn.Linear's own kernel."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (torch.float32, torch.bfloat16) if check is not None and check() else (torch.float32,)


def _packable(module: nn.Module) -> bool:
    if type(module) is not nn.Linear:  # subclasses (LoRA, quantised layers) have forwards of their own
        return False
    if "forward" in module.__dict__:  # already routed (a nested block, or someone else's patch): leave it alone
        return False
    weight = module.weight
    return (type(weight) in (torch.Tensor, nn.Parameter) and weight.device.type == "cpu"
            and weight.dtype in packable_dtypes() and weight.dim() == 2
            and (module.bias is None or module.bias.dtype == weight.dtype))


def pack_weight(weight: torch.Tensor, batch_hint: int = 8) -> torch.Tensor:
    """A (N, K) weight reordered into oneDNN's blocked layout for `packed_matmul`; batch_hint: the M it is tuned for."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def packed_matmul(x: torch.Tensor, packed_weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) -> x @ W.T + b (..., N) with W packed by `pack_weight`: what `F.linear` returns, up to round-off."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, bias, "none", [], "")


def packed_forward(packed_weight: torch.Tensor, bias: torch.Tensor | None):
    """An `nn.Linear.forward` replacement running `packed_matmul` on a prepacked weight."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        return packed_matmul(x, packed_weight, bias)
    return forward


@contextlib.contextmanager
def packed_linears(model: nn.Module, enabled: bool = True, batch_hint: int = 8) -> Iterator[int]:
    """Route the forward of every packable `nn.Linear` in `model` through a prepacked weight for the block.

    Yields the number of layers packed (0 when disabled, unavailable, on GPU, or with gradients enabled).
    batch_hint: the M the layout is tuned for; any M works (decode steps are small, so 8).
    """
    if not enabled or not packing_available() or torch.is_grad_enabled():
        yield 0
        return
    # Linear layers that share one weight tensor get one pack.
    packs: dict[int, torch.Tensor] = {}
    patched: list[nn.Module] = []
    try:
        for module in model.modules():
            if not _packable(module):
                continue
            key = id(module.weight)
            if key not in packs:
                packs[key] = pack_weight(module.weight, batch_hint)
            module.forward = packed_forward(packs[key], None if module.bias is None else module.bias.detach())
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # the instance attribute goes; nn.Linear.forward shows through again
