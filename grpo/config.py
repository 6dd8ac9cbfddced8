"""Dataclass configs filled from a YAML file and command-line overrides.

A run's config is a plain ``@dataclass`` (the trainer defines ``GRPOConfig``, SFT defines ``SFTConfig``). Each
field may carry a help string: ``lr: float = field(default=1e-6, metadata={"help": "peak learning rate"})``.

    cfg = parse_config(GRPOConfig)            # reads sys.argv[1:]
    cfg = parse_config(GRPOConfig, ["--config", "configs/x.yaml", "--lr", "5e-6", "--use-kl=false"])

Precedence: field defaults < YAML files (``--config``, several allowed, later wins) < command-line ``--field value``
/ ``--field=value`` (in order, later wins). Hyphens and underscores in names are interchangeable. A bool field given
without a value (``--flag`` followed by another option or nothing) means true.

Values are coerced from the field annotations: bool, int, float, str, Path, ``X | None``, ``Literal[...]``,
``list[X]``, ``tuple[X, ...]``, ``dict[str, X]``. On the command line a list/tuple is comma-separated (``a,b,c``)
and a dict is ``name=1.0,other=2``. Every problem raises one ``ConfigError`` that names where it came from
(``file.yaml:LINE`` or the command-line option) and, for unknown names, suggests the closest valid fields.
After the dataclass is built, ``cfg.validate()`` runs if the class defines it; it should raise ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from grpo.errors import UserError
from grpo.foreign_flags import foreign_flag_hint

_NONE_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "1", "yes", "y", "on")
_FALSE_WORDS = ("false", "0", "no", "n", "off")


class ConfigError(UserError):
    """A config value, name or combination is wrong; the message says where and what to change."""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _unknown_field(name: str, valid: list[str], where: str) -> ConfigError:
    hint = foreign_flag_hint(name, valid, option=where.startswith("command line"))
    close = difflib.get_close_matches(name.replace("-", "_"), valid, n=3, cutoff=0.6)
    if close and not hint:
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?"
    return ConfigError(f"{where}: unknown config field {name!r}{hint} (run with --help to list every field)")


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("pathlib.", "")


def _split_commas(text: str) -> list[str]:
    return [] if not text.strip() else [part.strip() for part in text.split(",")]


def coerce_value(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (a YAML scalar/list/mapping or a command-line string) to type ``tp``.

    ``where`` ("file.yaml:3: field 'lr'" or "--lr") prefixes the error message.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{where}: expected {expected}, got {value!r}")

    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        if len(options) != 1:
            raise ConfigError(f"{where}: unsupported annotation {_type_name(tp)}")
        return coerce_value(value, options[0], where)
    if tp is Any:
        return value
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise fail("one of " + ", ".join(repr(a) for a in args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise fail("a bool (true/false/1/0/yes/no)")
    if tp is int:
        if isinstance(value, bool):
            raise fail("an int")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:  # "1e3" is a whole number written in float notation
                    as_float = float(value)
                except ValueError:
                    raise fail("an int") from None
                if as_float.is_integer():
                    return int(as_float)
        raise fail("an int")
    if tp is float:
        if isinstance(value, bool):
            raise fail("a float")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "5e-6" (no dot) as a string, so this path matters for YAML too
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise fail("a float")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail("a string (quote it in YAML)")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise fail("a path")
    if origin in (list, tuple):
        items = _split_commas(value) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise fail(f"a list ({_type_name(tp)}); on the command line: a,b,c")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(items) != len(args):
                raise fail(f"{len(args)} comma-separated values ({_type_name(tp)})")
            return tuple(coerce_value(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(items, args)))
        item_tp = args[0] if args else Any
        out = [coerce_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(items)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        key_tp, val_tp = args if args else (Any, Any)
        mapping = value
        if isinstance(value, str):
            mapping = {}
            for part in _split_commas(value):
                key, eq, val = part.partition("=")
                if not eq or not key.strip():
                    raise fail(f"a mapping ({_type_name(tp)}); on the command line: name=1.0,other=2")
                mapping[key.strip()] = val.strip()
        if not isinstance(mapping, dict):
            raise fail(f"a mapping ({_type_name(tp)})")
        return {coerce_value(k, key_tp, f"{where} key"): coerce_value(v, val_tp, f"{where}[{k!r}]")
                for k, v in mapping.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


def _coerce_field(value: Any, f: dataclasses.Field, tp: Any, where: str) -> Any:
    """``coerce_value``, except that a field with named presets (``dict_option(presets=...)``) also takes a name."""
    presets = f.metadata.get("presets")
    if presets and isinstance(value, str) and "=" not in value:
        if value.strip() in presets:
            return dict(presets[value.strip()])
        raise ConfigError(f"{where}: unknown preset {value.strip()!r}; expected one of "
                          f"{', '.join(sorted(presets))} or name=weight,...")
    return coerce_value(value, tp, where)


def _load_yaml(path: str, fields: dict[str, dataclasses.Field], hints: dict[str, Any]) -> dict[str, Any]:
    """The coerced values of one YAML config file, keyed by field name."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()  # nodes keep line numbers for the error messages
        if root is None:  # an empty file (or only comments) sets nothing
            return {}
        if not isinstance(root, yaml.MappingNode):
            kind = type(loader.construct_document(root)).__name__
            raise ConfigError(f"{path}:{root.start_mark.line + 1}: the config file must be a mapping of "
                              f"field: value, got a {kind}")
        out: dict[str, Any] = {}
        for key_node, value_node in root.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError(f"{path}:{line}: config keys must be plain field names")
            name = key_node.value.replace("-", "_")
            if name not in fields:
                raise _unknown_field(key_node.value, list(fields), f"{path}:{line}")
            value = loader.construct_object(value_node, deep=True)
            out[name] = _coerce_field(value, fields[name], hints[name], f"{path}:{line}: field {name!r}")
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    return out


