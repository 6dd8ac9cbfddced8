"""GRPO loss math as small pure functions (the counterpart of verl's core_algos.py).

Shapes: N = number of completions in the batch (= number of prompts x G), G = group size (completions per
prompt, consecutive in the batch), B = sequences in a (micro-)batch, T = completion positions.
Masks are [B, T] with 1 on completion tokens that enter the loss and 0 on padding (bool or float 0/1).

Sign conventions (everywhere in this file):
  * advantages > 0 mean "better than the group": the loss pushes their tokens' log-probs UP;
  * every ``*_loss`` is something to MINIMISE (= minus the paper's objective J);
  * KL estimators k1/k2/k3 estimate KL(pi_theta || pi_ref) from samples of pi_theta, with
    x = ref_logp - logp = log(pi_ref / pi_theta) per token.

Paper-equation map: grpo/README.md. Nothing here builds models; the trainer feeds in tensors.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

AdvantageScale = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k2", "k3"]
AggregationMode = Literal["seq_mean", "token_mean", "constant"]

_LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: a bigger log-ratio is a bug, not a signal; keeps exp() finite
_K3_CLAMP = 10.0


# --------------------------------------------------------------------------- input checks and masked reductions
def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise FloatingPointError if ``tensor`` holds NaN/inf: a single one would silently turn the loss NaN.

    Costs one device sync (the ``.item()``) per call.
    """
    bad = ~torch.isfinite(tensor)
    n_bad = int(bad.sum().item())
    if n_bad:
        n_nan = int(torch.isnan(tensor).sum().item())
        raise FloatingPointError(f"{name} has {n_bad} non-finite entries of {tensor.numel()} "
                                 f"({n_nan} nan, {n_bad - n_nan} inf), shape {tuple(tensor.shape)}")


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shape mismatch: {shapes}")


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.dtype) if mask.dtype != like.dtype else mask


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) over ``dim`` (all dims if None). x, mask: same shape. Masked entries add exactly 0
    (where(), not multiply, so a huge-but-finite value at a pad position cannot leak in)."""
    masked = torch.where(mask.bool(), x * _float_mask(mask, x), torch.zeros((), dtype=x.dtype, device=x.device))
    return masked.sum() if dim is None else masked.sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over ``dim``; 0 (not NaN, graph kept) where the mask is empty."""
    total = masked_sum(x, mask, dim)
    count = _float_mask(mask, x).sum() if dim is None else _float_mask(mask, x).sum(dim)
    return total / torch.where(count > 0, count, torch.ones_like(count))


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not bool(mask.bool().any()):
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x.detach()[mask.bool()].max()


# --------------------------------------------------------------------------- advantages
def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"N = {rewards.numel()} rewards cannot be split into groups of {group_size}")
    check_finite("rewards", rewards)
    r = rewards if rewards.is_floating_point() else rewards.float()
    return r.view(-1, group_size)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N] rewards (groups of G consecutive entries) -> [N / G] bool, True where all G rewards are equal.

    Such a group carries no GRPO signal (every advantage is 0). The trainer logs the fraction
    (frac_reward_zero_std) and may drop these groups and sample more prompts (DAPO dynamic sampling).
    """
    r = _grouped(rewards, group_size)
    return r.amax(dim=1) == r.amin(dim=1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: AdvantageScale = "group",
                     eps: float = 1e-6) -> torch.Tensor:
    """Outcome advantages shared by every token of a completion (DeepSeekMath GRPO, outcome supervision).

        group:  A_i = (r_i - mean_g(r)) / (std_g(r) + eps)     original GRPO
        batch:  A_i = (r_i - mean_g(r)) / (std(r over all N) + eps)
        none:   A_i =  r_i - mean_g(r)                         Dr. GRPO (no std scaling)

    std is the UNBIASED (Bessel, divide by G - 1) standard deviation: the convention of torch.std and hence
    of TRL and verl, so reward curves and advantages are comparable with theirs (population std would
    scale every advantage by sqrt((G-1)/G), e.g. 0.97 for G = 16).
    Groups whose rewards are all equal get advantage exactly 0 (instead of round-off / eps), and so do
    groups of size 1 (their unbiased std is undefined).

    Args: rewards [N] (N = num_prompts * G, each group's G completions consecutive), group_size G.
    Returns: [N] advantages, rewards' float dtype (float32 for integer rewards).
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    r = _grouped(rewards, group_size)
    centered = r - r.mean(dim=1, keepdim=True)
    if group_size == 1:
        return torch.zeros_like(centered).view(-1)
    if scale == "group":
        centered = centered / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centered = centered / (r.std() + eps)
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(centered), centered).view(-1)


