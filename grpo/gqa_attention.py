"""TorchEngine's attention (and the trainer's forward on CPU, grpo/batch.py): transformers' sdpa attention with
native grouped-query support under a padding mask.

transformers' sdpa path materialises repeated K/V every layer and step when a mask is present, which dominates CPU
decode time at long contexts. `gqa_attention(model)` routes an sdpa model through `_sdpa_gqa_attention` instead.
`cascade_attention` (a prompt's samples reading one shared copy of its K/V) serves both that path and
grpo/fast_decode.py's forward.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

GQA_SDPA = "grpo_sdpa_gqa"


def _sdpa_gqa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, but with `enable_gqa=True` when a mask is present instead of repeating K/V.

    query (B, H, q, D), key/value (B, Hkv, kv, D), attention_mask (B, 1, q, kv) bool/additive or None.
    Returns (B, q, H, D) like every transformers attention function.
    """
    shared = kwargs.pop("shared_kv", None)
    if shared is not None and query.shape[2] == 1:
        return _cascade_decode_attention(module, query, key, value, attention_mask, scaling, shared), None
    groups = getattr(module, "num_key_value_groups", 1)
    if attention_mask is None or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, q, d = query.shape
    if q == 1 and attention_mask.shape[-2] == 1:
        # Decode step: fold each K/V head's query group into the query-length axis, (B, Hkv, groups, D), so every
        # K/V head is read once for its whole group (~1/3 less time than enable_gqa on CPU). Query head
        # j * groups + g uses K/V head j, as in transformers' repeat_kv.
        folded = query.reshape(b, key.shape[1], groups, d)
        out = F.scaled_dot_product_attention(folded, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling)
        return out.reshape(b, 1, h, d), None
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend), any shape -> the same shape in `dtype`: 0 where True, -inf where False."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))


def _cascade_decode_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None, plan) -> torch.Tensor:
    """`cascade_attention` in transformers' calling convention: query (B, H, 1, D), key/value (B, Hkv, kv, D),
    attention_mask (B, 1, 1, kv) bool or None. Returns (B, 1, H, D)."""
    b, h, _, d = query.shape
    folded = query.reshape(b, key.shape[1], h // key.shape[1], d)  # query head j * groups + g reads K/V head j
    if attention_mask is not None:  # the kernel takes an additive mask of the query's dtype
        attention_mask = additive_mask(attention_mask, query.dtype)
    return cascade_attention(module.layer_idx, folded, key, value, attention_mask, scaling, plan).reshape(b, 1, h, d)


def cascade_attention(layer: int, folded: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None, plan) -> torch.Tensor:
    """One decode step's attention over each row's own K/V plus its prompt's K/V, which the prompt's sample rows
    share (grpo/kv_cache.SharedKV) and which is read once for all of them (cascade attention, as in FlashInfer).

    folded (B, Hkv, groups, D): each K/V head's query group; key/value (B, Hkv, kv, D): the rows' own caches (their
    completions so far, the newest token included) in layer `layer`; attention_mask (B, 1, 1, kv) additive or None;
    plan: SharedKV.plan(). Returns (B, Hkv, groups, D). Softmax over the union of both key sets is recovered from the
    two partial attentions and their log-sum-exps: out = w * out_own + (1 - w) * out_prompt with
    w = sigmoid(lse_own - lse_prompt). CPU only (the op that returns the log-sum-exp is the CPU flash kernel's).
    """
    b, kv_heads, groups, d = folded.shape
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(folded, key, value, attn_mask=attention_mask, scale=scaling)
    for shared, m, gather, valid, rows in plan:
        keys = shared.keys[layer]
        u = keys.shape[0]
        # Each prompt's m sample rows' queries against its one copy: (U, Hkv, m * groups, D).
        q = folded[gather].reshape(u, m, kv_heads, groups, d).transpose(1, 2).reshape(u, kv_heads, m * groups, d)
        part, part_lse = flash(q, keys, shared.values[layer], attn_mask=shared.mask, scale=scaling)
        part = part.reshape(u, kv_heads, m, groups, d).transpose(1, 2).reshape(u * m, kv_heads, groups, d)
        part_lse = part_lse.reshape(u, kv_heads, m, groups).transpose(1, 2).reshape(u * m, kv_heads, groups)
        if valid is not None:
            part, part_lse = part[valid], part_lse[valid]
        own_weight = torch.sigmoid(lse[rows] - part_lse)[..., None].to(part.dtype)
        out[rows] = part + own_weight * (out[rows] - part)
    return out


AttentionInterface.register(GQA_SDPA, _sdpa_gqa_attention)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


@contextlib.contextmanager
def gqa_attention(model: torch.nn.Module) -> Iterator[None]:
    """Route the model's sdpa attention through `_sdpa_gqa_attention` for the block."""
    config = getattr(model, "config", None)
    original = getattr(config, "_attn_implementation", None)
    if original != "sdpa":
        yield
        return
    config._attn_implementation = GQA_SDPA
    try:
        yield
    finally:
        config._attn_implementation = original
