"""Process-group setup, collectives, FSDP2 sharding, and keeping a sharded model gathered for generation.

Run one process per device with ``torchrun --nproc_per_node=N train.py``; a plain ``python train.py`` is a single
process that creates no process group (unless mixed precision asks for one, see ``shard_trainable``), and every
helper here then degrades to the local operation.

Gradient convention (read this before writing a loss): ``shard_model`` makes FSDP2 SUM gradients over ranks
(gradient divide factor 1) instead of its default mean. Each rank's loss must therefore be its share of the global
loss: normalise by GLOBAL counts, e.g. ``loss_rank = ce_sum_over_my_tokens / total_tokens_on_all_ranks`` (get the
total with ``all_reduce_sum``). Summing the ranks' gradients then gives exactly the gradient of the global loss, and
the same code is correct with one process (where the global count is the local count) -- no ``* world_size``.
"""
from __future__ import annotations

import contextlib
import gc
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group that torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* env vars.

    Backend: nccl when CUDA is available (device ``cuda:LOCAL_RANK``), gloo otherwise (device ``cpu``). Without
    those env vars (plain ``python``) nothing is initialised and the result is rank 0 of 1.
    """
    use_cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group (call once at the end of training; safe without one).

    The barrier first: a rank that tears gloo down while a peer still has a collective in flight (e.g. the
    rank-0 state-dict gather) was seen aborting with "terminate called without an active exception". The collection
    last: objects that still hold the group (FSDP's device mesh in reference cycles) were otherwise freed during
    interpreter shutdown, where gloo's threads abort the same way (a 2-rank CPU update under load: 2 of 4 and 1 of 14
    runs aborted without it, 0 of 24 with it).
    """
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def _comm_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo reduces CPU tensors.
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(value: float | torch.Tensor, op: dist.ReduceOp) -> float | torch.Tensor:
    if isinstance(value, torch.Tensor):
        if not is_dist():
            return value.clone()
        out = value.detach().to(_comm_device(), copy=True)
        dist.all_reduce(out, op=op)
        return out.to(value.device)
    if not is_dist():
        return float(value)
    out = torch.tensor(float(value), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(out, op=op)
    return float(out.item())


def all_reduce_sum(value: float | torch.Tensor) -> float | torch.Tensor:
    """Sum over ranks. Floats come back as floats (reduced in float64); tensors as a new tensor on their device."""
    return _all_reduce(value, dist.ReduceOp.SUM)


def all_reduce_max(value: float | torch.Tensor) -> float | torch.Tensor:
    """Max over ranks; same types as :func:`all_reduce_sum`."""
    return _all_reduce(value, dist.ReduceOp.MAX)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (other ranks' argument is ignored)."""
    if not is_dist():
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank (``[obj]`` without a process group)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def find_transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of ``model``, in module order.

    Hugging Face models name their block classes in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``); otherwise
    the longest ``nn.ModuleList`` whose children all share one class is taken (``model.model.layers`` style).
    """
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if blocks:
        return blocks
    longest: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(longest) \
                and len({type(child) for child in module}) == 1:
            longest = list(module)
    if not longest:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: no _no_split_modules "
                         "and no ModuleList of identical blocks")
    return longest


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` was sharded with FSDP2 (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2-shard ``model`` over all ranks: each transformer block is one FSDP unit, the root holds the rest.

    The root unit owns embeddings, final norm and lm_head, so tied ``lm_head.weight is embed_tokens.weight`` stays
    one parameter (sharded once). Gradients are SUMMED over ranks (see module doc). ``param_dtype``/``reduce_dtype``
    set a ``MixedPrecisionPolicy``: the sharded parameters (and so the optimizer state) keep the model's own dtype,
    forward/backward run in ``param_dtype``, gradients are reduced and stored in ``reduce_dtype``. With
    ``world_size == 1`` and no mixed precision the model is only moved to ``info.device``; with mixed precision a
    one-rank process group is created (see `_one_rank_group`) so that the single process gets the very same policy.
    Returns the same module object (FSDP2 shards in place).
    """
    model = model.to(info.device)
    mixed = param_dtype is not None and param_dtype != next(model.parameters()).dtype
    if info.world_size == 1 and not mixed:
        return model
    if info.world_size == 1:
        _one_rank_group(info.device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    # Inner units must be sharded before the units that contain them; reversed pre-order guarantees that.
    for block in reversed(find_transformer_blocks(model)):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum, not mean (see the module doc). Forcing plain SUM collectives keeps gloo working: a divide
            # factor alone makes FSDP2 use ReduceOp.PREMUL_SUM, which only NCCL implements.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model


def shard_trainable(model: nn.Module, info: DistInfo, dtype: torch.dtype) -> nn.Module:
    """The model being trained: fp32 master weights (so fp32 AdamW state), forward and backward in ``dtype``.

    With bf16 weights AdamW's updates at RL learning rates mostly round away: a bf16 number near 0.02 moves in steps
    of ~1e-4, far above lr 5e-6 x Adam's unit-size step, so a bf16 run looks healthy and barely learns. Here the
    weights are upcast once and FSDP2's MixedPrecisionPolicy casts them to ``dtype`` for every forward (and for
    generation: TorchEngine runs inside the unsharded bf16 copy), while gradients are reduced and applied in fp32.
    """
    if dtype == torch.float32:
        return shard_model(model.float(), info)
    return shard_model(model.float(), info, param_dtype=dtype, reduce_dtype=torch.float32)


def _one_rank_group(device: torch.device) -> None:
    """A process group of this process alone (an in-memory store; no ports), so FSDP2 can run without torchrun."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    full = t.full_tensor() if isinstance(t, DTensor) else t
    return full.detach().cpu()


def full_state_dict(model: nn.Module, broadcast: bool = False) -> dict[str, torch.Tensor]:
    """The complete (unsharded) state dict on CPU, keyed like ``model.state_dict()`` (tied names both present).

    * Unsharded model: every rank gets its own state dict. When the model already lives on CPU the tensors share
      storage with the live parameters -- copy them before mutating.
    * Sharded model, ``broadcast=False``: ONLY RANK 0 receives the tensors; the other ranks get ``{}``. Uses
      ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``, which gathers one tensor at a time, so
      no rank ever holds the full model on the accelerator.
    * Sharded model, ``broadcast=True``: EVERY rank receives all tensors (e.g. for a rollout engine per rank),
      all-gathered parameter by parameter, each moved to CPU before the next.
    Collective for sharded models: every rank must call it.
    """
    if not is_sharded(model):
        return {name: t.detach().cpu() for name, t in model.state_dict().items()}
    if not broadcast:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    named = dict(model.named_buffers(remove_duplicate=False))
    named.update(model.named_parameters(remove_duplicate=False))
    gathered: dict[int, torch.Tensor] = {}  # by id(tensor): a tied weight is gathered once
    out: dict[str, torch.Tensor] = {}
    for name in model.state_dict().keys():  # persistent entries only, same order on every rank
        tensor = named[name]
        if id(tensor) not in gathered:
            gathered[id(tensor)] = _full_tensor(tensor)
        out[name] = gathered[id(tensor)]
    return out


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Clip gradients to a global L2 norm of ``max_norm``; return the global norm before clipping.

    The norm is inf/nan when any gradient on any rank is (or is so large that its square overflows): callers then
    skip the optimizer step, so one reduction serves both the clip and the finiteness check. (The clip has then
    scaled the gradients by nan, which is harmless: they are zeroed before the next backward.)

    Works for plain and FSDP2 (DTensor) parameters alike: on sharded parameters ``clip_grad_norm_`` combines the
    shards into the norm of the full gradient (a replicated DTensor), identical to the single-process value.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm.item())


def _fsdp_param_groups(state) -> list:
    """The parameter groups of one FSDP2 state: a list from torch 2.12 (`_fsdp_param_groups`), before that a single
    group or None (`_fsdp_param_group`; torch 2.11 is what the GPU machines ship)."""
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


@contextlib.contextmanager
def fsdp_unsharded(model: torch.nn.Module) -> Iterator[None]:
    """Keep every FSDP2 module of `model` unsharded for the block, then reshard (a no-op on an unsharded model).

    FSDP2 all-gathers a module's parameters in its forward pre-hook and frees them after forward. Generation runs
    hundreds of forwards whose count differs across ranks, so instead we all-gather everything once here (a
    collective every rank reaches, in the same module order) and switch resharding-after-forward off for the block:
    the decode loop then runs no collectives at all. There is no public getter for reshard_after_forward, so the
    per-group setting (`post_forward_mesh_info`) is saved and restored directly.
    """
    from torch.distributed.fsdp import FSDPModule

    named = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if not named:
        yield
        return
    fsdp_modules = [m for _, m in named]
    # Run FSDP's root lazy init now (as the first forward would), so it cannot later overwrite our settings.
    for name, m in named:
        if not any(other == "" or name.startswith(other + ".") for other, _ in named if other != name):
            m._get_fsdp_state()._lazy_init()
    groups = [g for m in fsdp_modules for g in _fsdp_param_groups(m._get_fsdp_state())]
    saved = [g.post_forward_mesh_info for g in groups]
    try:
        for g in groups:
            g.post_forward_mesh_info = None
        for m in fsdp_modules:
            m.unshard()
        yield
    finally:
        for g, info in zip(groups, saved):
            g.post_forward_mesh_info = info
        for m in fsdp_modules:
            m.reshard()
