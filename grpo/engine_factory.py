"""Pick a rollout engine by name. Both engines implement ``grpo.engine.RolloutEngine``."""
from __future__ import annotations

import importlib.util

import torch


def resolve_engine_name(name: str, cuda_available: bool | None = None, vllm_installed: bool | None = None) -> str:
    """``auto`` → ``vllm`` on a CUDA machine with vLLM installed, else ``torch``; other names pass through.

    On GPUs vLLM's paged attention and CUDA graphs generate far faster than a Python decode loop; on CPU the torch
    engine shares the training module (no second copy of the weights, no sync) and is the tested default.
    """
    if name != "auto":
        return name
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if vllm_installed is None:
        vllm_installed = importlib.util.find_spec("vllm") is not None
    return "vllm" if cuda_available and vllm_installed else "torch"


def build_engine(name: str, model: torch.nn.Module, tokenizer, *, max_batch_tokens: int = 65536,
                 max_model_len: int = 2048, kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.3,
                 seed: int = 0, dtype: str | None = None, rollout_dtype: str | None = None):
    """``torch``: generates with the very module being trained (no weight copy, no sync cost).
    ``vllm``: an in-process vLLM engine built from the module's weights, re-synced in memory after each update.
    ``auto``: see `resolve_engine_name`.
    ``dtype``: vLLM's compute dtype (default: the module's parameter dtype, which is fp32 for fp32-master training).
    ``rollout_dtype``: generate in this dtype instead (empty/None: as above). The torch engine then decodes from
    converted copies of the weights (CPU; TorchEngine's ``compute_dtype``), vLLM loads in it.
    """
    name = resolve_engine_name(name)
    if name == "torch":
        from grpo.engine import TorchEngine
        from grpo.models import parse_dtype

        return TorchEngine(model, tokenizer, max_batch_tokens=max_batch_tokens,
                           compute_dtype=parse_dtype(rollout_dtype) if rollout_dtype else None)
    if name == "vllm":
        from grpo.vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                          gpu_memory_utilization=gpu_memory_utilization, seed=seed, dtype=rollout_dtype or dtype)
    raise ValueError(f"unknown engine {name!r}: expected torch, vllm or auto")
