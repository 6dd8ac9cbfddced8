"""A second, deliberately plain implementation of one on-policy GRPO update, to check grpo.trainer end to end.

The trainer batches rows, pads them, shares prompt prefixes, splits micro-batches and reduces over ranks; this
module does none of that: advantages and penalties are the papers' formulas in plain Python, and the gradient is
summed one unpadded row at a time. Where the two agree, the trainer computed the update the formulas describe.

Also `RecordingEngine`, the real rollout engine wrapped to keep what it sampled (and, to stand in for an inference
engine whose probabilities differ from the trainer's, to report shifted log-probs), and `RecordingReward`.
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import torch


class RecordingEngine:
    """The real engine; keeps every step's rollouts in ``self.steps``.

    ``logprob_shift`` δ reports every sampled token's log-prob δ lower than the engine computed it, as a rollout
    engine that disagrees with the trainer would: the trainer then sees π_old / π_rollout = e^δ on every token.
    """

    def __init__(self, engine, logprob_shift: float = 0.0):
        self.engine, self.logprob_shift, self.steps = engine, logprob_shift, []

    def generate(self, prompts, **kwargs):
        out = self.engine.generate(prompts, **kwargs)
        if self.logprob_shift:
            out = [dataclasses.replace(r, logprobs=[lp - self.logprob_shift for lp in r.logprobs]) for r in out]
        self.steps.append(out)
        return out

    def update_weights(self, model) -> None:
        self.engine.update_weights(model)


class RecordingReward:
    """A reward callable that keeps what it was asked to score and what it answered, call by call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, completions: list[str], samples: list[dict]) -> list[float]:
        values = list(self.fn(completions, samples))
        self.calls.append({"samples": samples, "values": values})
        return values


def hand_advantages(rewards: list[float], group_size: int, scale: str, eps: float = 1e-6) -> list[float]:
    """A_i = (r_i − mean_g) / (stdev_g + eps) (group), / (stdev_all + eps) (batch), or r_i − mean_g (none); a
    group whose rewards are all equal gets exactly 0. stdev is Bessel-corrected (statistics.stdev)."""
    batch_std = statistics.stdev(rewards)
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start:start + group_size]
        if max(group) == min(group):
            out += [0.0] * len(group)
            continue
        denominator = {"group": statistics.stdev(group) + eps, "batch": batch_std + eps, "none": 1.0}[scale]
        mean = statistics.fmean(group)
        out += [(r - mean) / denominator for r in group]
    return out


def hand_overlong_penalty(length: int, max_len: int, buffer: int, factor: float) -> float:
    """DAPO §3.4: 0 up to L − L_c tokens, then falling linearly to −factor at L (and −factor beyond)."""
    if length <= max_len - buffer:
        return 0.0
    return -factor * min(length - (max_len - buffer), buffer) / buffer


def row_logprobs(model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int],
                 temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, from one unpadded forward of prompt + completion: [C]."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def reference_grad_norm(model: torch.nn.Module, rollouts: list, advantages: list[float], keep: list[bool],
                        loss_agg: str, max_len: int, temperature: float = 1.0,
                        row_weights: list[torch.Tensor | float] | None = None) -> float:
    """‖∇θ L‖ for the first update of a step (on-policy: ratio = 1, so the clip is inactive and ∇ratio = ∇log π):

        s_i        = Σ_t w_it · (−A_i) · log π(o_it)          w: TIS/MIS weights (1 without correction)
        token_mean: L = Σ_kept s_i / Σ_kept |o_i|
        seq_mean:   L = Σ_kept (s_i / |o_i|) / #kept
        constant:   L = Σ_kept s_i / (N · max_len)           N counts every row, kept or not (Dr. GRPO)

    Rows with keep False (dropped group, truncated completion) are never run. Leaves the gradient in ``model``.
    """
    model.zero_grad(set_to_none=True)
    lengths = [len(r.completion_ids) for r in rollouts]
    kept = [i for i in range(len(rollouts)) if keep[i]]
    denominator = {"token_mean": sum(lengths[i] for i in kept), "seq_mean": len(kept),
                   "constant": len(rollouts) * max_len}[loss_agg]
    for i in kept:
        logp = row_logprobs(model, rollouts[i].prompt_ids, rollouts[i].completion_ids, temperature)
        weight = 1.0 if row_weights is None else row_weights[i]
        row = -(advantages[i] * weight * logp).sum()
        if loss_agg == "seq_mean":
            row = row / lengths[i]
        (row / denominator).backward()
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))
