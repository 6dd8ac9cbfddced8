"""Pick a rollout engine by name. Both engines implement ``grpo.engine.RolloutEngine``."""
from __future__ import annotations

import torch


def build_engine(name: str, model: torch.nn.Module, tokenizer, *, max_batch_tokens: int = 65536,
                 max_model_len: int = 2048, kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.3,
                 seed: int = 0):
    """``torch``: generates with the very module being trained (no weight copy, no sync cost).
    ``vllm``: an in-process vLLM engine built from the module's weights, re-synced in memory after each update.
    ``auto``: vllm when it imports and a GPU is present, else torch.
    """
    if name == "auto":
        try:
            import vllm  # noqa: F401
            name = "vllm" if torch.cuda.is_available() else "torch"
        except ImportError:
            name = "torch"
    if name == "torch":
        from grpo.engine import TorchEngine

        return TorchEngine(model, tokenizer, max_batch_tokens=max_batch_tokens)
    if name == "vllm":
        from grpo.vllm_engine import VLLMEngine

        return VLLMEngine(model, tokenizer, max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                          gpu_memory_utilization=gpu_memory_utilization, seed=seed)
    raise ValueError(f"unknown engine {name!r}: expected torch, vllm or auto")
