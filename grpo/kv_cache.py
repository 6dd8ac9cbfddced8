"""The decode KV cache: a preallocated transformers cache layer, and the helpers the engine and trainer share.

Shapes: B rows, Hkv key/value heads, D head dim; capacity = the longest sequence a generation chunk can reach.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer


def padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of padded rows: each real token's count of real tokens before it; pads get 0.

    mask [B, T] (1 = real token) → [B, T] long. Left padding then never shifts a prompt's positions.
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def plain_full_attention(model: torch.nn.Module) -> bool:
    """True when every layer of the model's cache is a plain full-attention DynamicLayer (no sliding window,
    no recurrent state): the case where K/V rows can be gathered, fanned out and preallocated freely."""
    cache = DynamicCache(config=model.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


class PreallocatedLayer(DynamicLayer):
    """A DynamicLayer whose K/V live in a buffer preallocated to the chunk's final length.

    Appending writes in place; `keys`/`values` are views of the filled prefix, so the model sees the same tensors
    as with DynamicLayer without a per-step torch.cat copy of the whole cache. Buffers: (B, Hkv, capacity, D).
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._k = key_states.new_empty(b, h, self.capacity, d)
        self._v = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self._k.shape[-2]:  # more tokens than planned: grow (never happens inside TorchEngine)
            extra = end - self._k.shape[-2]
            self._k = torch.cat([self._k, self._k.new_empty(*self._k.shape[:2], extra, self._k.shape[3])], dim=-2)
            self._v = torch.cat([self._v, self._v.new_empty(*self._v.shape[:2], extra, self._v.shape[3])], dim=-2)
        self._k[:, :, self.length:end] = key_states
        self._v[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length if self.is_initialized else 0

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices` (repeats allowed: used to fan a prefilled prompt out to its samples)."""
        if self.is_initialized:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]

    def drop_leading(self, count: int) -> None:
        """Forget the first `count` positions (columns that are padding for every remaining row). No copy."""
        if self.is_initialized and count > 0:
            self._k, self._v = self._k[:, :, count:], self._v[:, :, count:]
            self.length -= count
            self.keys, self.values = self._k[:, :, :self.length], self._v[:, :, :self.length]


def new_cache(model: torch.nn.Module, capacity: int) -> DynamicCache:
    """A DynamicCache of PreallocatedLayers for plain full-attention models; a stock DynamicCache otherwise."""
    cache = DynamicCache(config=model.config)
    if plain_full_attention(model):
        cache.layers = [PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


def cache_select(cache: DynamicCache, indices: torch.Tensor) -> None:
    for layer in cache.layers:
        layer.batch_select_indices(indices)


def cache_drop_leading(cache: DynamicCache, count: int) -> bool:
    """Drop leading columns if every layer supports it; returns whether it did."""
    if count <= 0 or not all(isinstance(layer, PreallocatedLayer) for layer in cache.layers):
        return False
    for layer in cache.layers:
        layer.drop_leading(count)
    return True
