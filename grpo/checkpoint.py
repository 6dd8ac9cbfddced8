"""Atomic, resumable training checkpoints that are also plain Hugging Face model folders.

Layout of ``run_dir/checkpoint-{step:07d}/``::

    config.json, generation_config.json, model.safetensors   full weights in the compute dtype (from_pretrained works)
    tokenizer files                                           tokenizer.save_pretrained
    extra files            the caller's (``extra_files``), e.g. the task's prompt_recipe.json
    distcp/           sharded model: each rank's shards of the fp32 weights + optimizer state (grpo.sharded_checkpoint)
    optimizer.pt      unsharded model: the optimizer state keyed by parameter name
    scheduler.pt      lr scheduler state
    rng_state_rank{R}.pt   python / numpy / torch CPU / CUDA generator states of rank R
    trainer_state.json     {"step", "world_size", **trainer_state}; "config" when a config dataclass is passed
    config.yaml            the run config (when passed)
    MANIFEST.json          {"files": {relative path: {"size", "sha256"}}} of every other file, written after them
    COMPLETE               written last; a folder without it is never trusted

Design choice: a sharded (FSDP2) model saves its resumable state with torch.distributed.checkpoint, each rank writing
its own shards, so nothing gathers the optimizer state; DCP reshards on load, so a run saved on 2 ranks resumes on
1 or 8. Only the model-only export is gathered to rank 0, one tensor at a time (fp32 weights are a third of
weights + AdamW state; the bf16 export of a bf16 run a sixth). An unsharded single process keeps one optimizer.pt.
Checkpoints saved before distcp/ existed (full optimizer.pt from a sharded run) still load. All ranks must share the
file system (single node, or a shared mount).

Atomicity: everything goes into ``run_dir/.tmp-checkpoint-{step}``; files are fsynced, ``COMPLETE`` is written, and
only then is the folder renamed to its final name. Old checkpoints are renamed away before being deleted, so a
crash at any moment leaves either a complete checkpoint or a ``.tmp-*`` folder that ``latest_checkpoint`` removes.

Integrity: COMPLETE only says the save finished; a file damaged later (a truncated copy, a full disk during an rsync,
bit rot) would still crash a resume with a raw error. ``verify_checkpoint`` compares every file with the manifest's
size and SHA-256, and ``newest_valid_checkpoint`` (what ``--resume auto`` uses) skips damaged checkpoints, naming
them (cost: grpo.manifest). Checkpoints saved before manifests existed are accepted unverified;
``load_checkpoint`` then names the file it could not read.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from grpo.config import config_to_dict, config_to_yaml
from grpo.distributed import DistInfo, barrier, broadcast_object, get_rank, get_world_size, is_main, is_sharded
from grpo.errors import report_disk_full
from grpo.manifest import verify_manifest, write_manifest
from grpo.sharded_checkpoint import (DCP_DIR, cast_for_export, export_dtype, load_sharded_state, save_sharded_state,
                                     set_config_dtype)

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "list_checkpoints", "verify_checkpoint", "newest_valid_checkpoint", "CheckpointError",
           "checkpoint_step"]

COMPLETE = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d{7,})$")
_TMP_PREFIX = ".tmp-"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank_and_world(info: DistInfo | None) -> tuple[int, int]:
    return (info.rank, info.world_size) if info is not None else (get_rank(), get_world_size())


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            warnings.warn("checkpoint CUDA RNG states are for a different device count; CUDA RNG not restored")


def _share_tied(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Point every name of a shared (tied) parameter at ONE tensor of ``state_dict``, adding missing names.

    Saving: save_pretrained then stores a tied weight once. Loading: the file holds only one name of the tie
    (e.g. no ``lm_head.weight``), which a strict ``set_model_state_dict`` would report as missing.
    """
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    for names in names_of.values():
        present = [n for n in names if n in state_dict]
        if len(names) > 1 and present:
            for name in names:
                state_dict[name] = state_dict[present[0]]
    return state_dict


def _write_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, damaged or unreadable; the message names the file."""


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a ``checkpoint-{step:07d}`` folder name, or None for any other name."""
    return _checkpoint_step(Path(path))


