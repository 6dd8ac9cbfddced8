"""What goes in and out of the GRPO loop besides tensors: prompt tokenisation and run logging.

Logging is deliberately plain: a tqdm bar, a console line every ``log_every`` steps, TensorBoard scalars, ``metrics.jsonl``, and ``samples.jsonl``
with a few completions and their rewards per step — the file people actually read to see what the model does.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from grpo.errors import report_disk_full


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
    """TensorBoard + metrics.jsonl + console (+ samples.jsonl for GRPO), on the main rank only (other ranks get a
    silent logger). GRPO logs through ``step``, SFT through ``record`` + ``advance``, evaluations through
    ``scalars``; every logged step is one metrics.jsonl line ``{"step": N, **metrics}``."""

    def __init__(self, run_dir: Path, enabled: bool, total: int, initial: int = 0, desc: str = "grpo",
                 samples: bool = True, purge_step: int | None = None):
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
        if samples:
            self.samples = open(run_dir / "samples.jsonl", "a", encoding="utf-8")
        self.metrics_path = run_dir / "metrics.jsonl"
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def record(self, step: int, values: dict[str, float]) -> None:
        """TensorBoard scalars and one metrics.jsonl line, no console output."""
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        with report_disk_full(self.metrics_path):
            self.metrics.write(json.dumps({"step": step, **values}) + "\n")
            self.metrics.flush()
        self.writer.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """``record`` plus a console line with every value (evaluation results: only eval/* keys)."""
        if not self.enabled:
            return
        self.record(step, values)
        self.bar.write(f"step {step} " + " ".join(f"{k}={v:.4f}" for k, v in values.items()))

    def advance(self, **postfix: str) -> None:
        """Move the progress bar one step, showing ``postfix`` beside it."""
        if self.enabled:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix)

    def step(self, step: int, metrics: dict[str, float], samples: list[dict], rollouts: list, rewards: list[float],
             print_line: bool = True):
        """One GRPO step: ``record``, a console line when ``print_line`` (``log_every``), samples.jsonl."""
        if not self.enabled:
            return
        self.record(step, metrics)
        if print_line:
            line = " ".join(f"{label} {fmt.format(metrics[k])}" for k, label, fmt in _CONSOLE if k in metrics)
            self.bar.write(f"step {step:>5} | {line}")
        with report_disk_full(self.samples.name):
            for sample, rollout, reward in zip(samples, rollouts, rewards):
                record = {"step": step, "reward": reward, "finish_reason": rollout.finish_reason,
                          "completion": rollout.text,
                          **{k: v for k, v in sample.items() if k not in ("messages", "prompt_ids")}}
                self.samples.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.samples.flush()
        self.advance()

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            if self.samples is not None:
                self.samples.close()
            self.metrics.close()
