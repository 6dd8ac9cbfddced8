"""The sharded half of a checkpoint (torch.distributed.checkpoint) and the dtype of its model-only export.

When the model is FSDP2-sharded (``grpo.distributed.is_sharded``: any multi-rank run, and a single process that
computes in bf16/fp16), ``grpo.checkpoint.save_checkpoint`` writes the resumable state here instead of a gathered
``optimizer.pt``::

    checkpoint-N/distcp/.metadata          written by rank 0: which shard of which tensor lives in which file
    checkpoint-N/distcp/__{R}_0.distcp     written by rank R: ITS shards of the fp32 master weights and AdamW state

so no rank ever holds the full optimizer state (Adam's two moments are 2x the weights, in fp32). The folder is
still one checkpoint: it is saved inside ``.tmp-checkpoint-N`` like the rest, rank 0 lists every rank's files into
MANIFEST.json after a barrier (all ranks share the file system, as before), and COMPLETE comes last.

Loading reshards: DCP reads, for each tensor of the model/optimizer state dict being loaded, exactly the pieces it
needs, whatever world size wrote them -- a 2-rank checkpoint resumes on 1, 2 or 8 ranks, and also in a plain
(unsharded) process, where the state dict holds ordinary tensors and no process group is needed.

The model-only export (``model.safetensors`` + config + tokenizer, what ``from_pretrained`` and vLLM load) is
written next to it in the run's COMPUTE dtype (``export_dtype``): the masters are fp32, but a bf16 run is served in
bf16, and the file is half the size. Resume never reads that export when ``distcp/`` exists -- the fp32 masters come
from here, so a resumed bf16 run continues bit-exactly. ``config.json``'s ``dtype`` names the export dtype (HF's
``save_pretrained`` would otherwise write the masters' float32 and ``from_pretrained`` would upcast).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from grpo.distributed import is_dist

__all__ = ["DCP_DIR", "save_sharded_state", "load_sharded_state", "export_dtype", "cast_for_export",
           "set_config_dtype"]

DCP_DIR = "distcp"


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    """{other name: first name} of every parameter reachable under several names (a tied lm_head)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """{"model": ..., "optim": ...} as (sharded) state dicts keyed by parameter name; DTensors when sharded.

    A tied weight appears once (under its first name): DCP would otherwise store the embedding twice.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    aliases = _tied_aliases(model)
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write ``folder/distcp``: each rank its own shards of the weights and optimizer state (collective).

    Files are fsynced by DCP's writer (``sync_files``). The caller makes the folder atomic and lists it in the
    manifest.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        dcp.save(_state_dicts(model, optimizer), storage_writer=FileSystemWriter(folder / DCP_DIR, sync_files=True))
    except CheckpointException as e:
        # DCP raises it on every rank when any rank failed; it is a BaseException whose str is every rank's
        # traceback. Re-raise the first failed rank's own error (e.g. OSError: no space left) for callers to handle.
        raise _first_failure(e) from e


def load_sharded_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                       error: type[Exception] = RuntimeError) -> None:
    """Restore the fp32 weights (and optimizer state) of ``folder/distcp`` into ``model`` (sharded or not).

    Collective when a process group exists. A failure raises ``error`` naming the folder.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    source = folder / DCP_DIR
    state = _state_dicts(model, optimizer)  # the targets: DCP fills them in place, reading only what they need
    try:
        with warnings.catch_warnings():  # without a process group, loading in this one process IS the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=FileSystemReader(source), no_dist=not is_dist())
    except (Exception, CheckpointException) as e:  # CheckpointException (a rank's read failed) is a BaseException
        raise error(f"{source}: cannot be read ({_cause(e)}); this checkpoint is damaged -- resume from an older "
                    f"one (--resume <its folder>)") from e
    for alias, name in _tied_aliases(model).items():
        state["model"][alias] = state["model"][name]
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def _first_failure(error: BaseException) -> BaseException:
    """For DCP's CheckpointException, the exception of the lowest failed rank; else ``error`` itself."""
    failures = getattr(error, "failures", None)
    return min(failures.items())[1][0] if isinstance(failures, dict) and failures else error


def _cause(error: BaseException) -> str:
    """One line for ``error``, naming the failed rank for DCP's CheckpointException."""
    inner = _first_failure(error)
    where = f"rank {min(error.failures)}: " if inner is not error else ""
    return f"{where}{type(inner).__name__}: {inner}"


def export_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in: FSDP2's mixed-precision ``param_dtype`` when set, else its parameters'."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        # No public getter for the policy; the root state's copy is the one fully_shard was given.
        policy = getattr(model._get_fsdp_state(), "_mp_policy", None)
        if policy is not None and policy.param_dtype is not None:
            return policy.param_dtype
    return next(model.parameters()).dtype


def cast_for_export(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype`` (tied names keep sharing one tensor); integer buffers unchanged."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            out[name] = cast.setdefault(id(tensor), tensor.to(dtype))
        else:
            out[name] = tensor
    return out


def set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Make ``folder/config.json`` name ``dtype`` (save_pretrained writes the in-memory model's dtype)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    name = str(dtype).removeprefix("torch.")
    if config.get("dtype") != name or config.get("torch_dtype", name) != name:
        config["dtype"] = name
        if "torch_dtype" in config:  # older transformers' key
            config["torch_dtype"] = name
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
