"""Supervised fine-tuning on (prompt, completion) pairs: completion-only loss, optional packing, FSDP2 loop.

Task-agnostic: the caller renders its data into prompt/completion *text* (``tokenize_pairs``) or token ids
(``build_example``) and this module never looks inside. Conventions:

* A training example is ``prompt_ids + completion_ids + [eos]``; ``labels`` is −100 on every prompt position and
  equals ``input_ids`` on the completion and the final EOS, so the model learns the answer *and* to stop.
* A *row* holds one example (``packing=False``) or several concatenated ones (``packing=True``). Position ids
  restart at 0 at every example; with ``attention_mask=None`` transformers reads those restarts as packed-sequence
  boundaries and builds a block-diagonal causal mask (sdpa/eager) or a varlen flash-attention call, so a packed
  example sees exactly what it would see alone. Rows are right-padded: causal attention never lets a real token
  look at a pad after it, so no 2-D padding mask is needed either.
* The loss of an optimizer step is Σ token NLL / (completion tokens of the whole step, over every gradient
  accumulation micro-batch and every rank): each completion token weighs the same wherever it landed.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from grpo.config import ConfigError
from grpo.config import option as _f
from grpo.grpo_config import RunDirOptions, dtype_problems, run_path_problems

IGNORE = -100
GROUP_STEPS = 16  # rows_for_step with lengths: steps whose rows are sorted together


@dataclass
class SFTConfig(RunDirOptions):
    """Supervised fine-tuning on prompt/completion pairs (completion-only loss)."""
    model: str = _f("smollm2-135m-instruct", "start model: local folder, hub id, or smollm2-135m-instruct")
    data: str = _f("", "training data (a JSONL file the task script turns into prompt/completion pairs)")
    out_dir: str = _f("runs/sft", "run folder: checkpoints, TensorBoard events, config.yaml")
    dtype: str = _f("float32", "parameter dtype: float32 (CPU default) | bfloat16 | float16")
    seed: int = _f(0, "seeds the data order; a resumed run continues the same order")
    epochs: float = _f(1.0, "passes over the data (fractions allowed); ignored when max_steps > 0")
    max_steps: int = _f(0, "optimizer steps to run; 0 = derive from epochs")
    batch_size: int = _f(8, "rows per micro-batch on each rank")
    grad_accum: int = _f(1, "micro-batches per optimizer step")
    max_len: int = _f(1024, "tokens per row; longer examples are dropped (with a count), never cut")
    packing: bool = _f(False, "concatenate several examples into each row of up to max_len tokens")
    lr: float = _f(1e-5, "peak learning rate")
    beta1: float = _f(0.9, "AdamW β₁")
    beta2: float = _f(0.95, "AdamW β₂")
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay (not on biases and norms)")
    warmup_ratio: float = _f(0.03, "linear warmup as a fraction of all optimizer steps")
    lr_scheduler: str = _f("cosine", "cosine | linear | constant")
    max_grad_norm: float = _f(1.0, "global gradient-norm clip (0 = off)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (saves memory, costs ~30% time)")
    group_by_length: bool = _f(False, "put rows of similar length in the same step (less padding; the order stays "
                                      "random at the scale of steps)")
    share_prompt_prefix: bool = _f(True, "run the prompt prefix that every row of a micro-batch shares (instructions, "
                                         "type descriptions) once and reuse its K/V; unpacked rows only")
    log_every: int = _f(1, "TensorBoard and metrics.jsonl every N steps (and at the last)")
    save_every: int = _f(0, "checkpoint every N steps (0 = only at the end; always at the end)")

    def validate(self, world_size: int = 1) -> None:
        problems = self.config_problems(world_size)
        if problems:
            raise ConfigError("invalid SFT config: " + "; ".join(problems))

    def config_problems(self, world_size: int = 1) -> list[str]:
        """Every wrong value or combination (a task subclass adds its own)."""
        problems: list[str] = []
        for name in ("batch_size", "grad_accum", "max_len", "log_every"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            problems.append("set max_steps > 0 or epochs > 0")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            problems.append(f"lr_scheduler={self.lr_scheduler!r}: expected cosine | linear | constant")
        if not 0 <= self.warmup_ratio < 1:
            problems.append("warmup_ratio must be in [0, 1)")
        if self.save_every < 0 or self.max_grad_norm < 0:
            problems.append("save_every and max_grad_norm must be ≥ 0")
        if not self.data:
            problems.append("data is empty: name the training file")
        problems += self.run_dir_problems()
        if not (self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.weight_decay >= 0):
            problems.append("lr must be > 0, beta1 and beta2 in [0, 1), weight_decay ≥ 0")
        problems += dtype_problems(self.dtype)
        return problems

    def path_problems(self) -> list[str]:
        """Files and folders this config names that do not exist (``grpo.config.check_paths`` raises them)."""
        return run_path_problems(self)


# ----------------------------------------------------------------------------- examples, rows, batches

@dataclass
class Row:
    """One training row: ``input_ids``, ``labels`` and ``position_ids`` are lists of the same length. ``group``:
    rows of one group share their prompt's instructions (a data set of a mixture); ``group_by_length`` keeps a
    step inside one group where it can, so ``share_prompt_prefix`` finds a long prefix to run once."""
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    group: int = 0

    @property
    def n_targets(self) -> int:
        """Completion tokens this row trains on (label positions after the causal shift)."""
        return sum(1 for y in self.labels[1:] if y != IGNORE)


def build_example(prompt_ids: Sequence[int], completion_ids: Sequence[int], eos_id: int) -> Row:
    """Concatenate prompt and completion, append EOS (unless already last) and mask the prompt with −100."""
    completion = list(completion_ids)
    if not completion or completion[-1] != eos_id:
        completion.append(eos_id)
    ids = list(prompt_ids) + completion
    labels = [IGNORE] * len(prompt_ids) + completion
    return Row(ids, labels, list(range(len(ids))))


def tokenize_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_len: int, groups: Sequence[int] | None = None
                   ) -> tuple[list[Row], int]:
    """Text pairs → rows of one example each (``groups``: each pair's ``Row.group``); returns (rows, number dropped
    for exceeding max_len).

    Prompt and completion are tokenised *separately*: generation sees the prompt's tokens and then produces the
    completion's, and tokenising the concatenation could merge tokens across that boundary. The prompt text is
    expected to carry its own special tokens (a rendered chat template), so none are added.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: SFT needs one to teach the model to stop")
    rows, dropped = [], 0
    for i, (prompt, completion) in enumerate(pairs):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"]
        row = build_example(p, c, eos)
        row.group = groups[i] if groups is not None else 0
        if len(row.input_ids) > max_len:
            dropped += 1
            continue
        rows.append(row)
    return rows, dropped