def _split_argv(argv: list[str], fields: dict[str, dataclasses.Field], hints: dict[str, Any]
                ) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(YAML paths, [(field, raw value, option as typed)]) from the command line, in order."""
    yaml_paths: list[str] = []
    overrides: list[tuple[str, str, str]] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"command line: unexpected argument {token!r}; options look like --field value")
        name, eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        option = "--" + name
        if key != "config" and key not in fields:
            raise _unknown_field(name, list(fields), f"command line option {option}")
        if not eq:
            next_is_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if next_is_value:
                value = argv[i + 1]
                i += 1
            elif key != "config" and hints[key] is bool:
                value = "true"
            else:
                raise ConfigError(f"command line option {option}: missing value")
        if key == "config":
            yaml_paths.append(value)
        else:
            overrides.append((key, value, option))
        i += 1
    return yaml_paths, overrides


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def format_help(cls: type, prog: str | None = None) -> str:
    """Every field with its type, default and help text."""
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    prog = prog or Path(sys.argv[0]).name
    lines = [f"usage: {prog} [--config FILE.yaml] [--field VALUE | --field=VALUE ...]", "",
             (cls.__doc__ or cls.__name__).strip().splitlines()[0], "", "fields:"]
    for name, f in fields.items():
        default = _default_of(f)
        shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        lines.append(f"  --{name} {_type_name(hints[name])}  ({shown})")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    lines += ["", "  --debug  on an error, show the full traceback (also: GRPO_DEBUG=1)"]
    return "\n".join(lines) + "\n"


def parse_config(cls: type, argv: list[str] | None = None):
    """Build ``cls`` from defaults, ``--config`` YAML files and ``--field value`` overrides (see module doc).

    ``--help``/``-h`` prints :func:`format_help` and exits with status 0. Raises ``ConfigError`` on any bad input.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--help" in argv or "-h" in argv:
        sys.stdout.write(format_help(cls))
        raise SystemExit(0)
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    yaml_paths, overrides = _split_argv(argv, fields, hints)
    values: dict[str, Any] = {}
    for path in yaml_paths:
        values.update(_load_yaml(path, fields, hints))
    for name, raw, option in overrides:
        values[name] = _coerce_field(raw, fields[name], hints[name], f"command line option {option}")
    missing = [n for n, f in fields.items() if n not in values and _default_of(f) is dataclasses.MISSING]
    if missing:
        raise ConfigError("missing required config field(s): " + ", ".join(missing)
                          + " (set them in the YAML file or as --name VALUE)")
    cfg = cls(**values)
    if callable(getattr(cfg, "validate", None)):
        cfg.validate()
    return cfg


def check_paths(cfg: Any) -> None:
    """Raise one ``ConfigError`` listing ``cfg.path_problems()``: the model folders, data files and checkpoints the
    config names that do not exist. Scripts call it right after ``parse_config``, before anything loads."""
    problems = list(dict.fromkeys(cfg.path_problems()))
    if problems:
        raise ConfigError("; ".join(problems))


def _plain(value: Any) -> Any:
    """YAML-safe copy: Paths become strings, tuples lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON/YAML-safe dict of a config dataclass (for trainer_state.json)."""
    return {f.name: _plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def config_to_yaml(cfg: Any) -> str:
    """YAML text that ``parse_config(type(cfg), ["--config", file])`` reads back into an equal config."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write :func:`config_to_yaml` to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(config_to_yaml(cfg))
    return path


def option(default, help: str):
    """A config field with its ``--help`` text: ``lr: float = option(5e-6, "peak learning rate")``."""
    return dataclasses.field(default=default, metadata={"help": help})


def list_option(default: list, help: str):
    return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})


def dict_option(default: dict, help: str, presets: dict[str, dict] | None = None):
    """A mapping field; with ``presets``, ``--field NAME`` (or ``field: NAME`` in YAML) stands for that mapping."""
    metadata = {"help": help, **({"presets": presets} if presets else {})}
    return dataclasses.field(default_factory=lambda: dict(default), metadata=metadata)
