"""The GRPO loop, top to bottom.

    for step in steps:
        prompts  → engine.generate (G completions each)      # rollouts
        rewards  → reward callables, weighted sum            # score
        π_ref, π_old log-probs (only when needed)            # reference / old
        advantages per group                                  # grpo.algos
        μ epochs × mini-batches × micro-batches:              # train
            clipped surrogate + β·KL, aggregated, backward
            clip grad, AdamW, LR schedule
        engine.update_weights(policy)                         # sync
        log, samples.jsonl, eval, checkpoint

Task-agnostic: prompts are dicts with ``messages`` (chat) or ``prompt`` (text) plus whatever the reward callables
read; a reward callable is ``fn(completions: list[str], samples: list[dict]) -> list[float]``, optionally with a
``batch_metrics`` attribute of the same signature returning {name: count} (see ``reward_diagnostics``).

Distributed (torchrun): every rank generates for its own slice of the step's prompts, so groups never cross ranks;
each rank's loss is divided by the step's GLOBAL token (or sequence) count and FSDP2 is set to SUM gradients over
ranks (grpo.distributed.shard_model), so the gradient is that of the whole batch, whatever the rank count.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from grpo import algos
from grpo.batch import RolloutBatch, collate_rollouts, completion_logprobs
from grpo.checkpoint import save_checkpoint
from grpo.graceful_exit import install_sigterm_handler
from grpo.distributed import DistInfo, all_reduce_max, all_reduce_sum, clip_grad_norm
from grpo.grpo_config import GRPOConfig
from grpo.optim import build_optimizer, build_scheduler
from grpo.rollout_io import RunLogger, tokenize_prompts
from grpo.run_dir import RunPlan, plan_run, restore_checkpoint, start_run

RewardFn = Callable[[list[str], list[dict]], list[float]]


def score_completions(texts: list[str], samples: list[dict],
                      reward_fns: list[tuple[str, float, RewardFn]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every reward callable → total [N] and each callable's raw values {name: [N]}."""
    per_fn: dict[str, torch.Tensor] = {}
    for name, _, fn in reward_fns:
        values = torch.tensor([float(v) for v in fn(texts, samples)], dtype=torch.float32)
        if values.shape != (len(texts),):
            raise ValueError(f"reward {name!r} returned {tuple(values.shape)} values for {len(texts)} completions")
        algos.check_finite(f"reward {name!r}", values)
        per_fn[name] = values
    total = sum(w * per_fn[name] for name, w, _ in reward_fns)
    return total, per_fn


def reward_diagnostics(texts: list[str], samples: list[dict],
                       reward_fns: list[tuple[str, float, RewardFn]]) -> dict[str, float]:
    """Counts the reward callables report about a batch besides their values, e.g. how many completions their
    parser failed on: a callable may carry ``batch_metrics(completions, samples) -> {name: count}``, which must
    return the same names on every call. Each distinct ``batch_metrics`` runs once; logged as ``reward/<name>``."""
    out: dict[str, float] = {}
    seen: set[int] = set()
    for _, _, fn in reward_fns:
        report = getattr(fn, "batch_metrics", None)
        if callable(report) and id(report) not in seen:
            seen.add(id(report))
            out.update({name: float(v) for name, v in report(texts, samples).items()})
    return out


def global_advantages(rewards: torch.Tensor, cfg: GRPOConfig, info: DistInfo) -> torch.Tensor:
    """Advantages for this rank's rows. Groups live on one rank; only scale="batch" needs every rank's rewards."""
    if cfg.adv_scale != "batch" or info.world_size == 1:
        return algos.group_advantages(rewards, cfg.group_size, cfg.adv_scale)
    everyone = [torch.empty_like(rewards) for _ in range(info.world_size)]
    dist.all_gather(everyone, rewards)
    adv = algos.group_advantages(torch.cat(everyone), cfg.group_size, cfg.adv_scale)
    return adv.chunk(info.world_size)[info.rank]


def step_prompt_indices(step: int, cfg: GRPOConfig, n_prompts: int, info: DistInfo) -> list[int]:
    """This rank's prompts for ``step``: a seeded permutation per epoch, so a resumed run sees the same order."""
    out = []
    for pos in range(step * cfg.prompts_per_step, (step + 1) * cfg.prompts_per_step):
        epoch, i = divmod(pos, n_prompts)
        perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        out.append(int(perm[i]))
    per_rank = cfg.prompts_per_step // info.world_size
    return out[info.rank * per_rank:(info.rank + 1) * per_rank]


