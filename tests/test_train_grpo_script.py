"""train_grpo.py end to end on the embedded SmolLM2 and real CoNLL-2003 prompts (one tiny step), as users run it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_one_step_on_smollm2_writes_a_loadable_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    cmd = [sys.executable, "train_grpo.py", "--config", "configs/grpo_smollm2_conll.yaml",
           "--model", "smollm2-135m-instruct", "--out_dir", str(tmp_path), "--total_steps", "1",
           "--prompts_per_step", "1", "--group_size", "2", "--max_completion_len", "8", "--limit", "4",
           "--offset", "0", "--eval_limit", "0", "--micro_batch_size", "2", "--beta", "0.04", "--mu", "2",
           "--dynamic_sampling", "false"]  # two 8-token answers of the base model score alike: keep the group
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The preset's all-types JSON format: one prompt per sentence, so the first 4 train sentences give 4 prompts.
    assert "4 prompts, 0 dropped" in proc.stdout + proc.stderr
    assert "host memory: freed memory kept in the process" in proc.stdout  # grpo/host_memory.py ran
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["step"] == 1
    # β > 0 built a reference model and μ = 2 recomputed π_old: both show up in the step's metrics.
    assert "train/kl" in metrics[0] and "engine_logprob_gap/mean" in metrics[0]
    assert metrics[0]["engine_logprob_gap/mean"] < 1e-3  # the engine's log-probs are the trainer's, same weights
    assert (tmp_path / "samples.jsonl").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-0000001")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_invalid_config_fails_at_start_naming_the_fields(tmp_path):
    proc = subprocess.run([sys.executable, "train_grpo.py", "--config", "configs/grpo_smollm2_conll.yaml",
                           "--group_size", "3", "--micro_batch_size", "5", "--loss_agg", "sum"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "loss_agg='sum'" in proc.stderr and "micro_batch_size=5" in proc.stderr
