"""The two paper presets stay valid and run: one GRPO step of each through the real train_grpo.py.

configs/grpo_qwen2.5-1.5b_conll.yaml (the blog) and configs/grpo_qwen3-8b_reasoningner.yaml (ReasoningNER) are
GPU presets for models too large for CI. The end-to-end test keeps every algorithmic setting of the preset (reward
weights, loss aggregation, advantage scaling, μ, mini-batches, clip ε, β, rollout correction, group size,
micro-batch size, gradient checkpointing, few-shot count, prompt format, eval set) and overrides only what makes the
step tiny and CPU-friendly: a random 2-layer model of the preset's architecture family with SmolLM2's tokenizer, fp32
(the presets' bf16 also runs on CPU, only slower), the torch engine, one step of one prompt, short completions and a
2-sentence evaluation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
BLOG = "configs/grpo_qwen2.5-1.5b_conll.yaml"
REASONINGNER = "configs/grpo_qwen3-8b_reasoningner.yaml"

# What makes a step tiny; everything else comes from the preset. prompts_per_step 1 keeps each preset's group size
# and micro-batch size valid: blog 1 × G 8 = one micro-batch of 8; ReasoningNER 1 × G 16 = 4 mini-batches of 4.
TINY = {"dtype": "float32", "engine": "torch", "total_steps": "1", "limit": "2", "prompts_per_step": "1",
        "max_completion_len": "16", "eval_limit": "2"}
# Fields a tiny run may differ in from the preset (model and out_dir are the test's own).
OVERRIDDEN = set(TINY) | {"model", "out_dir"}


def _preset(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


@pytest.mark.parametrize("path", [BLOG, REASONINGNER])
@pytest.mark.parametrize("world_size", [1, 8])
def test_preset_validates_at_full_size(path, world_size):
    """As shipped (8 GPUs in the README's torchrun command, or one process), the preset passes validate()."""
    from ner.rewards import REWARDS
    from train_grpo import NERGRPOConfig
    from grpo.config import parse_config

    cfg = parse_config(NERGRPOConfig, ["--config", path])
    cfg.validate(world_size)
    assert set(cfg.reward_weights) <= set(REWARDS)


def _tiny_model_dir(root: Path, family: str, tokenizer) -> Path:
    """A randomly initialised 2-layer model of the preset's family (Qwen2 has q/k/v biases, Qwen3 q/k norms)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    config = config_cls(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=2048,
                        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = root / family
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


CASES = {
    BLOG: dict(family="qwen2", rewards={"format", "blog_entity", "exact_match"}, updates=1,
               recorded={"loss_agg": "seq_mean", "adv_scale": "group", "mu": 1, "format": "tagged"}),
    REASONINGNER: dict(family="qwen3", rewards={"f1", "schema"}, updates=4 * 4,  # μ 4 × 4 mini-batches
                       recorded={"mu": 4, "num_mini_batches": 4, "loss_agg": "constant", "adv_scale": "none",
                                 "eps_high": 0.28, "rollout_correction": "token", "format": "json"}),
}


@pytest.fixture(scope="module")
def preset_runs(request, tmp_path_factory, smollm2_tokenizer):
    """Start one tiny step of each selected preset at once (two processes of one thread each; a run is mostly
    imports and data loading, so on two idle cores this halves the wall time), so each test only waits for its own."""
    selected = {item.callspec.params["path"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_one_grpo_step_of_the_preset"}
    root = tmp_path_factory.mktemp("presets")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    runs = {}
    for i, (path, case) in enumerate((p, c) for p, c in CASES.items() if p in selected):
        run_root = root / str(i)
        model_dir = _tiny_model_dir(run_root, case["family"], smollm2_tokenizer)
        out = run_root / "run"
        cmd = [sys.executable, "train_grpo.py", "--config", path, "--model", str(model_dir), "--out_dir", str(out)]
        for key, value in TINY.items():
            cmd += [f"--{key}", value]
        log = open(run_root / "log.txt", "w")  # a file, not a pipe: a full pipe would stall the run nobody reads
        runs[path] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, model_dir,
                      out)
    yield runs
    for proc, log, _, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
@pytest.mark.parametrize("path", [BLOG, REASONINGNER])
def test_one_grpo_step_of_the_preset(path, preset_runs):
    from transformers import AutoModelForCausalLM

    case = CASES[path]
    proc, log, model_dir, out = preset_runs[path]
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.flush()
    output = Path(log.name).read_text()
    assert proc.returncode == 0, output[-3000:]
    assert "step 1 eval/f1=" in output  # the preset's eval set loads and scores

    # The step's metrics carry each of the preset's reward components and a finite train loss.
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (metrics,) = [m for m in lines if "reward/mean" in m]  # one training step; the other lines are evaluations
    assert [m["step"] for m in lines if "eval/f1" in m] == [0, 1]  # before training and after the last step
    assert metrics["step"] == 1
    assert {k.removeprefix("reward/") for k in metrics if k.startswith("reward/")} - {"mean", "std"} \
        == case["rewards"] | {"parse_errors"}  # and the parsers' swallowed-exception count
    assert metrics["reward/parse_errors"] == 0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert "train/kl" in metrics  # β 0.04 in both presets: a reference model was built and used

    # The recorded config is the preset's, except for the tiny overrides.
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    preset = _preset(path)
    kept = {k: v for k, v in preset.items() if k not in OVERRIDDEN}
    assert {k: recorded[k] for k in kept} == kept
    assert {k: recorded[k] for k in case["recorded"]} == case["recorded"]

    # The checkpoint holds every optimizer update of the step (μ × mini-batches) and loads with transformers.
    ckpt = out / "checkpoint-0000001"
    assert torch.load(ckpt / "scheduler.pt", weights_only=True)["last_epoch"] == case["updates"]
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.model_type == case["family"]
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in reference.parameters())
