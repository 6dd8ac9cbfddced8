"""The decode KV cache: a preallocated transformers cache layer, the helpers the engine and trainer share, and
`DecodeBatch`, the running rows of TorchEngine's decode loop (compacted as rows finish, joined by waiting rows).

Shapes: B rows, Hkv key/value heads, D head dim; capacity = the longest sequence the batch's rows can reach.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def stack_below(self, others: list["PreallocatedLayer"], capacity: int) -> None:
        """Append the rows of each of `others` below these, in order, in a fresh (B + sum B_other, Hkv, capacity, D)
        buffer, all right-aligned at the longest length. The columns left of a shorter part are zeros: padding,
        which the attention mask hides (zeros rather than uninitialised memory, whose NaNs would survive the mask in
        the matmul)."""
        parts = [self] + others
        width = max(part.length for part in parts)

        def stacked(buffers: list[torch.Tensor]) -> torch.Tensor:
            out = buffers[0].new_zeros(sum(b.shape[0] for b in buffers), buffers[0].shape[1], capacity,
                                       buffers[0].shape[3])
            row = 0
            for part, buffer in zip(parts, buffers):
                out[row:row + buffer.shape[0], :, width - part.length:width] = buffer[:, :, :part.length]
                row += buffer.shape[0]
            return out
        self._k, self._v = stacked([part._k for part in parts]), stacked([part._v for part in parts])
        self.capacity, self.length = capacity, width
        self.keys, self.values = self._k[:, :, :width], self._v[:, :, :width]

    def copy_rows(self, indices: torch.Tensor, capacity: int) -> "PreallocatedLayer":
        """A new layer holding rows `indices` of this one (repeats allowed) in a buffer of `capacity` columns."""
        layer = PreallocatedLayer(capacity)
        if self.is_initialized:
            layer.dtype, layer.device, layer.is_initialized, layer.length = self.dtype, self.device, True, self.length
            layer._k, layer._v = (buffer.new_empty(len(indices), buffer.shape[1], capacity, buffer.shape[3])
                                  for buffer in (self._k, self._v))
            layer._k[:, :, :self.length] = self.keys[indices]
            layer._v[:, :, :self.length] = self.values[indices]
            layer.keys, layer.values = layer._k[:, :, :self.length], layer._v[:, :, :self.length]
        return layer

    def empty_rows(self, rows: int, capacity: int) -> "PreallocatedLayer":
        """A new, empty layer for `rows` rows, shaped and typed like this one, with room for `capacity` columns."""
        layer = PreallocatedLayer(capacity)
        layer.lazy_initialization(self._k[:1, :, :0].expand(rows, -1, -1, -1),
                                  self._v[:1, :, :0].expand(rows, -1, -1, -1))
        layer.keys, layer.values = layer._k[:, :, :0], layer._v[:, :, :0]
        return layer

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


def cache_stack(cache: DynamicCache, others: list[DynamicCache], capacity: int) -> None:
    """Rows of each of `others` appended below `cache`'s (in place), right-aligned: see
    PreallocatedLayer.stack_below."""
    for i, layer in enumerate(cache.layers):
        layer.stack_below([other.layers[i] for other in others], capacity)


def cache_copy_rows(cache: DynamicCache, indices: torch.Tensor, capacity: int) -> DynamicCache:
    """A new cache of PreallocatedLayers holding rows `indices` of `cache`'s, with room for `capacity` columns."""
    copy = DynamicCache()
    copy.layers = [layer.copy_rows(indices, capacity) for layer in cache.layers]
    return copy


def cache_empty_rows(cache: DynamicCache, rows: int, capacity: int) -> DynamicCache:
    """A new, empty cache of PreallocatedLayers like `cache`'s, for `rows` rows and up to `capacity` tokens."""
    empty = DynamicCache()
    empty.layers = [layer.empty_rows(rows, capacity) for layer in cache.layers]
    return empty


def cache_drop_leading(cache: DynamicCache, count: int) -> bool:
    """Drop leading columns if every layer supports it; returns whether it did."""
    if count <= 0 or not all(isinstance(layer, PreallocatedLayer) for layer in cache.layers):
        return False
    for layer in cache.layers:
        layer.drop_leading(count)
    return True