def pack_rows(rows: Sequence[Row], max_len: int) -> list[Row]:
    """Greedily concatenate single-example rows, in order, into rows of at most ``max_len`` tokens.

    Each example keeps its own position ids (restarting at 0), which is what marks the boundary for attention.
    """
    packed: list[Row] = []
    cur = Row([], [], [])
    for r in rows:
        if cur.input_ids and len(cur.input_ids) + len(r.input_ids) > max_len:
            packed.append(cur)
            cur = Row([], [], [])
        cur.input_ids += r.input_ids
        # The first label of an example would be predicted from the previous example's last token: mask it.
        cur.labels += [IGNORE] + r.labels[1:]
        cur.position_ids += r.position_ids
    if cur.input_ids:
        packed.append(cur)
    return packed


def collate(rows: Sequence[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest: input_ids/labels/position_ids, each [B, T] long.

    Pad positions continue the last example's positions (no restart), so they do not open a new packed segment;
    they only ever attend backwards and carry label −100.
    """
    T = max(len(r.input_ids) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        last = r.position_ids[-1] if n else -1
        pos[i, :n] = torch.tensor(r.position_ids)
        pos[i, n:] = torch.arange(last + 1, last + 1 + T - n)
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def completion_nll_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], **model_inputs
                       ) -> tuple[torch.Tensor, int]:
    """(Σ NLL over completion tokens — a scalar with grad, number of those tokens) for one collated batch.

    Only the columns whose next token is a target get logits (``logits_to_keep`` with an index tensor), so long
    prompts cost no vocabulary-sized activations. ``model_inputs`` (an attention mask and a KV cache holding a
    shared prefix, see ``shared_prefix_nll_sum``) go to the forward; without them it is one plain pass.
    """
    device = next(model.parameters()).device
    targets = batch["labels"][:, 1:]                                     # [B, T-1]: column t predicts token t+1
    cols = (targets != IGNORE).any(dim=0).nonzero().squeeze(-1)          # [K]
    out = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                use_cache="past_key_values" in model_inputs, logits_to_keep=cols.to(device), **model_inputs)
    logits = out.logits.float()                                          # [B, K, V]
    tgt = targets[:, cols].to(device)                                    # [B, K]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    return nll, int((tgt != IGNORE).sum())


def common_prefix_len(rows: Sequence[Row]) -> int:
    """Tokens that every row starts with, stopping one token before the first completion label of any row.

    The first completion token is predicted from the position before it, so the shared part must end before that
    position for every target's logits to come from the per-row pass.
    """
    n = min(next((i for i, y in enumerate(r.labels) if y != IGNORE), len(r.labels)) for r in rows) - 1
    first = rows[0].input_ids
    for r in rows[1:]:
        n = min(n, next((i for i, (a, b) in enumerate(zip(first[:n], r.input_ids[:n])) if a != b), n))
    return max(n, 0)


def shared_prefix_nll_sum(model: torch.nn.Module, rows: Sequence[Row], prefix_len: int, pad_id: int
                          ) -> tuple[torch.Tensor, int]:
    """``completion_nll_sum`` of unpacked ``rows`` that share their first ``prefix_len`` tokens, with the prefix run
    once: its K/V (with gradients) is fanned out to every row and only the rows' own tokens run on top.

    Same function of the weights as the plain pass (tested, gradients included). A micro-batch of 8 CoNLL
    sentences under a 150-token instruction prefix feeds ~790 tokens instead of ~1,840.
    """
    from transformers.cache_utils import DynamicCache

    device = next(model.parameters()).device
    L = prefix_len
    cache = DynamicCache(config=model.config)
    prefix_out = model(input_ids=torch.tensor([rows[0].input_ids[:L]], device=device),
                       position_ids=torch.arange(L, device=device)[None], past_key_values=cache, use_cache=True,
                       logits_to_keep=1)
    fan = torch.zeros(len(rows), dtype=torch.long, device=device)
    for layer in cache.layers:  # differentiable gather: the prefix gradient is summed over the rows
        layer.keys, layer.values = layer.keys[fan], layer.values[fan]
    rest = collate([Row(r.input_ids[L:], r.labels[L:], r.position_ids[L:]) for r in rows], pad_id)
    real = torch.zeros_like(rest["input_ids"])
    for i, r in enumerate(rows):
        real[i, :len(r.input_ids) - L] = 1
    mask = torch.cat([torch.ones(len(rows), L, dtype=torch.long), real], dim=1)
    nll, n_targets = completion_nll_sum(model, rest, attention_mask=mask.to(device), past_key_values=cache)
    # The prefix pass's own output predicts a prompt token (no loss), but it must still be in the graph: FSDP2
    # unshards a block for backward from a hook on the block's output, and the last block's prefix output reaches
    # the loss only through this term (its K/V alone would meet freed, sharded weights).
    return nll + 0.0 * prefix_out.logits.sum(), n_targets


# ----------------------------------------------------------------------------- data order

def rows_for_step(n_rows: int, step: int, rows_per_step: int, seed: int,
                  lengths: Sequence[int] | None = None, groups: Sequence[int] | None = None) -> list[int]:
    """Row indices of global optimizer step ``step``: a fresh permutation per epoch, wrapped to fill the last step.

    ``lengths`` (tokens per row) groups rows of similar length into the same step, as transformers'
    ``group_by_length``: each run of ``GROUP_STEPS`` steps of the permutation is sorted by length and cut into steps,
    and the steps of the epoch are shuffled again, so a step pads to a length its rows nearly share (on 600 CoNLL CoT
    rows a random step of 8 carries 1.68x the real tokens, a grouped one 1.07x) while the epoch still visits every
    row once in an order that does not run from short to long. ``groups`` (with ``lengths``): the run is sorted by
    group first, so a step holds one group's rows but where a group runs out. A pure function of (step, seed), so a
    resumed run picks up the exact order it would have seen.
    """
    steps_per_epoch = math.ceil(n_rows / rows_per_step)
    epoch, k = divmod(step, steps_per_epoch)
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(n_rows))
    rng.shuffle(order)
    if lengths is not None:
        group = rows_per_step * GROUP_STEPS
        def key(i: int) -> tuple[int, int]:
            return (groups[i] if groups is not None else 0, -lengths[i])

        order = [i for g in range(0, n_rows, group) for i in sorted(order[g:g + group], key=key)]
        full = n_rows - n_rows % rows_per_step
        cuts = [order[s:s + rows_per_step] for s in range(0, full, rows_per_step)]
        rng.shuffle(cuts)  # a short last cut stays last, where the wrap-around fills it
        order = [i for cut in cuts for i in cut] + order[full:]
    idx = [order[(k * rows_per_step + j) % n_rows] for j in range(rows_per_step)]
    return idx


def total_steps(cfg: SFTConfig, n_rows: int, world_size: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    rows_per_step = cfg.batch_size * cfg.grad_accum * world_size
    return max(1, math.ceil(cfg.epochs * n_rows / rows_per_step))


# ----------------------------------------------------------------------------- training loop

def accumulate_gradients(model: torch.nn.Module, micro_batches: Sequence[Sequence[Row]], pad_id: int,
                         global_targets: float, share_prefix: bool = False) -> torch.Tensor:
    """Backward every micro-batch with loss = NLL sum / ``global_targets``; returns this rank's NLL sum (detached).

    ``global_targets`` counts the completion tokens of the whole optimizer step on every rank; ``shard_model``
    makes FSDP2 *sum* gradients over ranks, so the accumulated gradient is exactly that of the step's token mean,
    however the tokens are split across micro-batches and ranks. ``share_prefix``: run each micro-batch's common
    prompt prefix once (``shared_prefix_nll_sum``). Whether a micro-batch takes that path is agreed over ranks,
    so every rank runs the same forwards and FSDP2 issues the same all-gathers.
    """
    from grpo.distributed import all_reduce_sum

    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for mb in micro_batches:
        prefix = common_prefix_len(mb) if share_prefix else 0
        if share_prefix and all_reduce_sum(float(prefix < 1)) == 0:
            nll, _ = shared_prefix_nll_sum(model, mb, prefix, pad_id)
        else:
            nll, _ = completion_nll_sum(model, collate(mb, pad_id))
        (nll / max(global_targets, 1.0)).backward()
        total += nll.detach()
    return total


def _train_step(model, optimizer, scheduler, data: Sequence[Row], step: int, cfg: SFTConfig, info, pad_id: int
                ) -> dict:
    """One optimizer step (index ``step``) on this rank's share of the step's rows; returns the step's metrics."""
    from grpo.batch import supports_shared_prefix
    from grpo.distributed import all_reduce_sum, clip_grad_norm

    t0 = time.perf_counter()
    per_rank = cfg.batch_size * cfg.grad_accum
    lengths = [len(r.input_ids) for r in data] if cfg.group_by_length else None
    groups = [r.group for r in data] if cfg.group_by_length else None  # one group (the usual case): same order
    idx = rows_for_step(len(data), step, per_rank * info.world_size, cfg.seed, lengths, groups)
    mine = [data[i] for i in idx[info.rank * per_rank:(info.rank + 1) * per_rank]]
    micro = [mine[m * cfg.batch_size:(m + 1) * cfg.batch_size] for m in range(cfg.grad_accum)]
    n_targets = all_reduce_sum(float(sum(r.n_targets for r in mine)))
    n_tokens = all_reduce_sum(float(sum(len(r.input_ids) for r in mine)))
    share = cfg.share_prompt_prefix and not cfg.packing and supports_shared_prefix(model)
    nll = accumulate_gradients(model, micro, pad_id, n_targets, share)
    grad_norm = clip_grad_norm(model.parameters(), cfg.max_grad_norm or float("inf"))
    finite = math.isfinite(grad_norm)  # an inf/nan gradient (on any rank) never reaches the weights
    if finite:
        optimizer.step()
    # A non-finite gradient skips the update, not the step: the schedule and the data order stay aligned.
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return {"step": step + 1, "loss": all_reduce_sum(float(nll)) / max(n_targets, 1.0), "grad_norm": grad_norm,
            "lr": lr, "tokens_per_s": n_tokens / (time.perf_counter() - t0), "completion_tokens": n_targets,
            "skipped_nonfinite": float(not finite)}


def train_sft(cfg: SFTConfig, model: torch.nn.Module, tokenizer, rows: Sequence[Row], info, run_plan=None,
              extra_files: dict[str, str] | None = None) -> dict:
    """Run SFT on already tokenised single-example ``rows``; returns the final trainer state.

    ``info`` is the ``grpo.distributed.DistInfo`` of this process; the model must already be on ``info.device``
    (and sharded with ``shard_model`` when distributed). Checkpoints, config.yaml and TensorBoard events go to
    ``cfg.out_dir``. ``run_plan``: ``grpo.run_dir.plan_run(cfg, info)`` if the caller made it before loading models.
    ``extra_files`` ({name: text}) go into every checkpoint folder.
    """
    from grpo.checkpoint import save_checkpoint
    from grpo.graceful_exit import GracefulExit
    from grpo.optim import build_optimizer, build_scheduler
    from grpo.run_dir import plan_run, restore_checkpoint, start_run

    cfg.validate(info.world_size)
    plan = run_plan if run_plan is not None else plan_run(cfg, info)
    if not rows:
        raise ValueError("no training rows: every example was dropped or the data is empty")
    data = pack_rows(rows, cfg.max_len) if cfg.packing else list(rows)
    n_steps = total_steps(cfg, len(data), info.world_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = build_optimizer(model, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    scheduler = build_scheduler(optimizer, n_steps, cfg.warmup_ratio, cfg.lr_scheduler)

    run_dir = Path(cfg.out_dir)
    start_run(plan, cfg, info)
    ckpt = plan.checkpoint
    step = restore_checkpoint(plan, cfg, model, optimizer, scheduler, info)

    from grpo.rollout_io import RunLogger

    logger = RunLogger(run_dir, info.rank == 0, total=n_steps, initial=step, desc="sft", samples=False,
                       purge_step=plan.tb_purge_step)
    logger.note(f"sft: {len(rows)} examples in {len(data)} rows, {n_steps} steps"
                + (f", resuming at step {step} from {ckpt}" if ckpt else ""))

    state: dict = {"step": step}
    with GracefulExit() as stop:
        while step < n_steps:
            state = _train_step(model, optimizer, scheduler, data, step, cfg, info, pad_id)
            step = state["step"]
            logger.advance(loss=f"{state['loss']:.4f}", gnorm=f"{state['grad_norm']:.3g}")
            if step % cfg.log_every == 0 or step == n_steps:
                logger.record(step, {f"sft/{k}": v for k, v in state.items() if k != "step"})
            stopping = stop.should_stop()
            if step == n_steps or stopping or (cfg.save_every and step % cfg.save_every == 0):
                save_checkpoint(run_dir, step, model, tokenizer, optimizer, scheduler, state, cfg.keep_last, info,
                                config=cfg, extra_files=extra_files)
            if stopping:
                logger.note(f"SIGTERM: saved step {step} and stopped")
                break
    logger.close()
    return state
