"""FSDP2 on 2 real CPU ranks (gloo) against a single-process reference, plus the no-torchrun fallbacks.

One torchrun launch (tests/dist_scripts/fsdp_checks.py) runs every multi-rank check and writes its measurements
to JSON; the tests below assert on them. ``--standalone`` rendezvous binds port 0, so the OS picks a free port.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from grpo import distributed as D
from grpo.checkpoint import load_checkpoint
from grpo.models import tiny_llama
from grpo.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def run_torchrun(script: Path, out_dir: Path, nproc: int = WORLD, timeout: int = 240) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), str(out_dir)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-6000:]
        pytest.fail(f"torchrun timed out after {timeout}s (a rank hung in a collective?)\n"
                    f"{tail.decode(errors='replace') if isinstance(tail, bytes) else tail}")
    if proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
                    f"stderr:\n{proc.stderr[-8000:]}")


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out_dir = tmp_path_factory.mktemp("fsdp")
    run_torchrun(ROOT / "tests" / "dist_scripts" / "fsdp_checks.py", out_dir)
    return out_dir, [json.loads((out_dir / f"results-rank{r}.json").read_text()) for r in range(WORLD)]


def test_collectives(dist_run):
    for rank, res in enumerate(dist_run[1]):
        assert res["world_size"] == WORLD
        # sum of (rank+1) over ranks 0,1 = 1+2 = 3; max rank = 1; [1,2] summed twice = [2,4]; rank 0's object.
        assert res["collectives"] == [3.0, 1.0, [2.0, 4.0], {"r": 0}], rank


def test_sharding_keeps_tied_weights(dist_run):
    for res in dist_run[1]:
        assert res["params_are_dtensors"] and res["tied_after_sharding"]


def test_full_state_dict_gathers_exact_weights(dist_run):
    for rank, res in enumerate(dist_run[1]):
        assert res["rank0_gets_full_dict"], rank  # rank 0: every key; other ranks: {} (cpu_offload gather)
        assert res["gather_initial_diff"] == 0.0, rank  # broadcast=True: every rank gets the exact weights


def test_fsdp_step_matches_single_process_step(dist_run):
    for rank, res in enumerate(dist_run[1]):
        assert res["global_targets"] == 32.0  # 11 + 7 + 10 + 4 target tokens (see global_batch)
        # Summed shards of (local CE sum / 32) = the reference gradient of (global CE sum / 32).
        assert res["grad_diff"] < 1e-6 < res["ref_grad_max"], rank
        assert res["step_param_diff"] < 1e-5, rank
    assert dist_run[1][0]["step_optimizer_diff"] < 1e-8  # Adam moments, compared on rank 0


def test_clip_grad_norm_is_the_global_norm(dist_run):
    for res in dist_run[1]:
        # A per-shard norm would be smaller (each rank holds half the entries); a mean-reduced gradient half.
        assert res["grad_norm"] == pytest.approx(res["ref_grad_norm"], rel=1e-6)
        assert res["ref_grad_norm"] > 0.5  # above MAX_NORM, so clipping was active in the step comparison


def test_sharded_checkpoint_round_trip(dist_run):
    for rank, res in enumerate(dist_run[1]):
        assert res["trainer_state"] == {"step": 1, "world_size": WORLD, "data_position": 2}
        assert res["load_weights_diff"] == 0.0 and res["load_optimizer_diff"] == 0.0, rank
        assert res["rng_continues"], rank  # each rank's own python/numpy/torch streams
        # Fresh model/optimizer objects resumed on 2 ranks take the same 2 steps as the uninterrupted run: same
        # shards, same operations in the same order, so bit-identical weights and AdamW state.
        assert res["resumed_step_diff"] == 0.0, rank
    assert dist_run[1][0]["resumed_optimizer_diff"] == 0.0


def test_each_rank_writes_its_own_shard_and_nothing_gathers_the_optimizer(dist_run):
    out_dir, results = dist_run
    path = out_dir / "run" / "checkpoint-0000001"
    assert not (path / "optimizer.pt").exists()
    expected = [".metadata"] + [f"__{r}_0.distcp" for r in range(WORLD)]
    assert all(res["shard_files"] == expected for res in results)
    listed = json.loads((path / "MANIFEST.json").read_text())["files"]
    assert {f"distcp/{name}" for name in expected} <= listed.keys()  # every rank's file is verified on resume
    # Where DCP put each tensor's pieces (its .metadata): every weight and Adam moment is in 2 chunks, rank r's
    # file holding rows [r*n/2, (r+1)*n/2) -- FSDP2's dim-0 shard of rank r -- so no rank wrote a full tensor.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    metadata = FileSystemReader(path / "distcp").read_metadata()
    tensors = {k: v for k, v in metadata.state_dict_metadata.items()
               if isinstance(v, TensorStorageMetadata) and len(v.size) > 0}  # not Adam's scalar step counts
    assert sum(k.startswith("optim.state.") for k in tensors) == 2 * sum(k.startswith("model.") for k in tensors)
    for key, meta in tensors.items():
        rows = meta.size[0]
        where = sorted((tuple(c.offsets), tuple(c.sizes),
                        metadata.storage_data[MetadataIndex(key, c.offsets)].relative_path) for c in meta.chunks)
        rest = tuple(meta.size[1:])
        assert where == [((r * rows // 2,) + (0,) * len(rest), (rows // 2,) + rest, f"__{r}_0.distcp")
                         for r in range(WORLD)], key


def test_two_rank_checkpoint_resumes_in_one_process(dist_run):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from transformers import AutoModelForCausalLM

    out_dir = dist_run[0]
    path = out_dir / "run" / "checkpoint-0000001"
    assert sorted(p.name for p in path.glob("rng_state_rank*.pt")) == ["rng_state_rank0.pt", "rng_state_rank1.pt"]
    model = tiny_llama(vocab_size=256, layers=2, seed=7)
    optimizer = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = build_scheduler(optimizer, total_steps=10)
    assert not D.is_sharded(model)
    assert load_checkpoint(path, model, optimizer, scheduler)["step"] == 1
    at_save = torch.load(out_dir / "at_save.pt", weights_only=True)  # what the 2 ranks held, gathered
    for name, value in model.state_dict().items():  # resharded from 2 shards into plain tensors, exactly
        assert torch.equal(value, at_save["weights"][name]), name
    loaded = get_optimizer_state_dict(model, optimizer)["state"]
    assert loaded.keys() == at_save["optimizer"]["state"].keys()
    for name, moments in at_save["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded[name][key], value), (name, key)
    reference = torch.load(out_dir / "reference_after_step.pt", weights_only=True)
    for name, value in model.state_dict().items():  # the 2-rank step equals the 1-process step (see above)
        torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-5)
    assert all(float(optimizer.state[p]["step"]) == 1.0 for p in model.parameters())
    assert scheduler.last_epoch == 1
    hf = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.randint(0, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, model(ids).logits)


def test_single_process_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed()
    assert info == D.DistInfo(0, 1, 0, torch.device("cpu")) and info.is_main
    assert not torch.distributed.is_initialized() and D.is_main()
    assert D.all_reduce_sum(2.5) == 2.5 and D.all_reduce_max(3) == 3.0
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(D.all_reduce_sum(t), t) and D.broadcast_object({"a": 1}) == {"a": 1}
    D.barrier()
    model = tiny_llama(layers=1)
    assert D.shard_model(model, info) is model and not D.is_sharded(model)
    state = D.full_state_dict(model)
    assert state.keys() == model.state_dict().keys()


def test_find_transformer_blocks():
    model = tiny_llama(layers=3)
    assert D.find_transformer_blocks(model) == list(model.model.layers)  # via _no_split_modules

    class Plain(nn.Module):  # no _no_split_modules: the longest ModuleList of one class
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
            self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    plain = Plain()
    assert D.find_transformer_blocks(plain) == list(plain.blocks)
    with pytest.raises(ValueError, match="cannot find the transformer blocks"):
        D.find_transformer_blocks(nn.Linear(2, 2))
