"""fp32 master weights under bf16 compute (grpo.distributed.shard_trainable), in one process.

At RL learning rates bf16 weights barely move: an AdamW step is ~lr in size, far below the bf16 spacing of a weight
(~1e-4 near 0.02), so the update rounds away. The fix keeps fp32 masters and AdamW state and computes in bf16; here
10 AdamW steps at the presets' lr 5e-6 are checked against a hand-written fp32-master loop.
"""
from __future__ import annotations

import copy

import pytest
import torch

from grpo import distributed as D
from grpo.models import tiny_llama
from grpo.optim import build_optimizer

LR, BETAS, STEPS, VOCAB = 5e-6, (0.9, 0.99), 10, 128


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (4, 16), generator=gen) for _ in range(STEPS)]


def lm_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def reference_fp32_master(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The textbook loop: a bf16 copy of the fp32 masters does forward and backward, its gradients (cast to fp32)
    update the masters with a plain AdamW."""
    masters = {n: p.detach().clone().float() for n, p in model.named_parameters()}
    compute = copy.deepcopy(model).to(torch.bfloat16)
    state = {n: (torch.zeros_like(m), torch.zeros_like(m)) for n, m in masters.items()}
    for t, ids in enumerate(batches(), start=1):
        with torch.no_grad():
            for n, p in compute.named_parameters():
                p.copy_(masters[n])
        compute.zero_grad(set_to_none=True)
        lm_loss(compute, ids).backward()
        for n, p in compute.named_parameters():
            g = p.grad.float()
            m, v = state[n]
            m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
            v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
            m_hat, v_hat = m / (1 - BETAS[0] ** t), v / (1 - BETAS[1] ** t)
            masters[n] -= LR * m_hat / (v_hat.sqrt() + 1e-8)
    return masters


def train(model: torch.nn.Module) -> None:
    optimizer = build_optimizer(model, LR, BETAS, weight_decay=0.0)
    for ids in batches():
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, ids).backward()
        optimizer.step()


@pytest.fixture
def initial() -> torch.nn.Module:
    model = tiny_llama(vocab_size=VOCAB, hidden=64, layers=2, heads=4, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    return model


def test_bf16_compute_with_fp32_masters_matches_the_reference(initial):
    info = D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    expected = reference_fp32_master(initial)
    model = D.shard_trainable(copy.deepcopy(initial), info, torch.bfloat16)
    try:
        assert D.is_sharded(model)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # the masters (and so AdamW state)
        with D.fsdp_unsharded(model):  # what TorchEngine generates with: the bf16 compute copy
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        train(model)
        final = D.full_state_dict(model)
    finally:
        D.cleanup()
    start = dict(initial.named_parameters())
    for name in expected:  # named_parameters: a tied weight once
        value = final[name]
        moved = (value != start[name].float()).float().mean().item()
        assert moved > 0.8, (name, moved)  # every tensor moved (not all elements: some bf16 gradients are 0)
        update, expected_update = value - start[name], expected[name] - start[name]
        torch.testing.assert_close(update, expected_update, rtol=0, atol=1e-7, msg=name)  # updates are ~5e-5


def test_bf16_weights_alone_lose_the_update(initial):
    """The finding this guards against: the same 10 steps on bf16 weights leave most weights exactly where they
    were (so shard_trainable must not hand bf16 parameters to the optimizer)."""
    model = copy.deepcopy(initial).to(torch.bfloat16)
    train(model)
    start = dict(initial.named_parameters())
    moved = [(p != start[n].to(torch.bfloat16)).float().mean().item() for n, p in model.named_parameters()
             if p.dim() == 2]
    assert max(moved) < 0.5


def test_fsdp_param_groups_reads_both_torch_layouts():
    """torch >= 2.12 keeps a list `_fsdp_param_groups`; 2.11 (the GPU machines' torch) one `_fsdp_param_group`
    or None. fsdp_unsharded failed on the GPU with the list-only lookup (scripts/gpu_check.sh, part (c))."""
    from types import SimpleNamespace
    a, b = object(), object()
    assert D._fsdp_param_groups(SimpleNamespace(_fsdp_param_groups=[a, b])) == [a, b]
    assert D._fsdp_param_groups(SimpleNamespace(_fsdp_param_group=a)) == [a]
    assert D._fsdp_param_groups(SimpleNamespace(_fsdp_param_group=None)) == []


def test_engine_on_the_bf16_compute_copy_samples_as_the_bf16_model(smollm2_tokenizer):
    """Generation under shard_trainable(bf16) runs on the unsharded bf16 compute copy: the same tokens and log-probs
    as the model loaded in bf16 (rotary frequencies kept fp32, as from_pretrained keeps them)."""
    from grpo.engine import TorchEngine
    from test_torch_engine import as_loaded_in_bf16, peaked_tiny_llama

    model = peaked_tiny_llama(len(smollm2_tokenizer)).eval()
    loaded = as_loaded_in_bf16(model)
    info = D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    sharded = D.shard_trainable(copy.deepcopy(model), info, torch.bfloat16)
    prompts, kwargs = [[1, 17, 230, 4000, 12, 99, 5, 6, 7], [1, 40, 41, 42]], dict(n=2, max_new_tokens=8, seed=3)
    try:
        got = TorchEngine(sharded, smollm2_tokenizer, eos_token_ids=[]).generate(prompts, **kwargs)
    finally:
        D.cleanup()
    expected = TorchEngine(loaded, smollm2_tokenizer, eos_token_ids=[]).generate(prompts, **kwargs)
    assert [(g.completion_ids, g.logprobs) for g in got] == [(e.completion_ids, e.logprobs) for e in expected]