@dataclass
class SharedPrompts:
    """One prefill's prompts, whose K/V their sample rows read instead of each holding a copy: keys[layer] and
    values[layer] (U, Hkv, W, D), mask (U, 1, 1, W) additive (0 / -inf) or None when every column is real."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor | None


@dataclass
class SharedKV:
    """Prompt K/V stored once per prompt and read once per decode step for all of its sample rows (cascade
    attention, grpo/gqa_attention.py), in blocks of `SharedPrompts` (one per prefill: the first, then each join).
    row_prompt[b]: (block, prompt within it) of batch row b, None for a row that holds its whole prompt itself."""
    blocks: list[SharedPrompts | None]
    row_prompt: list[tuple[int, int] | None]

    def plan(self, device: torch.device) -> list[tuple[SharedPrompts, int, slice | torch.Tensor,
                                                       slice | torch.Tensor | None, slice | torch.Tensor]]:
        """For each block with rows: (block, m, gather, valid, rows). The block's queries are gathered as
        (U * m) batch rows, m = the most rows any of its prompts has (`gather`, padded with repeats); of the (U * m)
        results, `valid` (None: all) are the real ones and land on batch rows `rows`. Slices when the rows are
        already in that order (a prompt's samples adjacent and none finished): then nothing is copied."""
        by_block: dict[int, dict[int, list[int]]] = {}
        for b, where in enumerate(self.row_prompt):
            if where is not None:
                by_block.setdefault(where[0], {}).setdefault(where[1], []).append(b)
        plans = []
        for block, prompts in by_block.items():
            shared = self.blocks[block]
            count = shared.keys[0].shape[0]
            m = max(len(rows) for rows in prompts.values())
            gather, valid, targets = [], [], []
            for u in range(count):
                rows = prompts.get(u, [])
                for j in range(m):
                    if j < len(rows):
                        valid.append(len(gather))
                        targets.append(rows[j])
                    gather.append(rows[min(j, len(rows) - 1)] if rows else 0)
            if len(valid) == len(gather) and gather == list(range(gather[0], gather[0] + len(gather))):
                whole = slice(gather[0], gather[0] + len(gather))
                plans.append((shared, m, whole, None, whole))
            else:
                plans.append((shared, m, torch.tensor(gather, device=device), torch.tensor(valid, device=device),
                              torch.tensor(targets, device=device)))
        return plans

    def keep(self, live: list[int]) -> None:
        """Keep batch rows `live`; a block left without rows releases its tensors."""
        self.row_prompt = [self.row_prompt[b] for b in live]
        for block in set(range(len(self.blocks))) - {where[0] for where in self.row_prompt if where is not None}:
            self.blocks[block] = None

    def extend(self, other: "SharedKV | None", rows: int) -> None:
        """Append the blocks of `other` (or `rows` rows that hold their whole prompts) after these."""
        if other is None:
            self.row_prompt = self.row_prompt + [None] * rows
            return
        offset = len(self.blocks)
        self.blocks = self.blocks + other.blocks
        self.row_prompt = self.row_prompt + [None if where is None else (where[0] + offset, where[1])
                                             for where in other.row_prompt]


@dataclass
class DecodeBatch:
    """The rows a decode loop is running: their KV cache, attention mask and positions, and pending logits.

    Rows are left padded: columns [0, width) of `mask` are filled (1 = real token), the rest is room for the tokens
    still to come. Position ids are per row (`next_pos`), so a row's padding never shifts its positions.
    """
    rows: list[int]            # which request row each batch position holds
    cache: DynamicCache
    mask: torch.Tensor         # (B, capacity) int64
    width: int
    next_pos: torch.Tensor     # (B,) int64: each row's next position id
    logits: torch.Tensor       # (B, V) fp32: next-token logits not yet sampled
    shared: SharedKV | None = None  # K/V the rows read besides their own cache (see SharedKV)

    def keep(self, live: list[int]) -> None:
        """Keep batch positions `live`, then drop columns that are padding in every remaining row."""
        index = torch.tensor(live, device=self.mask.device)
        cache_select(self.cache, index)
        self.mask, self.next_pos, self.logits = self.mask[index], self.next_pos[index], self.logits[index]
        self.rows = [self.rows[b] for b in live]
        if self.shared is not None:
            self.shared.keep(live)
        lead = int(self.mask[:, :self.width].any(0).to(torch.int8).argmax()) if self.width else 0
        if cache_drop_leading(self.cache, lead):
            self.mask, self.width = self.mask[:, lead:], self.width - lead

    def join(self, other: "DecodeBatch", max_new: int) -> None:
        """Append other's rows (just prefilled) below these. Both are right-aligned at the wider width, the
        narrower padded on the left, in a new buffer with room for `max_new` more tokens."""
        width = max(self.width, other.width)
        cache_stack(self.cache, [other.cache], width + max_new)
        mask = self.mask.new_zeros(len(self.rows) + len(other.rows), width + max_new)
        mask[:len(self.rows), width - self.width:width] = self.mask[:, :self.width]
        mask[len(self.rows):, width - other.width:width] = other.mask[:, :other.width]
        self.mask, self.width = mask, width
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.logits = torch.cat([self.logits, other.logits])
        if other.shared is not None and self.shared is None:
            self.shared = SharedKV([], [None] * len(self.rows))
        if self.shared is not None:
            self.shared.extend(other.shared, len(other.rows))
        self.rows = self.rows + other.rows

    def append(self, tokens: torch.Tensor, forward) -> None:
        """Feed one token per row: `forward(ids (B, 1), mask (B, width), positions (B, 1), cache, shared)` returns
        the next logits."""
        self.mask[:, self.width] = 1
        self.width += 1
        self.logits = forward(tokens[:, None], self.mask[:, :self.width], self.next_pos[:, None], self.cache,
                              self.shared)
        self.next_pos = self.next_pos + 1