# --------------------------------------------------------------------------- KL to the reference policy
def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from tokens sampled by pi_theta (Schulman's k1/k2/k3).

        x  = ref_logp - logp                       (clamped to [-20, 20])
        k1 = -x                = logp - ref_logp    unbiased, can be negative
        k2 = x^2 / 2                                biased, >= 0
        k3 = exp(x) - x - 1                         unbiased, >= 0 (DeepSeekMath eq. 4); clamped to [-10, 10]

    The clamps stop one token with a runaway ratio from dominating the loss; inside them the gradient is exact.
    verl clamps x and the result this way in its k3 ("low_var_kl") only; clamping x for k1 and k2 as well is our
    choice (their gradient is 0 past |x| > 20, where one token's estimate means nothing anyway).
    Use: in the loss as beta * masked mean of k3 (DeepSeekMath), or folded into the reward (kl_in_reward).
    Contract with the trainer: beta == 0 means the trainer never builds, loads or runs a reference model,
    and never calls this function.

    Args: logp, ref_logp [B, T] (ref_logp normally detached). Returns [B, T], same dtype.
    """
    _check_same_shape(logp=logp, ref_logp=ref_logp)
    check_finite("logp", logp)
    check_finite("ref_logp", ref_logp)
    x = (ref_logp - logp).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x.square()
    if estimator == "k3":
        # expm1(x) - x, not exp(x) - x - 1: for |x| ~ 1e-9 the latter rounds to a tiny NEGATIVE value, while
        # expm1(x) >= x holds after rounding too, so the estimate stays >= 0.
        return (torch.expm1(x) - x).clamp(-_K3_CLAMP, _K3_CLAMP)
    raise ValueError(f"estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def kl_in_reward(rewards: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                 beta: float) -> torch.Tensor:
    """KL as a reward penalty (the InstructGPT/PPO placement, instead of a loss term):

        r'_i = r_i - beta * sum_t mask_it * k1_it,   k1 = logp - ref_logp

    Args: rewards [B], logp / ref_logp / mask [B, T]. Returns [B], detached (rewards are not differentiated).
    """
    check_finite("rewards", rewards)
    _check_same_shape(logp=logp, ref_logp=ref_logp, mask=mask)
    if rewards.shape != logp.shape[:1]:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} != [B] = {tuple(logp.shape[:1])}")
    seq_kl = masked_sum(kl_penalty(logp.detach(), ref_logp.detach(), "k1"), mask, dim=1)
    return (rewards - beta * seq_kl).detach()


# --------------------------------------------------------------------------- clipped surrogate
def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                eps_low: float = 0.2, eps_high: float | None = None, dual_clip: float | None = None,
                is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token PPO/GRPO clipped surrogate loss (minus DeepSeekMath eq. 3's inner term), with DAPO's
    decoupled clip range and optional dual clip.

        ratio = exp(logp - old_logp)                               (log-ratio clamped to [-20, 20])
        loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
              =  max(-ratio * A, -clip(ratio, ...) * A)
        dual clip (Ye et al. 2020, c > 1), only where A < 0:  loss = min(loss, -c * A)
        loss *= is_weights                                         (rollout correction, if given)

    Args:
        logp: [B, T] current policy log-probs (with grad). old_logp: [B, T] log-probs of the policy that
            produced the batch (detached; == logp.detach() on the first of mu updates).
        advantages: [B] (one per sequence, broadcast over tokens) or [B, T].
        mask: [B, T] loss mask. eps_low / eps_high: clip range (eps_high None -> eps_low; DAPO: .2/.28).
        dual_clip: c > 1 or None. is_weights: [B, T] detached TIS/MIS weights or None.
    Returns:
        per_token_loss [B, T] (0 where mask == 0), and metrics: detached 0-d tensors, masked means over
        tokens: clip_frac_low (A < 0 and ratio < 1 - eps_low: gradient cut on the low side),
        clip_frac_high (A > 0 and ratio > 1 + eps_high), clip_frac (their sum), dual_clip_frac,
        ratio_mean, ratio_max, approx_kl (mean of old_logp - logp).
    """
    _check_same_shape(logp=logp, old_logp=old_logp, mask=mask)
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"advantages [B] = {tuple(advantages.shape)} but logp is {tuple(logp.shape)}")
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logp.shape)}, got {tuple(advantages.shape)}")
    eps_high = eps_low if eps_high is None else eps_high
    if not (0 <= eps_low < 1 and eps_high >= 0):
        raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {eps_low}, {eps_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip}")
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages)):
        check_finite(name, t)
    advantages = advantages.to(logp.dtype).detach()

    log_ratio = (logp - old_logp.detach()).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(unclipped, clipped)

    dual_active = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        cap = -dual_clip * advantages  # > 0 where A < 0
        dual_active = (advantages < 0) & (loss > cap)
        loss = torch.where(dual_active, cap.expand_as(loss), loss)
    if is_weights is not None:
        _check_same_shape(logp=logp, is_weights=is_weights)
        check_finite("is_weights", is_weights)
        loss = loss * is_weights.detach().to(loss.dtype)
    loss = torch.where(mask.bool(), loss, torch.zeros_like(loss))

    with torch.no_grad():
        low = ((advantages < 0) & (ratio < 1 - eps_low)).to(loss.dtype)
        high = ((advantages > 0) & (ratio > 1 + eps_high)).to(loss.dtype)
        metrics = {
            "clip_frac_low": masked_mean(low, mask),
            "clip_frac_high": masked_mean(high, mask),
            "clip_frac": masked_mean(low + high, mask),
            "dual_clip_frac": masked_mean(dual_active.to(loss.dtype), mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": _masked_max(ratio, mask),
            "approx_kl": masked_mean(-log_ratio, mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


# --------------------------------------------------------------------------- loss aggregation
def normaliser_counts(mask: torch.Tensor, mode: AggregationMode = "seq_mean") -> tuple[float, float]:
    """(num_tokens, num_seqs) of a [B, T] mask: loss tokens, and the sequences aggregate_loss divides by —
    those with >= 1 loss token, or every row B for mode="constant".

    The trainer sums these over all micro-batches (and ranks) of one optimizer step and passes the totals
    to every aggregate_loss call of that step.
    """
    m = mask.bool()
    seqs = m.shape[0] if mode == "constant" else m.any(dim=1).sum().item()
    return float(m.sum().item()), float(seqs)


def aggregate_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, mode: AggregationMode = "token_mean",
                   num_tokens: float | None = None, num_seqs: float | None = None,
                   max_len: int | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to the scalar to backpropagate.

        seq_mean   (GRPO):     sum_i [ sum_t m_it l_it / |o_i| ] / num_seqs        |o_i| = sum_t m_it
        token_mean (DAPO):     sum_i sum_t m_it l_it / num_tokens
        constant   (Dr. GRPO): sum_i sum_t m_it l_it / (num_seqs * max_len)

    Contract (gradient accumulation): if every micro-batch of one optimizer step is called with the
    step's GLOBAL num_tokens / num_seqs (normaliser_counts summed over micro-batches and ranks) and the same
    max_len, the sum of the micro-batch results equals the whole batch's result, value and gradient.
    Defaults describe this call alone: num_tokens = mask.sum(), max_len = T (pass the generation limit instead:
    micro-batches are padded to different T), and num_seqs = the sequences with >= 1 loss token for seq_mean
    but EVERY row (B) for constant: Dr. GRPO's normaliser is a constant of the batch shape, so masking a row
    (truncated, zero-variance group) must not scale up the others' gradient.
    An empty mask (or zero normaliser) gives 0.0 that still carries the graph, never NaN.

    Args: per_token_loss [B, T], mask [B, T]. Returns a 0-d tensor.
    """
    _check_same_shape(per_token_loss=per_token_loss, mask=mask)
    if per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss must be [B, T], got {tuple(per_token_loss.shape)}")
    check_finite("per_token_loss", per_token_loss)
    default_tokens, default_seqs = normaliser_counts(mask) if num_tokens is None or num_seqs is None else (0, 0)
    if mode == "token_mean":
        numerator = masked_sum(per_token_loss, mask)
        denominator = default_tokens if num_tokens is None else num_tokens
    elif mode == "seq_mean":
        numerator = masked_mean(per_token_loss, mask, dim=1).sum()  # empty rows contribute 0
        denominator = default_seqs if num_seqs is None else num_seqs
    elif mode == "constant":
        numerator = masked_sum(per_token_loss, mask)
        length = per_token_loss.shape[1] if max_len is None else max_len
        denominator = (per_token_loss.shape[0] if num_seqs is None else num_seqs) * length
    else:
        raise ValueError(f"mode must be 'seq_mean', 'token_mean' or 'constant', got {mode!r}")
    if denominator < 0:
        raise ValueError(f"loss normaliser must be >= 0, got {denominator}")
    # numerator is exactly 0 when the normaliser is 0 (no loss tokens), so dividing by 1 keeps it 0.
    return numerator / (denominator if denominator > 0 else 1.0)


# --------------------------------------------------------------------------- engine/trainer mismatch
def rollout_correction_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor,
                               level: Literal["token", "sequence"] = "token",
                               mode: Literal["truncate", "mask"] = "truncate", threshold: float = 2.0,
                               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights correcting for the rollout engine's probabilities differing from the trainer's
    (TIS: Yao et al. 2025 "Your efficient RL framework secretly brings you off-policy RL training";
    MIS: Liu, Li et al. 2025 "When speed kills stability").

        rho_t = exp(old_logp_t - rollout_logp_t)                 token level
        rho_i = exp(sum_t m_it (old_logp_it - rollout_logp_it))  sequence level, broadcast over t
        truncate (TIS):  w = min(rho, C)
        mask     (MIS):  w = rho * 1[1/C <= rho <= C]

    (log-ratios clamped to [-20, 20] before exp). The weights multiply the per-token policy loss
    (policy_loss(is_weights=w)). In mask mode a rejected token still counts in the aggregation's
    normaliser unless the trainer also multiplies the loss mask by (w > 0).

    Args: old_logp, rollout_logp, mask [B, T]; threshold C > 1.
    Returns: w [B, T] detached (0 on padding), metrics (detached 0-d): logp_gap_abs_mean, logp_gap_max
        (|old - rollout| over loss tokens), frac_corrected (truncated / masked fraction of tokens, or of
        sequences at sequence level), kl_k3 and kl_k1 (KL(rollout || old) estimated on the rollout's
        samples: x = old - rollout, k3 = exp(x) - x - 1, k1 = -x), weight_mean.
    """
    _check_same_shape(old_logp=old_logp, rollout_logp=rollout_logp, mask=mask)
    if level not in ("token", "sequence") or mode not in ("truncate", "mask"):
        raise ValueError(f"level must be token|sequence and mode truncate|mask, got {level!r}, {mode!r}")
    if not threshold > 1:
        raise ValueError(f"threshold C must be > 1, got {threshold}")
    check_finite("old_logp", old_logp)
    check_finite("rollout_logp", rollout_logp)
    with torch.no_grad():
        m = _float_mask(mask, old_logp)
        log_ratio = torch.where(mask.bool(), old_logp - rollout_logp, torch.zeros_like(old_logp))
        if level == "token":
            rho = torch.exp(log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP))
        else:
            seq_log_ratio = log_ratio.sum(dim=1, keepdim=True).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
            rho = torch.exp(seq_log_ratio).expand_as(log_ratio)
        if mode == "truncate":
            corrected = rho > threshold
            weights = rho.clamp(max=threshold)
        else:
            corrected = (rho > threshold) | (rho < 1.0 / threshold)
            weights = torch.where(corrected, torch.zeros_like(rho), rho)
        weights = weights * m
        if level == "token":
            frac = masked_mean(corrected.to(m.dtype), mask)
        else:
            has_tokens = mask.bool().any(dim=1)
            frac = masked_mean(corrected[:, 0].to(m.dtype), has_tokens)
        x = log_ratio.clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        metrics = {
            "logp_gap_abs_mean": masked_mean(log_ratio.abs(), mask),
            "logp_gap_max": _masked_max(log_ratio.abs(), mask),
            "frac_corrected": frac,
            "kl_k3": masked_mean(torch.expm1(x) - x, mask),
            "kl_k1": masked_mean(-log_ratio, mask),
            "weight_mean": masked_mean(weights, mask),
        }
    return weights.detach(), metrics


# --------------------------------------------------------------------------- overlong completions (DAPO)
def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, penalty_factor: float = 1.0
                     ) -> torch.Tensor:
    """DAPO soft overlong punishment (§3.4 Overlong Reward Shaping), added to the task reward. L = max_len, L_c = buffer:

        0                                    if len <= L - L_c
        -factor * (len - (L - L_c)) / L_c    if L - L_c < len < L
        -factor                              if len >= L          (buffer == 0: a hard step at L)

    Args: lengths [N] completion lengths in tokens. Returns [N] float32 penalties (<= 0).
    """
    if not 0 <= buffer <= max_len:
        raise ValueError(f"need 0 <= buffer <= max_len, got buffer={buffer}, max_len={max_len}")
    lengths = torch.as_tensor(lengths).to(torch.float32)
    if buffer == 0:
        return torch.where(lengths >= max_len, -penalty_factor, 0.0).to(torch.float32)
    over = (lengths - (max_len - buffer)) / buffer
    return -penalty_factor * over.clamp(0.0, 1.0)


def truncation_mask(truncated: torch.Tensor | Sequence[bool] | Sequence[str]) -> torch.Tensor:
    """[N] keep-weights that drop truncated completions from the loss (DAPO overlong filtering).

    Accepts a bool tensor / list (True = truncated) or engine finish reasons, where "length" (hit the
    token limit) means truncated and anything else ("stop", "eos", ...) does not.
    Returns [N] float32: 1.0 keep, 0.0 mask (multiply into the [B, T] loss mask row-wise).
    """
    if isinstance(truncated, torch.Tensor):
        flags = truncated.bool()
    else:
        items = list(truncated)
        if items and all(isinstance(x, str) for x in items):
            flags = torch.tensor([x == "length" for x in items], dtype=torch.bool)
        elif all(isinstance(x, (bool, int)) for x in items):
            flags = torch.tensor([bool(x) for x in items], dtype=torch.bool)
        else:
            raise TypeError("truncation_mask expects a bool tensor, a list of bools, or a list of finish-reason "
                            f"strings; got element types {sorted({type(x).__name__ for x in items})}")
    if flags.dim() != 1:
        raise ValueError(f"expected [N] flags, got shape {tuple(flags.shape)}")
    return (~flags).to(torch.float32)
