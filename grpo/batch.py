"""Rollouts → padded tensors, and the trainer's forward pass that scores completion tokens.

Layout of one row: ``[pad … pad | prompt | completion | pad … pad]`` — prompts left-padded to P tokens, completions
right-padded to C tokens. Every completion then starts at column P, so the logits that predict completion token t sit
at column P − 1 + t for all rows, and the forward only needs the last C + 1 positions' logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from grpo.logprobs import token_entropy, token_logprobs


@dataclass
class RolloutBatch:
    input_ids: torch.Tensor        # [N, P + C] long
    attention_mask: torch.Tensor   # [N, P + C] long
    position_ids: torch.Tensor     # [N, P + C] long (counts real tokens only, so left padding is invisible)
    completion_mask: torch.Tensor  # [N, C] float: 1 on real completion tokens
    rollout_logprobs: torch.Tensor  # [N, C] float: the engine's log-probs of the sampled tokens
    prompt_len: int                # P

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor | slice) -> "RolloutBatch":
        return RolloutBatch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx],
                            self.completion_mask[idx], self.rollout_logprobs[idx], self.prompt_len)


def collate_rollouts(prompt_ids: list[list[int]], completion_ids: list[list[int]],
                     rollout_logprobs: list[list[float]], pad_id: int) -> RolloutBatch:
    n = len(prompt_ids)
    P = max(len(p) for p in prompt_ids)
    C = max(1, max(len(c) for c in completion_ids))
    input_ids = torch.full((n, P + C), pad_id, dtype=torch.long)
    attention = torch.zeros((n, P + C), dtype=torch.long)
    comp_mask = torch.zeros((n, C))
    old = torch.zeros((n, C))
    for i, (p, c, lp) in enumerate(zip(prompt_ids, completion_ids, rollout_logprobs)):
        input_ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attention[i, P - len(p):P] = 1
        if c:
            input_ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attention[i, P:P + len(c)] = 1
            comp_mask[i, :len(c)] = 1.0
            old[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return RolloutBatch(input_ids, attention, position_ids, comp_mask, old, P)


def completion_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float,
                        with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(o_t | q, o_<t) of every completion token, [N, C], at the sampling temperature (+ entropy [N, C])."""
    C = batch.completion_mask.shape[1]
    device = next(model.parameters()).device
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                position_ids=batch.position_ids.to(device), use_cache=False, logits_to_keep=C + 1)
    logits = out.logits[:, :-1, :]          # [N, C, V]: column j predicts completion token j
    targets = batch.input_ids[:, batch.prompt_len:].to(device)
    logp = token_logprobs(logits, targets, temperature)
    entropy = token_entropy(logits.detach(), temperature) if with_entropy else None
    return logp, entropy
