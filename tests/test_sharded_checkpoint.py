"""Sharded checkpoints (grpo.sharded_checkpoint) in one process: bf16 compute shards the model over a one-rank group,
so this is the DCP path without torchrun. The 2-rank checks (each rank writes its shard, 2 -> 2 and 2 -> 1 ranks)
are in tests/test_distributed.py.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from grpo import distributed as D
from grpo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, verify_checkpoint
from grpo.models import tiny_llama
from grpo.optim import build_optimizer, build_scheduler

VOCAB = 128
INFO = D.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def lm_step(model, optimizer, scheduler, seed: int) -> None:
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(seed))
    logits = model(input_ids=ids).logits.float()
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def bf16_run(initial):
    model = D.shard_trainable(copy.deepcopy(initial), INFO, torch.bfloat16)
    optimizer = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return model, optimizer, build_scheduler(optimizer, total_steps=10, warmup_ratio=0.0)


def adam_state(model, optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """{parameter name: {exp_avg, exp_avg_sq, step}} as full plain tensors (copies)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: D._full_tensor(v).clone() for k, v in s.items()} for p, s in optimizer.state.items()}


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    """shard_trainable creates a one-rank process group in this process; remove it afterwards, so tests that run
    later (e.g. test_distributed's no-torchrun checks) see a process without one."""
    existed = torch.distributed.is_initialized()
    yield
    if not existed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A bf16-compute run: 2 steps, checkpoint, 1 more step. Returns (checkpoint, masters at save, the state after
    the 3rd step, optimizer state at save)."""
    initial = tiny_llama(vocab_size=VOCAB, hidden=64, layers=2, heads=4, seed=3)
    model, optimizer, scheduler = bf16_run(initial)
    assert D.is_sharded(model)
    for seed in (0, 1):
        lm_step(model, optimizer, scheduler, seed)
    path = save_checkpoint(tmp_path_factory.mktemp("bf16") / "run", 2, model, None, optimizer, scheduler, {},
                           info=INFO)
    masters = {k: v.clone() for k, v in D.full_state_dict(model).items()}
    optim_at_save = adam_state(model, optimizer)
    lm_step(model, optimizer, scheduler, 2)
    return path, masters, (D.full_state_dict(model), adam_state(model, optimizer)), optim_at_save, initial


def test_sharded_save_writes_distcp_and_no_gathered_optimizer(saved):
    path = saved[0]
    assert not (path / "optimizer.pt").exists()
    shards = sorted(p.name for p in (path / "distcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp"]  # one rank: one shard file
    listed = json.loads((path / "MANIFEST.json").read_text())["files"]
    assert {"distcp/.metadata", "distcp/__0_0.distcp"} <= listed.keys()
    assert verify_checkpoint(path) is None


def test_export_is_in_the_compute_dtype_and_loads_with_from_pretrained(saved):
    from transformers import AutoModelForCausalLM

    path, masters = saved[0], saved[1]
    exported = load_file(path / "model.safetensors")
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}
    for name, tensor in exported.items():  # the masters, rounded once to bf16
        assert torch.equal(tensor, masters[name].to(torch.bfloat16)), name
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.model.embed_tokens.weight, exported["model.embed_tokens.weight"])


def test_resume_restores_the_fp32_masters_not_the_bf16_export(saved):
    path, masters, (after_next, optim_after_next), optim_at_save, initial = saved
    model, optimizer, scheduler = bf16_run(tiny_llama(vocab_size=VOCAB, hidden=64, layers=2, heads=4, seed=9))
    assert load_checkpoint(path, model, optimizer, scheduler, INFO)["step"] == 2
    loaded = D.full_state_dict(model)
    for name, value in masters.items():
        assert value.dtype == torch.float32 and torch.equal(loaded[name], value), name
    # The export's rounding is visible, so the equality above could not come from it.
    assert any(not torch.equal(v, v.to(torch.bfloat16).float()) for v in masters.values())
    assert _max_diff(adam_state(model, optimizer), optim_at_save) == 0.0
    lm_step(model, optimizer, scheduler, 2)  # the same 3rd step: bit-identical to the uninterrupted run
    resumed = D.full_state_dict(model)
    assert all(torch.equal(resumed[k], after_next[k]) for k in after_next)
    assert _max_diff(adam_state(model, optimizer), optim_after_next) == 0.0


def test_sharded_checkpoint_loads_into_a_plain_model(saved):
    path, masters, _, optim_at_save, _ = saved
    model = tiny_llama(vocab_size=VOCAB, hidden=64, layers=2, heads=4, seed=9)  # fp32, not sharded
    optimizer = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    load_checkpoint(path, model, optimizer)
    assert not D.is_sharded(model)
    for name, value in model.state_dict().items():
        assert torch.equal(value, masters[name]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives the load
    assert _max_diff(adam_state(model, optimizer), optim_at_save) == 0.0


def test_a_damaged_shard_is_named(saved, tmp_path):
    import shutil

    copy_path = tmp_path / saved[0].name
    shutil.copytree(saved[0], copy_path)
    shard = copy_path / "distcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    assert str(shard) in verify_checkpoint(copy_path)
    model, optimizer, scheduler = bf16_run(saved[4])
    with pytest.raises(CheckpointError) as failed:
        load_checkpoint(copy_path, model, optimizer, scheduler, INFO)
    message = str(failed.value)
    assert message.startswith(f"{copy_path / 'distcp'}: cannot be read (rank 0: ") and "\n" not in message


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n][k].float() - b[n][k].float()).abs().max()) for n in a for k in a[n])


def test_a_checkpoint_with_a_full_optimizer_file_still_loads_into_a_sharded_model(saved, tmp_path):
    """The format before distcp/ (and still that of plain processes): full weights + optimizer.pt."""
    model = tiny_llama(vocab_size=VOCAB, hidden=64, layers=2, heads=4, seed=5)  # fp32, not sharded
    optimizer = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = build_scheduler(optimizer, total_steps=10, warmup_ratio=0.0)
    lm_step(model, optimizer, scheduler, 0)
    path = save_checkpoint(tmp_path, 1, model, None, optimizer, scheduler, {})
    assert (path / "optimizer.pt").is_file() and not (path / "distcp").exists()
    sharded, sharded_optimizer, sharded_scheduler = bf16_run(saved[4])
    load_checkpoint(path, sharded, sharded_optimizer, sharded_scheduler, INFO)
    loaded = D.full_state_dict(sharded)
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    assert _max_diff(adam_state(sharded, sharded_optimizer), adam_state(model, optimizer)) == 0.0


def test_a_failed_shard_write_raises_the_ranks_own_error(saved, tmp_path):
    """DCP wraps a rank's failure in CheckpointException, a BaseException that `except Exception` (the CLI's
    one-line error handling) would miss; the rank's own OSError must come out instead."""
    from grpo.sharded_checkpoint import save_sharded_state

    model, optimizer, scheduler = bf16_run(saved[4])
    lm_step(model, optimizer, scheduler, 0)
    (tmp_path / "distcp").mkdir()
    (tmp_path / "distcp" / "__0_0.distcp").mkdir()  # where rank 0's shard file must go: cannot be opened
    with pytest.raises(OSError) as failed:
        save_sharded_state(tmp_path, model, optimizer)
    assert "__0_0.distcp" in str(failed.value)
