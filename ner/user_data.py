"""A user's own data at evaluation: which split is scored, a label map onto the type names a model was trained
on, and where few-shot examples come from.

* Splits: ``--dataset path/to/folder`` holds one file per split (``train``, ``dev`` | ``validation`` | ``valid``,
  ``test``, any extension ``ner.data`` reads) and ``--split`` picks one. A single data file is one split: there is
  nothing in it for ``--split`` to pick, so ``check_split`` refuses an explicit split for it instead of ignoring it.
* ``--label_map PER=person,LOC=location`` renames a data file's (or folder's) types to names the model knows; the
  renamed types then get those names' descriptions (``ner.data.user_type_descriptions``: CoNLL-2003's for its
  types). Registered data sets already use those names and are never renamed.
* Few-shot examples come from ``--fewshot_data`` (a registered name or a folder: its train split; a file: all of
  it), else from the scored data set's train split, which a single file does not have. Never from the scored file
  itself: its examples would show the model the gold answers of the very sentences being scored.
"""
from __future__ import annotations

from pathlib import Path

from ner.data import REGISTRY, SPLITS, data_file, load_ner_dataset, user_type_descriptions
from ner.types import Entity, NERDataset, Sentence


def is_single_file(name: str) -> bool:
    """A path to one data file (not a registered name, not a folder of split files)."""
    return name not in REGISTRY and Path(name).is_file()


def check_split(name: str, split: str) -> None:
    """An explicitly asked split must exist: a single file has none to pick (a folder's is checked on reading)."""
    if split and is_single_file(name):
        raise ValueError(f"split {split!r} of {name}: a single data file has no splits to pick from. Leave the "
                         f"split out (empty) to use the whole file, or pass a folder holding train/dev/test files")


def check_label_map(label_map: dict[str, str]) -> None:
    """Every entry renames a non-empty type to a non-empty type."""
    for old, new in label_map.items():
        if not old.strip() or not new.strip():
            raise ValueError(f"--label_map {old}={new}: both sides must be type names (FILE_TYPE=model_type, e.g. "
                             f"PER=person)")


def rename_types(data: NERDataset, label_map: dict[str, str], data_dir: str | None = None,
                 require_keys: bool = True) -> NERDataset:
    """``data`` with its entity types renamed through ``label_map`` (unmapped types keep their names) and the
    descriptions of the new names.

    ``require_keys``: a key that is not a type of ``data`` while some type of it stays unmapped (and is not a
    model type named in the map) is an error: most likely a typo (``PRE=person`` with ``PER`` left as it was). A
    key alone without a match is fine: a small file may lack a type of a full map. Off for few-shot pools."""
    unused = [k for k in label_map if k not in data.types]
    left = [t for t in data.types if t not in label_map and t not in label_map.values()]
    if unused and left and require_keys:
        raise ValueError(f"--label_map: {', '.join(map(repr, unused))} is not a type of {data.name}, whose types "
                         f"{', '.join(map(repr, left))} the map leaves unmapped (its types: {', '.join(data.types)})")
    sentences = [Sentence(s.tokens, [Entity(label_map.get(e.type, e.type), e.start, e.end, e.text)
                                     for e in s.entities], s.id) for s in data.sentences]
    types = sorted({label_map.get(t, t) for t in data.types})
    return NERDataset(data.name, data.split, sentences, types, user_type_descriptions(types, data_dir))


def load_user_dataset(name: str, split: str, data_dir: str | None = None, label_map: dict[str, str] | None = None,
                      require_keys: bool = True) -> NERDataset:
    """``load_ner_dataset`` plus the label map, which applies to data files and folders only."""
    data = load_ner_dataset(name, split or "test", data_dir)
    if label_map and name not in REGISTRY:
        data = rename_types(data, label_map, data_dir, require_keys)
    return data


def load_fewshot_pool(dataset: str, split: str, k_shot: int, fewshot_data: str = "", data_dir: str | None = None,
                      label_map: dict[str, str] | None = None) -> NERDataset | None:
    """The few-shot pool for prompts scored on ``dataset``/``split`` (None when ``k_shot`` is 0); see the module
    docstring. Raises ValueError when it would be the scored file itself."""
    if k_shot <= 0:
        return None
    if (split or "test") not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    source = fewshot_data or dataset
    if not fewshot_data and is_single_file(dataset):
        raise ValueError(f"k_shot {k_shot}: few-shot examples for the data file {dataset} would come from that "
                         f"very file, showing the model gold answers of the sentences it is scored on. Pass "
                         f"--fewshot_data with your training file (or a registered name, or a folder with a train "
                         f"file), or --k_shot 0")
    if _same_split(dataset, split or "test", source, "train"):
        raise ValueError(f"few-shot examples would come from the {split or 'test'} split of {dataset}, the "
                         f"data being scored; name other data with --fewshot_data (your training data) or pass "
                         f"--k_shot 0")
    return load_user_dataset(source, "train", data_dir, label_map, require_keys=False)


def _same_split(name_a: str, split_a: str, name_b: str, split_b: str) -> bool:
    """Do (data set, split) a and b read the same sentences? Registered: same name and split; paths: same file."""
    if name_a in REGISTRY or name_b in REGISTRY:
        return name_a == name_b and SPLITS[split_a] == SPLITS[split_b]
    file_a, file_b = data_file(name_a, split_a), data_file(name_b, split_b)
    return file_a is not None and file_b is not None and file_a.resolve() == file_b.resolve()
