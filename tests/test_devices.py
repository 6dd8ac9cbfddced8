"""Every tensor the engine, sampling and batching code makes is made on an explicit device.

A CPU machine cannot show a CUDA device mismatch, but it can show where a tensor would land on one: with torch's
default device set to "meta", any tensor created without ``device=`` is a meta tensor, and the first operation that
mixes it with the (CPU) model's tensors, or reads its values, fails. On a GPU machine the same tensor would have
been a CPU tensor fed to a CUDA model. So: the same results with the default device set to meta as without.
(scripts/gpu_check.sh runs the engine tests on a real CUDA device.)
"""
from __future__ import annotations

import contextlib

import torch

from grpo.batch import collate_rollouts, completion_logprobs
from grpo.engine import TorchEngine
from tiny_task import char_tokenizer, tiny_policy


@contextlib.contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def test_torch_engine_creates_no_tensor_on_the_default_device():
    tok = char_tokenizer()
    engine = TorchEngine(tiny_policy(seed=0), tok)
    # Shared prefixes ("hello ..."), a distinct prompt, top-p sampling, a stop string and row compaction.
    prompts = [tok.encode(t) for t in ("hello there", "hello you", "hi", "what now?")]
    kwargs = dict(n=3, max_new_tokens=12, temperature=1.0, top_p=0.9, stop=["e"], seed=3)
    for temperature in (1.0, 0.0):
        kwargs["temperature"] = temperature
        expected = engine.generate(prompts, **kwargs)
        with default_device_meta():
            got = engine.generate(prompts, **kwargs)
        assert [r.completion_ids for r in got] == [r.completion_ids for r in expected]
        assert [r.logprobs for r in got] == [r.logprobs for r in expected]


def test_training_forward_creates_no_tensor_on_the_default_device():
    model = tiny_policy(seed=1)
    prompts = [[5, 6, 7], [5, 6, 7], [8, 9], [10, 11, 12, 13]]
    completions = [[20, 21], [22], [23, 24, 25], [26]]
    batch = collate_rollouts(prompts, completions, [[-1.0] * len(c) for c in completions], pad_id=0)
    for share in (True, False):
        expected, _ = completion_logprobs(model, batch, 0.7, share_prompts=share)
        with default_device_meta():
            got, entropy = completion_logprobs(model, batch, 0.7, with_entropy=True, share_prompts=share)
            got.sum().backward()  # backward too: the shared K/V fan-out is differentiable
        torch.testing.assert_close(got, expected)
        assert entropy.device == got.device == torch.device("cpu")
