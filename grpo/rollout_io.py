"""What goes in and out of the GRPO loop besides tensors: prompt tokenisation and run logging.

Logging is deliberately plain: a tqdm bar, one console line per step, TensorBoard scalars, and ``metrics.jsonl``, and ``samples.jsonl``
with a few completions and their rewards per step — the file people actually read to see what the model does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def tokenize_prompts(tokenizer, prompts: list[dict], max_prompt_len: int) -> tuple[list[list[int]], list[dict], int]:
    """Chat-render (``messages``) or tokenize (``prompt``) every record; drop those over ``max_prompt_len`` tokens.

    Returns (token ids, the kept records, how many were dropped).
    """
    ids, kept = [], []
    for i, record in enumerate(prompts):
        if "prompt_ids" in record:
            toks = list(record["prompt_ids"])
        elif "messages" in record:
            text = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
            toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        elif "prompt" in record:
            toks = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        else:
            raise ValueError(f"prompt record {i} has none of 'messages', 'prompt', 'prompt_ids': {sorted(record)}")
        if len(toks) <= max_prompt_len:
            ids.append(toks)
            kept.append(record)
    return ids, kept, len(prompts) - len(kept)


# Console columns: (metric key, short label, format)
_CONSOLE = [("reward/mean", "reward", "{:.3f}"), ("reward/std", "±", "{:.3f}"), ("train/kl", "kl", "{:.4f}"),
            ("train/entropy", "ent", "{:.2f}"), ("completion/len_mean", "len", "{:.0f}"),
            ("train/grad_norm", "gnorm", "{:.3f}"), ("tokens_per_s", "tok/s", "{:.0f}")]


class RunLogger:
    """TensorBoard + console + samples.jsonl, on the main rank only (other ranks get a silent logger)."""

    def __init__(self, run_dir: Path, enabled: bool, total: int, initial: int = 0, purge_step: int | None = None):
        """``purge_step``: TensorBoard hides the events an earlier writer logged at this step or later (a resumed
        run re-logs them); the JSONL files are trimmed before (grpo.run_dir.start_run)."""
        self.enabled = enabled
        self.writer = self.bar = self.samples = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=purge_step)
        self.samples = open(run_dir / "samples.jsonl", "a", encoding="utf-8")
        self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=total, initial=initial, desc="grpo", unit="step", file=sys.stderr, dynamic_ncols=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.metrics.write(json.dumps({"step": step, **values}) + "\n")  # eval lines: only eval/* keys
        self.metrics.flush()
        self.writer.flush()
        self.bar.write(f"step {step} " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def step(self, step: int, metrics: dict[str, float], samples: list[dict], rollouts: list, rewards: list[float]):
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        line = " ".join(f"{label} {fmt.format(metrics[k])}" for k, label, fmt in _CONSOLE if k in metrics)
        self.bar.write(f"step {step:>5} | {line}")
        for sample, rollout, reward in zip(samples, rollouts, rewards):
            record = {"step": step, "reward": reward, "finish_reason": rollout.finish_reason,
                      "completion": rollout.text,
                      **{k: v for k, v in sample.items() if k not in ("messages", "prompt_ids")}}
            self.samples.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.samples.flush()
        self.writer.flush()
        self.bar.update(1)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.samples.close()
            self.metrics.close()
