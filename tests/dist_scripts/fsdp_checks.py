"""FSDP2 checks on N ranks against a single-process reference; launched by tests/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_scripts/fsdp_checks.py OUT_DIR

Every rank writes OUT_DIR/results-rank{R}.json with max-abs differences (floats) and flags (bools); rank 0 also
writes OUT_DIR/reference_after_step.pt (the single-process model after one step), a checkpoint under OUT_DIR/run
(sharded: each rank writes its own shard file under distcp/) and what the 2-rank run held when saving it
(OUT_DIR/at_save.pt: full weights and optimizer state), for the 1-process resume test. The pytest side asserts on
those files, so a failed check shows its value instead of a hang.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from grpo.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from grpo.distributed import (DistInfo, all_reduce_max, all_reduce_sum, broadcast_object, cleanup, clip_grad_norm,  # noqa: E402
                              full_state_dict, init_distributed, shard_model)
from grpo.models import tiny_llama  # noqa: E402
from grpo.optim import build_optimizer, build_scheduler  # noqa: E402

VOCAB, ROWS, LEN, MAX_NORM = 256, 4, 12, 0.5


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """[ROWS, LEN] ids and labels; rows have different numbers of target tokens (label -100 = ignored)."""
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (ROWS, LEN), generator=gen)
    labels = ids.clone()
    # Targets are labels[:, 1:] != -100, positions 1..11: 11, 11-4, 11-1, 11-7 = 11, 7, 10, 4 per row, so rank 0
    # (rows 0-1) has 18 and rank 1 (rows 2-3) 14 of the 32: a per-rank mean would weight tokens unequally.
    for row, n_ignored in enumerate([0, 5, 2, 8]):
        labels[row, :n_ignored] = -100
    return ids, labels


def ce_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def full_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's complete gradient (all-gathered from the shards: collective when sharded)."""
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
            for n, p in model.named_parameters()}


