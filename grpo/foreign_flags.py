"""Names that TRL / transformers users type, mapped to this project's config fields.

An unknown ``--learning_rate`` then says "did you mean --lr (TRL/transformers' learning_rate)?" instead of only
listing spelling neighbours. Each entry lists candidate fields in order of preference; the first one the config
class has wins (``per_device_train_batch_size`` is GRPO's ``micro_batch_size`` but SFT's ``batch_size``). An entry
with a note and no matching field prints the note: the concept exists here under another shape.
"""
from __future__ import annotations

# foreign name -> (candidate fields, note shown when none of them is a field of the config)
FOREIGN_FLAGS: dict[str, tuple[tuple[str, ...], str]] = {
    "learning_rate": (("lr",), ""),
    "num_generations": (("group_size",), ""),
    "save_total_limit": (("keep_last",), ""),
    "save_steps": (("save_every",), ""),
    "logging_steps": (("log_every",), ""),
    "eval_steps": (("eval_every",), ""),
    "per_device_train_batch_size": (("micro_batch_size", "batch_size"), ""),
    "per_device_eval_batch_size": (("batch_size",), ""),
    "gradient_accumulation_steps": (("grad_accum",), "GRPO accumulates on its own: prompts_per_step × group_size "
                                                     "rollouts are split into micro_batch_size chunks"),
    "num_train_epochs": (("epochs",), "GRPO counts rollout rounds: set total_steps"),
    "max_steps": (("total_steps", "max_steps"), ""),
    "output_dir": (("out_dir",), ""),
    "model_name_or_path": (("model",), ""),
    "torch_dtype": (("dtype",), ""),
    "bf16": ((), "use --dtype bfloat16"),
    "fp16": ((), "use --dtype float16"),
    "max_completion_length": (("max_completion_len", "max_new_tokens"), ""),
    "max_new_tokens": (("max_completion_len",), ""),
    "max_prompt_length": (("max_prompt_len",), ""),
    "max_length": (("max_len",), ""),
    "max_seq_length": (("max_len",), ""),
    "lr_scheduler_type": (("lr_scheduler",), ""),
    "adam_beta1": (("beta1",), ""),
    "adam_beta2": (("beta2",), ""),
    "num_iterations": (("mu",), ""),
    "epsilon": (("eps_low",), ""),
    "epsilon_high": (("eps_high",), ""),
    "loss_type": (("loss_agg",), ""),
    "scale_rewards": (("adv_scale",), ""),
    "reward_funcs": (("reward_weights",), ""),
    "mask_truncated_completions": (("mask_truncated",), ""),
    "resume_from_checkpoint": (("resume",), ""),
    "dataset_name": (("dataset",), ""),
    "use_vllm": (("engine",), "use --engine vllm"),
    "report_to": ((), "there is nothing to choose: every run writes TensorBoard events (<out_dir>/tb) and "
                      "<out_dir>/metrics.jsonl"),
    "logging_dir": ((), "TensorBoard events always go to <out_dir>/tb"),
}


def foreign_flag_hint(name: str, fields: list[str], option: bool) -> str:
    """"; did you mean --lr (TRL/transformers' learning_rate)?" for a known foreign name, else ""."""
    entry = FOREIGN_FLAGS.get(name.replace("-", "_"))
    if entry is None:
        return ""
    candidates, note = entry
    ours = next((c for c in candidates if c in fields), None)
    if ours is None:
        return f"; {note}" if note else ""
    shown = f"--{ours}" if option else repr(ours)
    return f"; did you mean {shown} (TRL/transformers' {name.replace('-', '_')})?"