def _checkpoint_step(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of ``run_dir`` (those with a COMPLETE marker), oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(step, p) for p in run_dir.iterdir()
             if (step := _checkpoint_step(p)) is not None and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def _remove_dir(path: Path) -> None:
    """Rename ``path`` to a temp name first, so a crash mid-delete never leaves a half-deleted checkpoint."""
    trash = path.with_name(f"{_TMP_PREFIX}delete-{path.name}-{os.getpid()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path, clean_stale: bool = True) -> Path | None:
    """The complete checkpoint with the highest step, or None.

    Folders without COMPLETE are ignored. With ``clean_stale``, rank 0 deletes leftover ``.tmp-*`` folders (from a
    crash mid-save); call it before training starts, never while another process may be saving into ``run_dir``.
    """
    run_dir = Path(run_dir)
    if clean_stale and is_main():
        remove_stale_temp_dirs(run_dir)
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_stale_temp_dirs(run_dir: str | Path) -> None:
    """Delete the ``.tmp-*`` folders a crash mid-save (or mid-delete) left; never while a save may be running."""
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        for path in run_dir.iterdir():
            if path.name.startswith(_TMP_PREFIX) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def verify_checkpoint(path: str | Path) -> str | None:
    """None if ``path`` is a complete checkpoint whose files match its manifest, else what is wrong (naming the file).

    A checkpoint without a manifest (saved by an older version) passes if its trainer_state.json reads: there is
    nothing else to check it against. Reads every file once (SHA-256: ~2 s per GB here, see grpo.manifest).
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        return f"{path}: not a complete checkpoint (no {COMPLETE} marker)"
    problem = verify_manifest(path)
    if problem is None:  # also catches a damaged trainer_state.json in a checkpoint without a manifest
        try:
            int(_read_json(path / "trainer_state.json")["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            problem = f"{path / 'trainer_state.json'}: unreadable ({type(e).__name__}: {e})"
    return problem


def newest_valid_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(The newest complete checkpoint of ``run_dir`` that passes ``verify_checkpoint``, the newer ones that failed
    with what is wrong with each). Reads only as far back as the first valid one."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def _write_rank0_files(tmp: Path, model: nn.Module, weights: dict, tokenizer, optim_state: dict | None,
                       scheduler, state_json: str, config: Any, extra_files: dict[str, str] | None) -> None:
    dtype = export_dtype(model)
    model.save_pretrained(tmp, state_dict=cast_for_export(_share_tied(weights, model), dtype))
    set_config_dtype(tmp, dtype)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if optim_state is not None:
        _write_torch(optim_state, tmp / "optimizer.pt")
    if scheduler is not None:
        _write_torch(scheduler.state_dict(), tmp / "scheduler.pt")
    (tmp / "trainer_state.json").write_text(state_json)
    if config is not None:
        (tmp / "config.yaml").write_text(config_to_yaml(config))
    for name, text in (extra_files or {}).items():
        if (tmp / name).exists() or Path(name).name != name:
            raise ValueError(f"extra checkpoint file {name!r}: not a plain file name, or it would replace a file "
                             f"the checkpoint already wrote")
        (tmp / name).write_text(text, encoding="utf-8")
    for path in tmp.iterdir():  # distcp/ is fsynced by DCP's writer
        if path.is_file() and not path.name.startswith("rng_state_rank"):  # each rank fsyncs its own RNG file
            _fsync_file(path)


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, tokenizer,
                    optimizer: torch.optim.Optimizer | None, scheduler, trainer_state: dict,
                    keep_last: int | None = 2, info: DistInfo | None = None, config: Any = None,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write ``run_dir/checkpoint-{step:07d}`` atomically and return its path (on every rank).

    Collective: every rank must call it (FSDP2 gathers are collective; each rank writes its RNG file and, when
    the model is sharded, its shards of the weights and optimizer state into ``distcp/``).
    ``trainer_state`` must be JSON-serialisable (step is added). ``config``: the run's config dataclass, stored
    as ``config.yaml`` and under ``"config"`` in trainer_state.json. ``keep_last``: how many complete checkpoints
    to keep (older steps are deleted after the new one is complete; checkpoints of higher steps are never touched);
    None keeps all. A checkpoint of the same step that already exists is replaced. ``extra_files``: {file name:
    text} written into the folder before COMPLETE (the task's files, e.g. a prompt recipe; a name that clashes with
    a checkpoint file is refused).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from grpo.distributed import full_state_dict

    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    rank, world_size = _rank_and_world(info)
    state = {"step": int(step), "world_size": world_size, **trainer_state}
    if config is not None:
        state["config"] = config_to_dict(config)
    state_json = json.dumps(state, indent=2)  # fails here, on every rank alike, before any collective
    run_dir = Path(run_dir)
    final = run_dir / f"checkpoint-{step:07d}"
    tmp = run_dir / f"{_TMP_PREFIX}{final.name}"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()

    optim_state = None
    with report_disk_full(final):
        _write_torch(_rng_state(), tmp / f"rng_state_rank{rank}.pt")
        if is_sharded(model):
            save_sharded_state(tmp, model, optimizer)  # collective; each rank writes its own shards
    if not is_sharded(model) and optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    weights = full_state_dict(model)  # collective; the tensors land on rank 0 only when sharded
    failure: Exception | None = None
    if rank == 0:
        try:
            with report_disk_full(final):
                _write_rank0_files(tmp, model, weights, tokenizer, optim_state, scheduler, state_json, config,
                                   extra_files)
        except Exception as e:  # re-raised below, after telling the other ranks (else they wait forever)
            failure = e
    del weights, optim_state
    if broadcast_object(None if failure is None else repr(failure)) is not None:
        if failure is not None:
            raise failure
        raise RuntimeError(f"rank 0 failed to write {final.name}; see its error")
    barrier()  # every rank's files are on disk
    if rank == 0:
        write_manifest(tmp, skip=(COMPLETE,))
        (tmp / COMPLETE).write_text(f"{step}\n")
        _fsync_file(tmp / COMPLETE)
        _fsync_dir(tmp)
        if final.exists():
            _remove_dir(final)
        os.rename(tmp, final)
        _fsync_dir(run_dir)
        if keep_last is not None:  # only older steps rotate: a higher step is never this run's to delete
            older = [p for p in list_checkpoints(run_dir) if _checkpoint_step(p) < step]
            for old in older[:max(len(older) - (keep_last - 1), 0)]:
                _remove_dir(old)
    barrier()
    return final


def _read(file: Path, reader) -> Any:
    """``reader(file)``, with any failure turned into one error that names the file."""
    try:
        return reader(file)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot be read ({type(e).__name__}: {e}); this checkpoint is damaged -- "
                              f"resume from an older one (--resume <its folder>)") from e


def _read_json(file: Path) -> Any:
    return json.loads(file.read_text())


def _torch_load(file: Path) -> Any:
    return torch.load(file, map_location="cpu", weights_only=True)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(_read(index, _read_json)["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(_read(path / name, load_file))
    return weights


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, info: DistInfo | None = None) -> dict:
    """Restore weights (into a plain or FSDP2-sharded model), optimizer, scheduler and this rank's RNG states.

    A checkpoint with ``distcp/`` restores the fp32 weights and optimizer state from there, resharded to this world
    size (not from the compute-dtype export). Collective when the model is sharded. Returns the trainer_state dict
    saved with the checkpoint. A file that cannot be read raises ``CheckpointError`` naming it (``verify_checkpoint``
    first finds most damage). Resuming on a different world size works for weights/optimizer/scheduler; the RNG
    streams then cannot be continued exactly (a warning is issued when this rank has no saved RNG state, and its
    generators are left as they are).
    """
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    rank, _ = _rank_and_world(info)
    if (path / DCP_DIR).is_dir():
        load_sharded_state(path, model, optimizer, error=CheckpointError)
    else:
        _load_full_state(path, model, optimizer, rank)
    if scheduler is not None:
        scheduler.load_state_dict(_read(path / "scheduler.pt", _torch_load))
    rng_file = path / f"rng_state_rank{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(_read(rng_file, _torch_load))
    else:
        warnings.warn(f"{rng_file.name} missing (checkpoint saved on fewer ranks); RNG state not restored")
    return _read(path / "trainer_state.json", _read_json)


def _load_full_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, rank: int) -> None:
    """Weights from the safetensors export and optimizer.pt (checkpoints without distcp/)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    # Sharded: rank 0 reads the files and the tensors are broadcast, so other ranks hold no full copy.
    from_rank0 = is_sharded(model)
    reads_files = rank == 0 or not from_rank0
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)

    weights = _share_tied(_read_weights(path), model) if reads_files else {}
    set_model_state_dict(model, weights, options=options)
    del weights
    if optimizer is not None:
        optim_state = _read(path / "optimizer.pt", _torch_load) if reads_files else {}
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
        del optim_state
