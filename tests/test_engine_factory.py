"""grpo.engine_factory: `auto` picks vLLM only on a CUDA machine that has it; names map to real engines."""
from __future__ import annotations

import pytest
import torch

from grpo.engine import TorchEngine
from grpo.engine_factory import build_engine, resolve_engine_name
from grpo.grpo_config import GRPOConfig
from grpo.models import tiny_llama


@pytest.mark.parametrize("cuda, vllm, expected", [(True, True, "vllm"), (True, False, "torch"),
                                                  (False, True, "torch"), (False, False, "torch")])
def test_auto_prefers_vllm_only_on_cuda_with_vllm(cuda, vllm, expected):
    assert resolve_engine_name("auto", cuda_available=cuda, vllm_installed=vllm) == expected


def test_explicit_names_are_kept():
    assert resolve_engine_name("torch", cuda_available=True, vllm_installed=True) == "torch"
    assert resolve_engine_name("vllm", cuda_available=False, vllm_installed=False) == "vllm"


def test_auto_on_this_cpu_machine_builds_the_torch_engine(smollm2_tokenizer):
    model = tiny_llama(vocab_size=len(smollm2_tokenizer), seed=0)
    engine = build_engine("auto", model, smollm2_tokenizer)
    assert isinstance(engine, TorchEngine) and engine.model is model
    with pytest.raises(ValueError, match="unknown engine 'tpu'"):
        build_engine("tpu", model, smollm2_tokenizer)


def test_grpo_config_defaults_to_auto_and_accepts_it():
    cfg = GRPOConfig(reward_weights={"f1": 1.0})
    assert cfg.engine == "auto"
    cfg.validate(world_size=1)
    cfg.engine = "tpu"
    with pytest.raises(ValueError, match="engine='tpu'"):
        cfg.validate(world_size=1)


def test_rollout_dtype_reaches_the_engine_and_is_checked(smollm2_tokenizer):
    from grpo.packed_linear import packable_dtypes

    model = tiny_llama(vocab_size=len(smollm2_tokenizer), seed=0)
    assert build_engine("torch", model, smollm2_tokenizer).compute_dtype is None
    if torch.bfloat16 in packable_dtypes():
        engine = build_engine("torch", model, smollm2_tokenizer, dtype="float32", rollout_dtype="bfloat16")
        assert engine.compute_dtype == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="no kernels"):
            build_engine("torch", model, smollm2_tokenizer, rollout_dtype="bfloat16")
    cfg = GRPOConfig(reward_weights={"f1": 1.0}, rollout_dtype="bf17")
    with pytest.raises(ValueError, match="rollout_dtype='bf17': expected one of"):
        cfg.validate(world_size=1)
    cfg = GRPOConfig(reward_weights={"f1": 1.0}, rollout_dtype="bfloat16", mu=2, old_logprobs="rollout")
    with pytest.raises(ValueError, match="set old_logprobs=recompute"):
        cfg.validate(world_size=1)
    cfg.old_logprobs = "recompute"
    cfg.validate(world_size=1)
    cfg.mu, cfg.old_logprobs = 1, "rollout"  # on-policy: π_old is the update's own forward, never the engine's
    cfg.validate(world_size=1)