@torch.no_grad()
def frozen_logprobs(model: torch.nn.Module, batch: RolloutBatch, cfg: GRPOConfig) -> torch.Tensor:
    """Log-probs of the completions under a model that is not being differentiated (π_old or π_ref), [N, C]."""
    C = batch.completion_mask.shape[1]
    parts = [completion_logprobs(model, batch.select(slice(i, i + cfg.micro_batch_size)).narrow(), cfg.temperature,
                                 share_prompts=cfg.share_prompt_prefix)[0]
             for i in range(0, len(batch), cfg.micro_batch_size)]
    return torch.cat([F.pad(p.float().cpu(), (0, C - p.shape[1])) for p in parts])  # 0 past each row's end


def micro_batch_loss(policy, mb: RolloutBatch, advantages: torch.Tensor, mask: torch.Tensor,
                     old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, num_tokens: float,
                     num_seqs: float, cfg: GRPOConfig, measure_gap: bool = True,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one micro-batch, scaled so that summed over the mini-batch's micro-batches and ranks it is the
    mini-batch loss (aggregate_loss with the GLOBAL normalisers ``num_tokens`` / ``num_seqs``).

    mb: N rows, narrowed (``RolloutBatch.narrow``) to C' ≤ C completion columns; advantages [N]; mask [N, C] loss
    mask; old_logp / ref_logp [N, C] or None (on-policy: π_old is this very forward, detached; β = 0 or KL in the
    reward: no KL term); the per-token ones are cut to C' here (past it every row is padding, mask 0). All on the
    policy's device.
    ``measure_gap``: the policy is still the one that sampled (the step's first update), so |log π − engine log-prob|
    is the engine's error and is reported as ``engine_logprob_gap``.
    """
    logp, entropy = completion_logprobs(policy, mb, cfg.temperature, with_entropy=True,
                                        share_prompts=cfg.share_prompt_prefix)
    C = logp.shape[1]
    mask = mask[:, :C]
    old_logp = None if old_logp is None else old_logp[:, :C]
    ref_logp = None if ref_logp is None else ref_logp[:, :C]
    old = logp.detach() if old_logp is None else old_logp
    rollout_logp = mb.rollout_logprobs.to(logp.device)
    metrics: dict[str, torch.Tensor] = {}
    is_weights = None
    if cfg.rollout_correction != "none":  # the engine sampled from π_rollout ≠ π_old: TIS / MIS weights
        is_weights, correction = algos.rollout_correction_weights(
            old, rollout_logp, mask, cfg.rollout_correction, cfg.rollout_correction_mode,
            cfg.rollout_correction_threshold)
        metrics.update({f"correction/{k}": v for k, v in correction.items()})
    per_token, clip_metrics = algos.policy_loss(logp, old, advantages, mask, cfg.eps_low, cfg.eps_high,
                                                cfg.dual_clip, is_weights=is_weights)
    metrics.update(clip_metrics)
    if ref_logp is not None and not cfg.kl_in_reward:
        kl = algos.kl_penalty(logp, ref_logp, cfg.kl_estimator)
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = algos.masked_mean(kl.detach(), mask)
    loss = algos.aggregate_loss(per_token, mask, cfg.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                                max_len=cfg.max_completion_len)
    if measure_gap:  # this forward IS π_old, so the engine's log-prob gap costs nothing to measure
        metrics["engine_logprob_gap"] = algos.masked_mean((logp.detach() - rollout_logp).abs(),
                                                          mb.completion_mask.to(logp.device))
    metrics["entropy"] = algos.masked_mean(entropy, mask)
    return loss, metrics


def mini_batch_order(n: int, cfg: GRPOConfig, step: int, epoch: int) -> torch.Tensor:
    """Row order of one epoch over the step's N rollouts: whole groups shuffled when they split evenly into the
    mini-batches (a micro-batch then repeats few prompts, so the shared-prefix forward pays), else rows. A pure
    function of (seed, step, epoch): every step draws a new order and a resumed run draws the same one."""
    if cfg.num_mini_batches == 1:
        return torch.arange(n)
    gen, g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * step + epoch), cfg.group_size
    if (n // g) % cfg.num_mini_batches == 0:
        return (torch.randperm(n // g, generator=gen)[:, None] * g + torch.arange(g)).flatten()
    return torch.randperm(n, generator=gen)


def policy_update(policy, optimizer, scheduler, batch: RolloutBatch, advantages: torch.Tensor,
                  loss_mask: torch.Tensor, old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                  cfg: GRPOConfig, info: DistInfo, step: int = 0) -> dict[str, float]:
    """μ epochs over the rollouts, one optimizer update per mini-batch. Returns metrics averaged over the updates
    that produced them; ``skipped_updates`` is the share of updates that changed no weight.

    ``loss_mask`` [N, C] is the completion mask with masked-out rows (truncated, zero-variance groups) zeroed; the
    aggregation normaliser of each mini-batch is its mask total summed over micro-batches AND ranks, so the gradient
    does not depend on how the mini-batch is split. A mini-batch with no loss token on any rank, or whose gradient
    is not finite on some rank, makes no update at all (AdamW's momentum and weight decay would still move the
    weights); the LR schedule advances either way, so it stays a function of the update index.

    Rows whose loss mask is all zero (zero-variance groups under dynamic sampling, masked truncations) add exactly
    0 to the loss and its gradient, so they are not run at all. Under FSDP every rank must run the same number of
    forwards (each one all-gathers the weights): a rank with fewer live rows pads with masked forwards.
    """
    n = len(batch)
    mini = n // cfg.num_mini_batches
    device = next(policy.parameters()).device
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for epoch in range(cfg.mu):
        order = mini_batch_order(n, cfg, step, epoch)
        for m in range(cfg.num_mini_batches):
            rows = order[m * mini:(m + 1) * mini]
            tokens, seqs = algos.normaliser_counts(loss_mask[rows], cfg.loss_agg)
            num_tokens, num_seqs = all_reduce_sum(tokens), all_reduce_sum(seqs)
            metrics: dict[str, float] = {"skipped_updates": 1.0}
            if num_tokens > 0:  # the same decision on every rank: the counts are global
                live = rows[loss_mask[rows].sum(dim=1) > 0]
                n_micro = -(-len(live) // cfg.micro_batch_size)
                if info.world_size > 1:
                    n_micro = int(all_reduce_max(float(n_micro)))
                for j in range(n_micro):
                    idx = live[j * cfg.micro_batch_size:(j + 1) * cfg.micro_batch_size]
                    if len(idx) == 0:  # FSDP padding: one row, fully masked, adds 0
                        idx = rows[:1]
                    mask = loss_mask[idx].to(device)
                    loss, pm = micro_batch_loss(
                        policy, batch.select(idx).narrow(), advantages[idx].to(device), mask,
                        None if old_logp is None else old_logp[idx].to(device),
                        None if ref_logp is None else ref_logp[idx].to(device), num_tokens, num_seqs, cfg,
                        measure_gap=epoch == 0 and m == 0)
                    loss.backward()  # shard_model makes FSDP2 SUM gradients over ranks: Σ_ranks = the global loss
                    pm["loss"] = loss.detach()
                    # Token-weighted share of the global mini-batch: summed over micro-batches and ranks, the
                    # metrics become global token means (and the loss the global loss).
                    share = float(mask.sum()) / num_tokens
                    for k, v in pm.items():
                        metrics[k] = metrics.get(k, 0.0) + float(v) * (1.0 if k == "loss" else share)
                if info.world_size > 1:
                    metrics = {k: all_reduce_sum(v) if k != "skipped_updates" else v for k, v in metrics.items()}
                grad_norm = clip_grad_norm(policy.parameters(), cfg.max_grad_norm)
                if math.isfinite(grad_norm):  # an inf/nan gradient (on any rank) never reaches the weights
                    metrics["grad_norm"] = grad_norm
                    metrics["skipped_updates"] = 0.0
                    optimizer.step()
            with warnings.catch_warnings():  # torch warns when a schedule advances past a skipped first update
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
    return {k: v / counts[k] for k, v in sums.items()}


def train(cfg: GRPOConfig, policy: torch.nn.Module, tokenizer, prompts: list[dict],
          reward_fns: list[tuple[str, float, RewardFn]], info: DistInfo, engine, ref_model=None,
          eval_fn: Callable[[int], dict[str, float]] | None = None, run_plan: RunPlan | None = None,
          extra_files: dict[str, str] | None = None) -> list[dict]:
    """Run ``cfg.total_steps`` GRPO steps; returns the per-step metrics (also logged). See the module docstring.

    ``run_plan``: ``grpo.run_dir.plan_run(cfg, info)`` if the caller already made it (before loading models).
    ``extra_files`` ({name: text}, e.g. the task's prompt recipe) go into every checkpoint folder.
    """
    cfg.validate(info.world_size)
    if cfg.beta > 0 and ref_model is None:
        raise ValueError("beta > 0 needs a reference model (pass ref_model); beta = 0 never builds one")
    plan = run_plan if run_plan is not None else plan_run(cfg, info)
    run_dir = Path(cfg.out_dir)
    prompt_ids, prompts, n_dropped = tokenize_prompts(tokenizer, prompts, cfg.max_prompt_len)
    if not prompts:
        raise ValueError(f"every prompt is longer than max_prompt_len={cfg.max_prompt_len}")
    total_updates = cfg.total_steps * cfg.mu * cfg.num_mini_batches
    optimizer = build_optimizer(policy, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    scheduler = build_scheduler(optimizer, total_updates, cfg.warmup_ratio, cfg.lr_scheduler)

    start_run(plan, cfg, info)
    ckpt = plan.checkpoint
    start_step = restore_checkpoint(plan, cfg, policy, optimizer, scheduler, info)
    if ckpt is not None:
        engine.update_weights(policy)
    logger = RunLogger(run_dir, info.rank == 0, total=cfg.total_steps, initial=start_step,
                       purge_step=plan.tb_purge_step)
    if info.rank == 0:
        logger.note(f"{len(prompts)} prompts ({n_dropped} dropped: longer than {cfg.max_prompt_len} tokens); "
                    f"resuming at step {start_step}" if ckpt else f"{len(prompts)} prompts, {n_dropped} dropped")
    stop_requested = install_sigterm_handler()
    history: list[dict] = []
    if eval_fn is not None and cfg.eval_limit > 0 and start_step == 0:
        logger.scalars(0, {f"eval/{k}": v for k, v in eval_fn(0).items()})

    for step in range(start_step, cfg.total_steps):
        times: dict[str, float] = {}
        t = time.perf_counter()

        # 1. Rollouts: G completions for each of this rank's prompts.
        local = step_prompt_indices(step, cfg, len(prompts), info)
        policy.eval()
        rollouts = engine.generate([prompt_ids[i] for i in local], n=cfg.group_size,
                                   max_new_tokens=cfg.max_completion_len, temperature=cfg.temperature,
                                   top_p=cfg.top_p, stop=cfg.stop or None,
                                   seed=cfg.seed * 1_000_003 + step * info.world_size + info.rank)
        policy.train()
        times["generate"] = time.perf_counter() - t
        t = time.perf_counter()

        # 2. Score with the reward callables (the task's code; model output never reaches the loss unscored).
        samples = [prompts[i] for i in local for _ in range(cfg.group_size)]
        texts = [r.text for r in rollouts]
        rewards, per_fn = score_completions(texts, samples, reward_fns)
        counts = {f"reward/{k}": v for k, v in reward_diagnostics(texts, samples, reward_fns).items()}
        lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float32)
        truncated = torch.tensor([r.finish_reason == "length" for r in rollouts])
        if cfg.overlong_buffer > 0:
            rewards = rewards + algos.overlong_penalty(lengths, cfg.max_completion_len, cfg.overlong_buffer,
                                                       cfg.overlong_penalty)
        batch = collate_rollouts([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                                 [r.logprobs for r in rollouts], tokenizer.pad_token_id)
        times["score"] = time.perf_counter() - t
        t = time.perf_counter()

        # 3. Reference and old log-probs, only when the configuration needs them (the engine's own log-probs are
        # π_old when old_logprobs=rollout).
        ref_logp = frozen_logprobs(ref_model, batch, cfg) if cfg.beta > 0 else None
        shaped = rewards
        if cfg.kl_in_reward:  # the rollout log-probs are π_old's: the sampled policy's KL to the reference
            shaped = algos.kl_in_reward(rewards, batch.rollout_logprobs, ref_logp, batch.completion_mask, cfg.beta)
        old_logp = None
        if cfg.off_policy:
            old_logp = frozen_logprobs(policy, batch, cfg) if cfg.needs_old_logprobs else batch.rollout_logprobs
        times["reference"] = time.perf_counter() - t
        t = time.perf_counter()

        # 4. Advantages (of the KL-shaped reward when kl_in_reward); rows that must not train (truncated,
        # zero-variance groups) get a zero loss mask. A group is zero-variance by its task rewards: the −β·KL term
        # differs between any two samples, and would hide every group that carries no task signal.
        advantages = global_advantages(shaped, cfg, info)
        zero_std = algos.zero_variance_groups(rewards, cfg.group_size)
        keep = torch.ones(len(rollouts))
        if cfg.dynamic_sampling:
            keep = keep * (~zero_std).repeat_interleave(cfg.group_size).float()
        if cfg.mask_truncated:
            keep = keep * algos.truncation_mask(truncated)
        loss_mask = batch.completion_mask * keep[:, None]

        # 5. μ epochs of clipped-surrogate updates.
        train_metrics = policy_update(policy, optimizer, scheduler, batch, advantages, loss_mask, old_logp,
                                      ref_logp, cfg, info, step)
        times["train"] = time.perf_counter() - t
        t = time.perf_counter()

        # 6. Hand the new weights to the engine.
        engine.update_weights(policy)
        times["sync"] = time.perf_counter() - t

        # 7. Log, evaluate, checkpoint.
        metrics = {"reward/mean": rewards.mean(), "reward/std": rewards.std() if len(rewards) > 1 else 0.0,
                   "frac_reward_zero_std": zero_std.float().mean(),
                   "completion/len_mean": lengths.mean(), "completion/len_max": lengths.max(),
                   "completion/truncated_frac": truncated.float().mean(),
                   "lr": scheduler.get_last_lr()[0],
                   **{f"reward/{k}": v.mean() for k, v in per_fn.items()}, **counts,
                   **({"reward/kl_penalty": (rewards - shaped).mean()} if cfg.kl_in_reward else {}),
                   **{f"train/{k}": v for k, v in train_metrics.items()},
                   **{f"time/{k}": v for k, v in times.items()}}
        if cfg.needs_old_logprobs:
            gap = (old_logp - batch.rollout_logprobs).abs() * batch.completion_mask
            metrics["engine_logprob_gap/mean"] = gap.sum() / batch.completion_mask.sum().clamp(min=1)
            metrics["engine_logprob_gap/max"] = gap.max()
        metrics = {k: float(v) for k, v in metrics.items()}
        # Average over ranks (max-type metrics become means of per-rank maxima); the reward callables' counts add up.
        if info.world_size > 1:
            metrics = {k: all_reduce_sum(v) / (1 if k in counts else info.world_size) for k, v in metrics.items()}
        metrics["tokens_per_s"] = metrics["completion/len_mean"] * len(rollouts) * info.world_size / max(
            sum(times.values()), 1e-9)
        history.append({"step": step + 1, **metrics})
        done = step + 1 == cfg.total_steps
        logger.step(step + 1, metrics, samples[:cfg.sample_log_count], rollouts[:cfg.sample_log_count],
                    rewards[:cfg.sample_log_count].tolist(), print_line=done or (step + 1) % cfg.log_every == 0)
        if eval_fn is not None and cfg.eval_limit > 0 and (done or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
            logger.scalars(step + 1, {f"eval/{k}": v for k, v in eval_fn(step + 1).items()})
        stopping = stop_requested()  # polled once: a signal between two polls would exit without saving
        if done or (cfg.save_every and (step + 1) % cfg.save_every == 0) or stopping:
            save_checkpoint(run_dir, step + 1, policy, tokenizer, optimizer, scheduler, {}, cfg.keep_last, info,
                            config=cfg, extra_files=extra_files)
        if stopping:
            logger.note(f"SIGTERM: saved step {step + 1} and stopped")
            break
    logger.close()
    return history
