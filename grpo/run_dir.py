"""One out_dir holds one run: what a training start continues, refuses or moves away, decided before models load.

Both trainers (grpo.trainer.train, grpo.sft.train_sft) run ``plan_run`` and then ``start_run`` before their loop;
the scripts call ``plan_run`` right after parsing the config and hand the plan on, so a refusal comes before any
model loads. Rules, by ``resume``:

  none    A new run. If out_dir already holds a run's files (config.yaml, metrics.jsonl, samples.jsonl,
          config_changes.jsonl, tb/, checkpoint-*), refuse -- unless ``overwrite``, which MOVES those files into
          ``<out_dir>.old-<YYYYmmdd-HHMMSS>/`` (nothing is deleted; other files in out_dir, e.g. data, stay).
  auto    The newest checkpoint of out_dir that passes its manifest. Newer damaged ones are skipped with a warning
          naming the bad file, and renamed ``<name>.damaged`` (kept, but out of rotation and of ``--model <dir>``).
          No checkpoint at all: if out_dir's config.yaml is this config, the run died before its first save and
          restarts at step 0; any other run files are refused as for a new run; only damaged ones are refused too.
  <path>  That checkpoint (damage is an error naming the file). Inside out_dir no later checkpoint may exist (they
          would mix with the new branch); from elsewhere, out_dir must hold no run.

Resuming compares the checkpoint's saved config with this one field by field, except ``RESUME_MAY_CHANGE``, and
refuses with the list of differences unless ``allow_config_change``. Allowed changes are printed, appended to
out_dir/config_changes.jsonl and really used: the trainers put lr/betas/weight decay back into the restored
optimizer (grpo.optim.set_optimizer_hparams), and config.yaml records the config in use.

Logs: resuming at step S drops the metrics.jsonl / samples.jsonl lines with step > S (they were logged after the
checkpoint and will be logged again) and opens TensorBoard with purge_step S + 1; a restart at 0 keeps none.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from grpo.checkpoint import (COMPLETE, checkpoint_step, list_checkpoints, newest_valid_checkpoint,
                             remove_stale_temp_dirs, verify_checkpoint)
from grpo.config import ConfigError, config_to_dict, config_to_yaml
from grpo.distributed import DistInfo, barrier, broadcast_object

# Fields a resume may change without --allow_config_change: how the run is steered and logged, not what it learns.
RESUME_MAY_CHANGE = frozenset({"resume", "overwrite", "allow_config_change", "out_dir", "log_every",
                               "sample_log_count", "save_every", "keep_last", "eval_every"})
LOG_FILES = ("metrics.jsonl", "samples.jsonl")
CHANGES_FILE = "config_changes.jsonl"
_RUN_FILE_NAMES = {"config.yaml", "tb", CHANGES_FILE, *LOG_FILES}


@dataclass
class RunPlan:
    """What ``start_run`` does to out_dir and where training starts (picklable: rank 0 decides for everyone)."""
    out_dir: Path
    checkpoint: Path | None = None  # resume from here
    step: int = 0  # the checkpoint's step (0 for a new run or a restart)
    restart: bool = False  # this config's run stopped before its first checkpoint: start again at step 0
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # newer checkpoints skipped, with the reason
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # allowed: field -> (saved, now)
    move_away: list[str] = field(default_factory=list)  # overwrite: the old run's files, moved out of out_dir

    @property
    def tb_purge_step(self) -> int | None:
        """TensorBoard hides logged events with step >= this (SummaryWriter(purge_step=...)); None = nothing."""
        if self.checkpoint is not None:
            return self.step + 1
        return 0 if self.restart else None


def run_files(out_dir: Path) -> list[str]:
    """Names in ``out_dir`` that a training run writes (a new run's files would mix with these)."""
    if not out_dir.is_dir():
        return []
    return sorted(p.name for p in out_dir.iterdir()
                  if p.name in _RUN_FILE_NAMES or p.name.startswith(("checkpoint-", ".tmp-")))


def _listing(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", … ({len(names)} entries)" if len(names) > 6 else "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "<not saved>"


def config_differences(saved: dict, cfg: Any) -> dict[str, tuple[Any, Any]]:
    """{field: (saved value, value now)} for every field of ``cfg`` outside RESUME_MAY_CHANGE that differs.

    A field the saved config lacks (added to the code after the save) compares as its default.
    """
    now = config_to_dict(cfg)
    defaults = {f.name: _default(f) for f in dataclasses.fields(cfg)}
    out = {}
    for name, value in now.items():
        if name in RESUME_MAY_CHANGE:
            continue
        before = saved[name] if name in saved else json.loads(json.dumps(defaults[name], default=str))
        if before != value:
            out[name] = (before, value)
    return out


def _format_changes(changes: dict[str, tuple[Any, Any]]) -> str:
    return "\n".join(f"  - {name}: {old!r} -> {new!r}" for name, (old, new) in changes.items())


def _saved_config(checkpoint: Path, state: dict) -> dict | None:
    """The config a checkpoint was trained with: trainer_state.json "config" (a dict; a YAML string in GRPO
    checkpoints before the manifest), else its config.yaml, else None."""
    saved = state.get("config")
    if isinstance(saved, str):
        saved = _yaml_mapping(saved)
    if saved is None and (checkpoint / "config.yaml").is_file():
        saved = _yaml_mapping((checkpoint / "config.yaml").read_text())
    return saved if isinstance(saved, dict) else None


def _check_config(plan: RunPlan, saved: dict | None, cfg: Any, what: str) -> None:
    if saved is None:
        print(f"warning: {what} stores no config; the config cannot be compared with it", file=sys.stderr)
        return
    changes = config_differences(saved, cfg)
    if changes and not getattr(cfg, "allow_config_change", False):
        raise ConfigError(
            f"{what} was trained with a different config; resuming would silently change the run:\n"
            f"{_format_changes(changes)}\n"
            f"Drop these overrides to continue it as it was, pass --allow_config_change to continue with the new "
            f"values (recorded in {plan.out_dir / CHANGES_FILE}), or start a new run in another --out_dir.")
    plan.changes = changes


def _refuse_existing_run(out_dir: Path, found: list[str], why: str = "", detail: str = "") -> ConfigError:
    return ConfigError(
        f"out_dir {out_dir} already holds a training run ({_listing(found)}){why}. A new run there would mix its "
        f"checkpoints and logs with that run's. Continue it with --resume auto, start over with --overwrite (moves "
        f"those files to {out_dir}.old-<time>/), or pick another --out_dir." + (f"\n{detail}" if detail else ""))


def _yaml_mapping(text: str) -> dict | None:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return loaded if isinstance(loaded, dict) else None


def _plan_resume_auto(plan: RunPlan, cfg: Any, found: list[str]) -> None:
    plan.checkpoint, plan.damaged = newest_valid_checkpoint(plan.out_dir)
    if plan.checkpoint is not None:
        state = json.loads((plan.checkpoint / "trainer_state.json").read_text())
        plan.step = int(state["step"])
        _check_config(plan, _saved_config(plan.checkpoint, state), cfg, str(plan.checkpoint))
        return
    if plan.damaged:
        raise ConfigError(f"out_dir {plan.out_dir}: every checkpoint is damaged, so --resume auto has nothing to "
                          f"continue:\n" + "\n".join(f"  - {p}" for _, p in plan.damaged)
                          + "\nStart over with --overwrite (moves the run aside) or pick another --out_dir.")
    if not found:
        return
    config_file = plan.out_dir / "config.yaml"
    saved = _yaml_mapping(config_file.read_text()) if config_file.is_file() else None
    if saved is None:
        raise _refuse_existing_run(plan.out_dir, found, " but no checkpoint to resume")
    changes = config_differences(saved, cfg)
    if changes and not getattr(cfg, "allow_config_change", False):
        raise _refuse_existing_run(plan.out_dir, found, ", stopped before its first checkpoint, with another config",
                                   f"Its config.yaml differs (restart it with --allow_config_change):\n"
                                   f"{_format_changes(changes)}")
    plan.restart, plan.changes = True, changes


def _plan_resume_path(plan: RunPlan, cfg: Any, found: list[str]) -> None:
    checkpoint = Path(cfg.resume)
    if not (checkpoint / COMPLETE).is_file():
        raise ConfigError(f"resume={cfg.resume}: not a complete checkpoint folder (no {COMPLETE} marker)")
    problem = verify_checkpoint(checkpoint)
    if problem:
        raise ConfigError(f"resume={cfg.resume}: the checkpoint is damaged: {problem}")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    plan.checkpoint, plan.step = checkpoint, int(state["step"])
    if checkpoint.resolve().parent == plan.out_dir.resolve():
        later = [p.name for p in list_checkpoints(plan.out_dir) if checkpoint_step(p) > plan.step]
        if later:
            raise ConfigError(f"resume={cfg.resume}: out_dir also holds later checkpoints ({_listing(later)}); a "
                              f"run branching from step {plan.step} would mix with them. Move them out of "
                              f"{plan.out_dir}, or resume in another --out_dir.")
    elif found:
        raise _refuse_existing_run(plan.out_dir, found)
    _check_config(plan, _saved_config(checkpoint, state), cfg, str(checkpoint))


def _plan(cfg: Any) -> RunPlan:
    plan = RunPlan(out_dir=Path(cfg.out_dir))
    if plan.out_dir.exists() and not plan.out_dir.is_dir():
        raise ConfigError(f"out_dir {plan.out_dir} is a file, not a folder")
    found = run_files(plan.out_dir)
    if cfg.resume == "auto":
        _plan_resume_auto(plan, cfg, found)
    elif cfg.resume != "none":
        _plan_resume_path(plan, cfg, found)
    elif found and getattr(cfg, "overwrite", False):
        plan.move_away = found
    elif found:
        raise _refuse_existing_run(plan.out_dir, found)
    return plan


def plan_run(cfg: Any, info: DistInfo | None = None) -> RunPlan:
    """Decide where this run starts (see the module doc); raises ConfigError (on every rank) if it must not.

    Read-only: ``start_run`` makes the changes. Collective when distributed: rank 0 reads, every rank gets its plan.
    """
    plan = error = None
    if info is None or info.rank == 0:
        try:
            plan = _plan(cfg)
        except ConfigError as e:
            error = str(e)
    plan, error = broadcast_object((plan, error))
    if error is not None:
        raise ConfigError(error)
    return plan


def _unused(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def keep_logged_steps(path: Path, last_step: int | None) -> int:
    """Rewrite the JSONL file ``path`` keeping the lines with ``"step" <= last_step`` (None: keep none).

    Lines that do not parse (a crash mid-write) are dropped too. Returns how many lines were dropped.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
            keep = last_step is not None and step <= last_step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += bool(line.strip())
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def start_run(plan: RunPlan, cfg: Any, info: DistInfo | None = None) -> None:
    """Carry out ``plan`` on rank 0 (move an overwritten run aside, rename damaged checkpoints, trim the logs to the
    resumed step, write config.yaml and any allowed config change), then wait for it on every rank."""
    if info is None or info.rank == 0:
        out_dir = plan.out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        if plan.move_away:
            old = _unused(out_dir.with_name(f"{out_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
            old.mkdir()
            for name in plan.move_away:
                os.rename(out_dir / name, old / name)
            print(f"--overwrite: moved the previous run's files ({_listing(plan.move_away)}) to {old}",
                  file=sys.stderr, flush=True)
        remove_stale_temp_dirs(out_dir)
        for path, problem in plan.damaged:
            aside = _unused(path.with_name(path.name + ".damaged"))
            os.rename(path, aside)
            print(f"warning: skipping damaged checkpoint {path} ({problem}); renamed to {aside.name}",
                  file=sys.stderr, flush=True)
        if plan.checkpoint is not None or plan.restart:
            for name in LOG_FILES:
                dropped = keep_logged_steps(out_dir / name, plan.step if plan.checkpoint is not None else None)
                if dropped:
                    print(f"{name}: dropped {dropped} lines logged after step {plan.step} (they are re-run)",
                          file=sys.stderr, flush=True)
        if plan.changes:
            print(f"config changed on resume at step {plan.step} (--allow_config_change):\n"
                  f"{_format_changes(plan.changes)}", file=sys.stderr, flush=True)
            record = {"step": plan.step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "changes": {k: {"saved": old, "now": new} for k, (old, new) in plan.changes.items()}}
            with open(out_dir / CHANGES_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        (out_dir / "config.yaml").write_text(config_to_yaml(cfg))
    barrier()


def restore_checkpoint(plan: RunPlan, cfg: Any, model, optimizer, scheduler, info: DistInfo | None = None) -> int:
    """Load the plan's checkpoint (if any) into model, optimizer and scheduler and return its step (0 without one).
    A config change allowed by ``--allow_config_change`` takes effect: the new lr, betas and weight decay replace
    the restored ones."""
    from grpo.checkpoint import load_checkpoint
    from grpo.optim import set_optimizer_hparams

    if plan.checkpoint is None:
        return 0
    step = int(load_checkpoint(plan.checkpoint, model, optimizer, scheduler, info)["step"])
    if plan.changes:
        set_optimizer_hparams(optimizer, scheduler, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    return step
