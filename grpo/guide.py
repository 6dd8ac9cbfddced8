"""Guided decoding for TorchEngine: a task's callable steers each row with forced tokens and stops.

    guide(prompt index, completion ids so far) -> Steer | None        (asked after every sampled token of a row)

A `Steer` can
  * force tokens: the row's next tokens are `forced`, fed one per step in place of samples (the guide is not asked
    while they are fed); then the row ends ("stop") if `stop`, else sampling resumes;
  * replace the newest token (`replace`): it is withdrawn before the model reads it and `forced` starts in its
    place, e.g. to split a sampled token that runs past the end of a structure ("]," where the grammar wants "]}");
  * stop the row at once (`stop` with nothing forced).
This is constrained decoding at its simplest: the fixed parts of a structured answer (keys, closing braces) are
written for the model, which chooses the free parts. A forced token carries the model's own log-prob of it
(log softmax(logits / T), T = 1 when greedy); a row counts the forced tokens that differ from the token it would
have sampled, a replacement included (`Rollout.overridden`).

Shapes: R = rows in the batch, V = vocabulary size.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Steer(NamedTuple):
    forced: tuple[int, ...] | list[int] = ()
    stop: bool = False
    replace: bool = False  # forced[0] takes the newest token's place


Guide = Callable[[int, list[int]], "Steer | None"]


class GuidedRows:
    """The guide's state over one `generate` call, keyed by row: forced tokens still to feed, overrides."""

    def __init__(self, guide: Guide, prompt_index: list[int]):
        self.guide, self.prompt_index = guide, prompt_index
        self.forcing: dict[int, tuple[list[int], bool]] = {}  # row -> (forced tokens still to feed, stop after them)
        self.overridden = [0] * len(prompt_index)

    def force(self, rows: list[int], logits: torch.Tensor, tokens: torch.Tensor, token_logprobs: torch.Tensor,
              temperature: float) -> None:
        """Put each forcing row's next forced token in place of its sample (in `tokens`, in place), with the model's
        log-prob of it from the (R, V) `logits`, and count those that differ from the sample."""
        where = [b for b, r in enumerate(rows) if self.forcing.get(r, ([], False))[0]]
        if not where:
            return
        index = torch.tensor(where, device=tokens.device)
        forced = torch.tensor([self.forcing[rows[b]][0].pop(0) for b in where], device=tokens.device)
        for b in index[tokens[index] != forced].tolist():
            self.overridden[rows[b]] += 1
        tokens[index] = forced
        logp = torch.log_softmax(logits[index].float() / (temperature if temperature > 0 else 1.0), dim=-1)
        token_logprobs[index] = logp.gather(-1, forced[:, None]).squeeze(-1)

    def after_token(self, row: int, b: int, completion: list[int], logprobs: list[float], tokens: torch.Tensor,
                    logits: torch.Tensor, temperature: float) -> bool:
        """After a row's newest token (batch position b; not yet fed to the model): finish a forced run or ask the
        guide, which may replace that token (in `completion`, `logprobs` and `tokens`, with its log-prob from the
        (R, V) `logits` it was drawn from). Returns whether the row stops here."""
        if row in self.forcing:
            pending, stop = self.forcing[row]
            if pending:
                return False
            del self.forcing[row]
            if stop:
                return True
        steer = self.guide(self.prompt_index[row], completion)
        if steer is None:
            return False
        forced = list(steer.forced)
        if steer.replace and forced:
            token = forced.pop(0)
            self.overridden[row] += token != completion[-1]
            completion[-1], tokens[b] = token, token
            scaled = logits[b].float() / (temperature if temperature > 0 else 1.0)
            logprobs[-1] = float(torch.log_softmax(scaled, dim=-1)[token])
        if forced:
            self.forcing[row] = (forced, steer.stop)
            return False
        return steer.stop