def step(model, optimizer, scheduler, ids, labels, global_targets: float, grads_out: dict | None = None) -> float:
    """Token-mean CE over the GLOBAL batch: this process's CE sum / global target count (FSDP2 sums grads).

    Returns the pre-clipping grad norm; ``grads_out`` receives the unclipped full gradients. (Adam's update and
    the clipped gradient are both invariant to a constant gradient scale, so only the norm and the raw gradients
    can reveal a wrong world-size factor.)
    """
    (ce_sum(model, ids, labels) / global_targets).backward()
    if grads_out is not None:
        grads_out.update(full_grads(model))
    norm = clip_grad_norm(model.parameters(), MAX_NORM)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def new_run(info, seed: int):
    model = shard_model(tiny_llama(vocab_size=VOCAB, layers=2, seed=seed), info)
    optimizer = build_optimizer(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    return model, optimizer, build_scheduler(optimizer, total_steps=10, warmup_ratio=0.0)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def optimizer_full(model, optimizer) -> dict:
    """A copy of the full optimizer state on rank 0 ({} elsewhere); collective for a sharded model.

    Copied because CPU tensors that need no gather (Adam's ``step``) come back as the live tensors.
    """
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
    return {"state": {n: {k: v.clone() for k, v in s.items()} for n, s in state.get("state", {}).items()}}


def optimizer_diff(a: dict, b: dict) -> float:
    if a["state"].keys() != b["state"].keys():
        return float("inf")
    return max(float((a["state"][n][k].float() - b["state"][n][k].float()).abs().max())
               for n in a["state"] for k in a["state"][n])


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    rank, world = info.rank, info.world_size
    results: dict[str, float | bool] = {"world_size": world}
    ids, labels = global_batch()
    per_rank = ROWS // world
    my_ids, my_labels = ids[rank * per_rank:(rank + 1) * per_rank], labels[rank * per_rank:(rank + 1) * per_rank]

    # Single-process reference on the whole global batch (every rank computes it; it never communicates).
    reference, ref_opt, ref_sched = new_run(DistInfo(0, 1, 0, info.device), seed=0)
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    ref_targets = float((labels[:, 1:] != -100).sum())
    ref_grads: dict[str, torch.Tensor] = {}
    ref_norm = step(reference, ref_opt, ref_sched, ids, labels, ref_targets, ref_grads)
    ref_after = {k: v.detach().clone() for k, v in reference.state_dict().items()}

    # Sharded run on this rank's half.
    model, optimizer, scheduler = new_run(info, seed=0)
    results["tied_after_sharding"] = model.lm_head.weight is model.model.embed_tokens.weight
    results["params_are_dtensors"] = all(type(p).__name__ == "DTensor" for p in model.parameters())
    gathered = full_state_dict(model)
    results["rank0_gets_full_dict"] = (len(gathered) == len(initial)) if rank == 0 else (gathered == {})
    results["gather_initial_diff"] = max_diff(full_state_dict(model, broadcast=True), initial)
    global_targets = all_reduce_sum(float((my_labels[:, 1:] != -100).sum()))
    results["global_targets"] = global_targets
    grads: dict[str, torch.Tensor] = {}
    norm = step(model, optimizer, scheduler, my_ids, my_labels, global_targets, grads)
    results["grad_diff"] = max_diff(grads, ref_grads)
    results["ref_grad_max"] = max(float(g.abs().max()) for g in ref_grads.values())
    results["grad_norm"], results["ref_grad_norm"] = norm, ref_norm
    after = full_state_dict(model, broadcast=True)
    results["step_param_diff"] = max_diff(after, ref_after)
    sharded_optim, ref_optim = optimizer_full(model, optimizer), optimizer_full(reference, ref_opt)  # collective
    results["step_optimizer_diff"] = optimizer_diff(sharded_optim, ref_optim) if rank == 0 else 0.0
    results["collectives"] = [all_reduce_sum(float(rank + 1)), all_reduce_max(float(rank)),
                              all_reduce_sum(torch.tensor([1.0, 2.0])).tolist(), broadcast_object({"r": rank})]
    if rank == 0:
        torch.save(ref_after, out_dir / "reference_after_step.pt")

    # Checkpoint round trip on all ranks; per-rank RNG streams must continue.
    random.seed(100 + rank)
    np.random.seed(100 + rank)
    torch.manual_seed(100 + rank)
    optim_before = optimizer_full(model, optimizer)
    path = save_checkpoint(out_dir / "run", 1, model, None, optimizer, scheduler, {"data_position": 2}, info=info)
    results["shard_files"] = sorted(p.name for p in (path / "distcp").iterdir())
    if rank == 0:
        torch.save({"weights": after, "optimizer": optim_before}, out_dir / "at_save.pt")
    draws_after_save = [random.random(), float(np.random.rand()), torch.rand(2).tolist()]
    for _ in range(2):  # the uninterrupted run goes on for 2 steps
        step(model, optimizer, scheduler, my_ids, my_labels, global_targets)
    continued = full_state_dict(model, broadcast=True)
    optim_continued = optimizer_full(model, optimizer)  # collective

    model2, optimizer2, scheduler2 = new_run(info, seed=7)
    state = load_checkpoint(path, model2, optimizer2, scheduler2, info)
    results["trainer_state"] = state
    results["load_weights_diff"] = max_diff(full_state_dict(model2, broadcast=True), after)
    optim_loaded = optimizer_full(model2, optimizer2)  # collective
    results["load_optimizer_diff"] = optimizer_diff(optim_loaded, optim_before) if rank == 0 else 0.0
    results["rng_continues"] = [random.random(), float(np.random.rand()), torch.rand(2).tolist()] == draws_after_save
    for _ in range(2):
        step(model2, optimizer2, scheduler2, my_ids, my_labels, global_targets)
    results["resumed_step_diff"] = max_diff(full_state_dict(model2, broadcast=True), continued)
    optim_resumed = optimizer_full(model2, optimizer2)  # collective
    results["resumed_optimizer_diff"] = optimizer_diff(optim_resumed, optim_continued) if rank == 0 else 0.0
    (out_dir / f"results-rank{rank}.json").write_text(json.dumps(results, indent=1))
    cleanup()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
