"""Resolve a label set (the entity types a prompt asks for, with their descriptions) from what a user types.

Three spellings, tried in this order:
  * a registered data set name (``conll2003``, ``crossner_music``, …): its types and the descriptions training
    prompts use (CoNLL's come from ``<data_dir>/conll2003/queries.json`` when present, as in ``ner.data``);
  * a ``.yaml`` / ``.yml`` / ``.json`` file holding a mapping ``type: description`` (order kept); a list of type
    names is accepted too and gets the built-in descriptions;
  * inline: ``person,location`` (built-in descriptions) or ``person=A human being;location=A place`` — items
    are split on ";" as soon as any item carries "=", because descriptions often contain commas.
A bad file or spelling raises ``SchemaError`` naming the file (and line where the parser knows it) and the problem.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from grpo.errors import UserError
from ner.descriptions import CONLL_TYPES, CROSSNER_TYPES, describe

SCHEMA_SUFFIXES = (".yaml", ".yml", ".json")
# A type name becomes a JSON key and a tag suffix (B-<type>): no whitespace, no separators of either syntax.
_TYPE_NAME = re.compile(r"^[^\s,;=|]+$")


class SchemaError(UserError):
    """A label set that cannot be read; the message names the file (or the spelling) and the problem."""


@dataclass
class LabelSet:
    types: list[str]
    descriptions: dict[str, str]
    source: str  # where it came from, for the user: "conll2003", "labels.yaml", "inline"


def registered_label_set(name: str, data_dir: str | None = None) -> LabelSet:
    """The types and descriptions ``ner.data.load_ner_dataset(name, …)`` gives prompts, without reading data."""
    from ner.data import REGISTRY, conll_descriptions, default_data_dir

    if name not in REGISTRY:
        raise SchemaError(f"unknown data set name {name!r}; known: {sorted(REGISTRY)}")
    if name == "conll2003":
        known = conll_descriptions(Path(data_dir) if data_dir else default_data_dir())
        return LabelSet(sorted(CONLL_TYPES), {t: known.get(t) or describe(t) for t in sorted(CONLL_TYPES)}, name)
    domain = name.removeprefix("crossner_")
    types = sorted(CROSSNER_TYPES[domain])
    return LabelSet(types, {t: describe(t, domain) for t in types}, name)


def _check_type_name(name: object, where: str) -> str:
    if not isinstance(name, str) or not _TYPE_NAME.match(name):
        raise SchemaError(f"{where}: type name {name!r} must be a non-empty string without spaces, ',', ';', "
                          f"'=' or '|'")
    return name


def _from_mapping(raw: object, where: str) -> tuple[list[str], dict[str, str]]:
    if isinstance(raw, list):
        types = [_check_type_name(t, where) for t in raw]
        descriptions = {t: describe(t) for t in types}
    elif isinstance(raw, dict):
        types, descriptions = [], {}
        for name, text in raw.items():
            _check_type_name(name, where)
            if text is None:
                text = describe(name)
            if not isinstance(text, str) or not text.strip():
                raise SchemaError(f"{where}: the description of {name!r} must be a non-empty string, got {text!r}")
            types.append(name)
            descriptions[name] = " ".join(text.split())
    else:
        raise SchemaError(f"{where}: expected a mapping of type: description (or a list of types), "
                          f"got {type(raw).__name__}")
    if not types:
        raise SchemaError(f"{where}: no entity types in it")
    if len(set(types)) != len(types):
        raise SchemaError(f"{where}: type {next(t for t in types if types.count(t) > 1)!r} is listed twice")
    return types, descriptions


def _no_duplicate_keys(pairs: list[tuple[str, object]], path: Path) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise SchemaError(f"{path}: type {key!r} is listed twice")
        seen[key] = value
    return seen


def read_schema_file(path: str | Path) -> LabelSet:
    """A ``.yaml``/``.yml``/``.json`` file of ``type: description`` (see the module docstring)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: schema file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SchemaError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text, object_pairs_hook=lambda pairs: _no_duplicate_keys(pairs, path))
        except json.JSONDecodeError as err:
            raise SchemaError(f"{path}, line {err.lineno}: invalid JSON ({err.msg})") from None
    else:
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark is not None else ""
            raise SchemaError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
    types, descriptions = _from_mapping(raw, str(path))
    return LabelSet(types, descriptions, path.name)


def parse_inline_labels(spec: str) -> LabelSet:
    """``person,location`` or ``person=A human being;location=A place`` (see the module docstring)."""
    items = spec.split(";") if "=" in spec else spec.split(",")
    types, descriptions = [], {}
    for item in (i.strip() for i in items):
        if not item:
            raise SchemaError(f"labels {spec!r}: an empty item (a doubled or trailing separator)")
        name, eq, text = (part.strip() for part in item.partition("="))
        _check_type_name(name, f"labels {spec!r}")
        if eq and not text:
            raise SchemaError(f"labels {spec!r}: {name!r}= has no description")
        if name in descriptions:
            raise SchemaError(f"labels {spec!r}: type {name!r} is listed twice")
        types.append(name)
        descriptions[name] = text or describe(name)
    return LabelSet(types, descriptions, "inline")


def resolve_labels(spec: str, data_dir: str | None = None) -> LabelSet:
    """A label set from a data set name, a schema file or an inline list (see the module docstring)."""
    from ner.data import REGISTRY

    spec = spec.strip()
    if not spec:
        raise SchemaError("labels: empty; give a data set name, a .yaml/.json file or person,location")
    if spec in REGISTRY:
        return registered_label_set(spec, data_dir)
    if spec.lower().endswith(SCHEMA_SUFFIXES):
        return read_schema_file(spec)
    if re.match(r"^(conll|crossner)", spec) and "," not in spec and "=" not in spec:
        # A one-word label set that looks like a misspelt data set name is far more likely a typo than a type.
        raise SchemaError(f"labels {spec!r}: not a registered data set (known: {sorted(REGISTRY)}); "
                          f"for a single type of that name write {spec}={describe(spec)!r}")
    return parse_inline_labels(spec)
