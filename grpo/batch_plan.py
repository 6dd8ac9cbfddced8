"""How TorchEngine lays prompts out for the model: how many rows fit a KV budget, which prompts share a prefix worth
prefilling once, which runs of similar length to feed together, and left padding. Pure functions over token lists.
"""
from __future__ import annotations

import torch


def rows_that_fit(running: int, width: int, max_new_tokens: int, max_batch_tokens: int) -> int:
    """How many rows may join `running` ones in a KV buffer `width` + max_new_tokens wide per row, keeping
    rows x (width + max_new_tokens) <= max_batch_tokens; an empty batch takes at least one row (it cannot be split)."""
    return max(max_batch_tokens // (width + max_new_tokens) - running, 0 if running else 1)


def prefix_groups(prompts: list[list[int]], min_saved: int = 8) -> list[tuple[int, list[int]]]:
    """Partition prompts into groups whose members share their first `shared` tokens: [(shared, members)].

    Every index appears once. Prompts are visited in lexicographic order, where neighbours share the longest
    prefixes; a prompt joins the current group when that does not lower the tokens the group saves,
    (size - 1) * shared (so 4 pairs sharing 180 tokens stay 4 groups rather than one group sharing 40).
    `shared` stays below every member's length (each keeps a token to feed after the prefix); groups saving fewer
    than `min_saved` tokens become loners, reported with shared = 0.
    """
    groups: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(prompts)), key=lambda i: prompts[i]):
        p = prompts[i]
        if groups:
            shared, members = groups[-1]
            common = 0
            for a, b in zip(prompts[members[-1]], p):
                if a != b:
                    break
                common += 1
            joined = min(shared, common, len(p) - 1)
            if joined > 0 and len(members) * joined >= (len(members) - 1) * shared:
                groups[-1] = (joined, members + [i])
                continue
        groups.append((len(p) - 1, [i]))  # a group of one could share anything up to its last token
    out: list[tuple[int, list[int]]] = []
    for shared, members in groups:
        if len(members) > 1 and (len(members) - 1) * shared >= min_saved:
            out.append((shared, members))
        else:
            out.extend((0, [i]) for i in members)
    return out


def length_buckets(lengths: list[int], overhead: int = 64) -> list[range]:
    """Split positions 0..n-1 into contiguous runs, each fed to the model as one left-padded batch, minimising
    padded tokens plus `overhead` per run (a forward streams every weight once, about what 64 prefill tokens cost
    on CPU): sum over runs of len(run) * max(lengths[run]) + overhead. Exact, by dynamic programming, O(n^2).
    (The engine feeds prompts longest first, so contiguous runs lose nothing against any grouping.)"""
    best, start = [0] + [float("inf")] * len(lengths), [0] * (len(lengths) + 1)
    for end in range(1, len(lengths) + 1):
        longest = 0
        for first in range(end - 1, -1, -1):
            longest = max(longest, lengths[first])
            cost = best[first] + overhead + (end - first) * longest
            if cost < best[end]:
                best[end], start[end] = cost, first
    runs, end = [], len(lengths)
    while end:
        runs.append(range(start[end], end))
        end = start[end]
    return runs[::-1]


def left_pad(sequences: list[list[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, L) int64, attention_mask (B, L) int64) on ``device``, with every sequence right-aligned."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long, device="cpu")  # filled here, then moved
    mask = torch.zeros((len(sequences), width), dtype=torch.long, device="cpu")
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long, device="cpu")
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)
