"""Checks of the NER fields of the scripts' configs, run by their ``validate()`` before any model or data loads.

Each function returns a list of problems (empty = fine), so a config can report all of them in one message.
They only look at names and at whether files exist: reading a data set is left to the run.
"""
from __future__ import annotations

from pathlib import Path

from ner.crossner_table import DATASET_GROUPS
from ner.data import REGISTRY, SPLITS, default_data_dir
from ner.mixture import mixture_names
from ner.prompts import FORMATS
from ner.rewards import PRESETS, REWARDS


def dataset_problems(field: str, name: str, split: str, data_dir: str | None) -> list[str]:
    """``name`` must be a registered data set whose ``split`` file exists under the data folder, or a data file;
    a training mixture (names joined by commas, ner/mixture.py) is checked member by member."""
    if "," in name:
        try:
            members = mixture_names(name)
        except ValueError:
            return [f"{field}={name!r} names no data set"]
        return [problem for member in members for problem in dataset_problems(field, member, split, data_dir)]
    if split not in SPLITS:
        return [f"split {split!r} (for {field}={name}): expected one of {', '.join(SPLITS)}"]
    if name in REGISTRY:
        root = Path(data_dir) if data_dir else default_data_dir()
        path = root / REGISTRY[name] / f"{SPLITS[split]}.txt"
        if not path.is_file():
            return [f"{field}={name}: {path} not found; pass --data_dir or set NER_DATA_DIR"]
        return []
    if Path(name).is_file() or Path(name).is_dir():  # a folder's split files are checked when it is read
        return []
    return [f"{field}={name!r}: neither a registered data set ({', '.join(REGISTRY)}; evaluate.py also takes the "
            f"group {', '.join(DATASET_GROUPS)}) nor an existing file or folder"]


def format_problems(fmt: str) -> list[str]:
    return [] if fmt in FORMATS else [f"format={fmt!r}: expected one of {', '.join(FORMATS)}"]


def reward_problems(weights: dict[str, float]) -> list[str]:
    unknown = [name for name in weights if name not in REWARDS]
    if unknown:
        return [f"reward_weights: unknown reward(s) {', '.join(unknown)}; known: {', '.join(REWARDS)} "
                f"(or a preset: {', '.join(PRESETS)})"]
    return []


def reward_weights_help() -> str:
    """The --help text of ``reward_weights``: the syntax, every reward name and every preset."""
    presets = "; ".join(f"{name} = " + ",".join(f"{k}={v:g}" for k, v in weights.items())
                        for name, weights in PRESETS.items())
    return (f"rewards as name=weight,... (YAML: a mapping) over {', '.join(REWARDS)} (ner/rewards.py); "
            f"or a preset name: {presets}")
