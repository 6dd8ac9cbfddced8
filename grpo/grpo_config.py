"""Every knob of the GRPO trainer, with the blog's and ReasoningNER's values documented beside the defaults.

A *step* is one rollout round: ``prompts_per_step`` prompts × ``group_size`` completions are generated, scored and
turned into advantages, then the policy takes ``mu × num_mini_batches`` optimizer updates on them (μ epochs over the
round's mini-batches, as in PPO / GRPO's μ). With μ = 1 and one mini-batch the update is exactly on-policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grpo.config import ConfigError
from grpo.config import dict_option as _dict
from grpo.config import list_option as _list
from grpo.config import option as _f
from grpo.errors import UserError


def run_path_problems(cfg) -> list[str]:
    """What is missing on disk for the fields every training config has: the model folder, the resume
    checkpoint, and out_dir being a folder. Kept out of ``validate()``: a config saved with a run must parse again
    after the folders it named are gone."""
    from grpo.models import check_model_spec

    problems = []
    try:
        check_model_spec(cfg.model)
    except UserError as exc:
        problems.append(str(exc))
    if cfg.resume not in ("none", "auto") and cfg.resume and not Path(cfg.resume).is_dir():
        problems.append(f"resume={cfg.resume}: no such checkpoint folder (none | auto | a checkpoint path)")
    if Path(cfg.out_dir).exists() and not Path(cfg.out_dir).is_dir():
        problems.append(f"out_dir={cfg.out_dir} is a file, not a folder")
    return problems


def dtype_problems(dtype: str, field: str = "dtype") -> list[str]:
    from grpo.models import DTYPES

    return [] if dtype in DTYPES else [f"{field}={dtype!r}: expected one of {', '.join(DTYPES)}"]


@dataclass
class RunDirOptions:
    """How a run treats its out_dir and checkpoints: the fields both trainers share (grpo.run_dir acts on them)."""
    keep_last: int = _f(2, "checkpoints kept (≥ 1): older steps are deleted as new ones are saved")
    resume: str = _f("none", "none (a new run: out_dir must hold no run) | auto (newest valid checkpoint in out_dir; "
                             "damaged ones are skipped) | a checkpoint path")
    overwrite: bool = _f(False, "a new run in an out_dir that holds a run: move that run's files to "
                                "<out_dir>.old-<time>/ first (nothing is deleted)")
    allow_config_change: bool = _f(False, "resume even if the config differs from the checkpoint's (the changes "
                                          "are used and listed in out_dir/config_changes.jsonl)")

    def run_dir_problems(self) -> list[str]:
        problems = []
        if not (self.resume in ("none", "auto") or bool(self.resume)):
            problems.append("resume: none | auto | a checkpoint path")
        if self.keep_last < 1:
            problems.append(f"keep_last={self.keep_last} must be ≥ 1 (the final checkpoint is kept)")
        if self.overwrite and self.resume != "none":
            problems.append(f"overwrite starts a new run; it cannot be combined with resume={self.resume!r}")
        return problems


@dataclass
class GRPOConfig(RunDirOptions):
    # --- model and run
    model: str = _f("smollm2-135m-instruct", "policy: local folder, hub id, or smollm2-135m-instruct (embedded)")
    dtype: str = _f("float32", "parameter dtype: float32 (CPU default) | bfloat16 | float16")
    out_dir: str = _f("runs/grpo", "run folder: checkpoints, TensorBoard events, samples.jsonl, config.yaml")
    seed: int = _f(0, "seeds data order and sampling; a resumed run continues the same streams")
    total_steps: int = _f(20, "rollout rounds to run")

    # --- rollouts
    prompts_per_step: int = _f(8, "distinct prompts per step, summed over ranks")
    group_size: int = _f(8, "G: completions per prompt (blog 8, ReasoningNER 16)")
    max_prompt_len: int = _f(512, "prompts longer than this (tokens) are dropped from the data, with a count")
    max_completion_len: int = _f(256, "new tokens per completion")
    temperature: float = _f(1.0, "sampling temperature; the trainer scores log-probs at the same temperature")
    top_p: float = _f(1.0, "nucleus sampling")
    stop: list[str] = _list([], "extra stop strings (kept in the completion), e.g. </entity>")
    engine: str = _f("auto", "rollout engine: torch (shares the module) | vllm (colocated, weights synced in memory) "
                     "| auto (vllm on a CUDA machine with vLLM installed, else torch)")
    max_batch_tokens: int = _f(65536, "torch engine: (prompt+new) tokens × rows per generation chunk (memory bound)")
    rollout_dtype: str = _f("", "dtype rollouts and evaluations generate in; empty = dtype. bfloat16 with fp32 "
                                "weights on a CPU with native bf16 (AMX, AVX512-BF16): the torch engine decodes from "
                                "bf16 copies, ~1.5x faster; the sampling policy is then a rounded copy of the "
                                "trained one, so keep old_logprobs=recompute. vllm engine: its dtype")
    vllm_kv_cache_gib: float = _f(1.0, "vllm engine: KV cache size on CPU (GiB)")
    vllm_gpu_memory_utilization: float = _f(0.3, "vllm engine: fraction of GPU memory on GPU")

    # --- rewards and advantages
    reward_weights: dict[str, float] = _dict({}, "reward name -> weight; the task supplies the callables")
    adv_scale: str = _f("group", "advantage scaling: group (GRPO) | batch | none (Dr. GRPO)")
    dynamic_sampling: bool = _f(False, "DAPO: drop groups whose rewards are all equal (zero advantage)")
    mask_truncated: bool = _f(False, "DAPO: completions cut at max_completion_len get no loss")
    overlong_buffer: int = _f(0, "DAPO soft overlong penalty zone (tokens before max_completion_len); 0 = off")
    overlong_penalty: float = _f(1.0, "DAPO overlong penalty at max_completion_len")

    # --- loss
    mu: int = _f(1, "μ: epochs over each step's rollouts (ReasoningNER 4)")
    num_mini_batches: int = _f(1, "optimizer updates per epoch over the step's rollouts")
    micro_batch_size: int = _f(8, "sequences per forward/backward on each rank (gradient accumulation)")
    eps_low: float = _f(0.2, "clip ratio below: 1 − eps_low")
    eps_high: float = _f(0.2, "clip ratio above: 1 + eps_high (DAPO clip-higher; ReasoningNER 0.28)")
    dual_clip: float | None = _f(None, "dual-clip constant c > 1 for negative advantages; none = off")
    loss_agg: str = _f("seq_mean", "seq_mean (GRPO) | token_mean (DAPO) | constant (Dr. GRPO)")
    beta: float = _f(0.04, "KL coefficient; 0 = no reference model is built or run")
    kl_estimator: str = _f("k3", "k1 | k2 | k3")
    kl_in_reward: bool = _f(False, "subtract β·Σk1 from the reward instead of adding β·KL to the loss")
    rollout_correction: str = _f("none", "engine/trainer mismatch correction: none | token | sequence")
    rollout_correction_mode: str = _f("truncate", "truncate (TIS) | mask (MIS)")
    rollout_correction_threshold: float = _f(2.0, "C: importance-weight cap (mask also drops below 1/C)")
    old_logprobs: str = _f("recompute", "π_old of off-policy updates: recompute (a forward pass of the policy "
                           "before the updates; right for any engine) | rollout (the engine's sampling log-probs, "
                           "no extra pass; right only when the engine scores as the trainer does: the torch engine "
                           "in float32 agrees within 1e-4)")

    # --- optimisation (the blog's values)
    lr: float = _f(5e-6, "peak learning rate")
    beta1: float = _f(0.9, "AdamW β₁")
    beta2: float = _f(0.99, "AdamW β₂")
    weight_decay: float = _f(0.1, "AdamW decoupled weight decay (not on biases and norms)")
    warmup_ratio: float = _f(0.1, "linear warmup as a fraction of all optimizer updates")
    lr_scheduler: str = _f("cosine", "cosine | linear | constant")
    max_grad_norm: float = _f(0.1, "global gradient-norm clip")
    share_prompt_prefix: bool = _f(True, "score each distinct prompt of a micro-batch once and reuse its K/V for "
                                         "its completions (same result; off under gradient checkpointing)")
    gradient_checkpointing: bool = _f(False, "recompute activations in backward (saves memory, costs ~30% time)")

    # --- bookkeeping
    log_every: int = _f(1, "print a console line every N steps (metrics.jsonl and TensorBoard get every step)")
    sample_log_count: int = _f(4, "completions per step written to samples.jsonl (0 = none)")
    eval_every: int = _f(0, "evaluate on the dev subset every N steps (0 = only at start and end if eval_limit)")
    eval_limit: int = _f(0, "dev examples per evaluation; 0 = no evaluation during training")
    save_every: int = _f(10, "checkpoint every N steps (0 = only at the end; always at the end)")

    def validate(self, world_size: int = 1) -> None:
        """Fail at start, naming the fields to change, rather than deep inside the loop."""
        problems = self.config_problems(world_size)
        if problems:
            raise ConfigError("invalid GRPO config: " + "; ".join(problems))

    def config_problems(self, world_size: int = 1) -> list[str]:
        """Every wrong value or combination, as "field=value: what is expected" (a task subclass adds its own)."""
        problems: list[str] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                problems.append(msg)

        choices = {"adv_scale": ("group", "batch", "none"), "loss_agg": ("seq_mean", "token_mean", "constant"),
                   "kl_estimator": ("k1", "k2", "k3"), "engine": ("torch", "vllm", "auto"),
                   "rollout_correction": ("none", "token", "sequence"),
                   "rollout_correction_mode": ("truncate", "mask"),
                   "old_logprobs": ("recompute", "rollout"),
                   "lr_scheduler": ("cosine", "linear", "constant")}
        for name, allowed in choices.items():
            need(getattr(self, name) in allowed, f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        for name in ("total_steps", "prompts_per_step", "group_size", "mu", "num_mini_batches", "micro_batch_size",
                     "max_completion_len", "max_prompt_len"):
            need(getattr(self, name) >= 1, f"{name} must be ≥ 1")
        need(self.prompts_per_step % world_size == 0,
             f"prompts_per_step={self.prompts_per_step} must be divisible by the number of ranks ({world_size})")
        rows = self.prompts_per_step // max(world_size, 1) * self.group_size
        need(rows % self.num_mini_batches == 0,
             f"each rank's {rows} rollouts (prompts_per_step/ranks × group_size) must split into "
             f"num_mini_batches={self.num_mini_batches}")
        mini = rows // max(self.num_mini_batches, 1)
        need(mini % self.micro_batch_size == 0 or mini < self.micro_batch_size,
             f"a mini-batch of {mini} rollouts per rank must be a multiple of micro_batch_size={self.micro_batch_size}")
        need(self.group_size >= 2 or self.adv_scale == "none",
             "group_size=1 gives zero advantages: raise group_size")
        need(0 <= self.eps_low < 1 and self.eps_high >= 0, "eps_low must be in [0, 1) and eps_high ≥ 0")
        need(self.dual_clip is None or self.dual_clip > 1, "dual_clip must be > 1 (or none)")
        need(self.beta >= 0, "beta must be ≥ 0")
        need(not (self.kl_in_reward and self.beta == 0), "kl_in_reward needs beta > 0")
        need(self.temperature >= 0 and 0 < self.top_p <= 1, "temperature ≥ 0 and 0 < top_p ≤ 1")
        need(self.temperature > 0, "GRPO needs sampling: temperature must be > 0")
        need(self.overlong_buffer < self.max_completion_len, "overlong_buffer must be < max_completion_len")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        need(self.rollout_correction_threshold > 1, "rollout_correction_threshold must be > 1")
        need(self.old_logprobs == "recompute" or self.rollout_correction == "none",
             "old_logprobs=rollout takes the engine's log-probs as π_old, so there is no π_rollout ≠ π_old to "
             "correct: set rollout_correction=none or old_logprobs=recompute")
        need(bool(self.reward_weights), "reward_weights is empty: name at least one reward")
        need(self.save_every >= 0, f"save_every={self.save_every} must be ≥ 0 (0 = only at the end)")
        problems += self.run_dir_problems()
        problems += dtype_problems(self.dtype)
        if self.rollout_dtype:
            problems += dtype_problems(self.rollout_dtype, "rollout_dtype")
        need(not self.rollout_dtype or self.old_logprobs == "recompute" or not self.off_policy,
             f"rollout_dtype={self.rollout_dtype} samples from a rounded copy of the policy, whose log-probs cannot "
             f"stand for π_old: set old_logprobs=recompute")
        need(self.lr > 0 and 0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.weight_decay >= 0,
             "lr must be > 0, beta1 and beta2 in [0, 1), weight_decay ≥ 0")
        need(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        need(self.max_batch_tokens >= 1 and self.vllm_kv_cache_gib > 0
             and 0 < self.vllm_gpu_memory_utilization <= 1,
             "max_batch_tokens ≥ 1, vllm_kv_cache_gib > 0 and 0 < vllm_gpu_memory_utilization ≤ 1")
        need(self.overlong_buffer >= 0 and self.overlong_penalty >= 0, "overlong_buffer and overlong_penalty ≥ 0")
        for name in ("sample_log_count", "eval_every", "eval_limit"):
            need(getattr(self, name) >= 0, f"{name}={getattr(self, name)} must be ≥ 0")
        need(self.log_every >= 1, f"log_every={self.log_every} must be ≥ 1")
        return problems

    def path_problems(self) -> list[str]:
        """Files and folders this config names that do not exist (``grpo.config.check_paths`` raises them)."""
        return run_path_problems(self)

    @property
    def off_policy(self) -> bool:
        """Some update runs on weights other than those that sampled (μ > 1, several mini-batches), or the engine
        is another model (mismatch correction): the loss needs π_old's log-probs, not the forward's detached."""
        return self.mu > 1 or self.num_mini_batches > 1 or self.rollout_correction != "none"

    @property
    def needs_old_logprobs(self) -> bool:
        """π_old is recomputed by a policy forward, unless the engine's log-probs stand for it (old_logprobs=rollout)."""
        return self.off_policy and self.old_logprobs == "recompute"
