"""Read NER data into ``list[Sentence]`` and resolve named data sets into ``NERDataset``.

Formats: column files (BIO/IOB1/IOB2/BIOES, token-first or tag-first, CoNLL 4-column), the MRC-NER JSON of
ShannonAI's mrc-for-flat-nested-ner (one record per (sentence, type), ``end_position`` inclusive word index),
JSONL ``{"tokens", "entities": [{"type", "start", "end"}]}`` (end exclusive), and Hugging Face hub rows.
Every malformed input raises ``DataFormatError`` naming the file, the line and the problem.
"""
from __future__ import annotations

import functools
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

from grpo.errors import UserError
from ner.descriptions import CONLL_FALLBACK, CONLL_TYPES, CROSSNER_TYPES, describe
from ner.types import Entity, NERDataset, Sentence

SCHEMES = {"auto": "auto", "iob2": "iob2", "bio": "iob2", "iob1": "iob1",
           "bioes": "bioes", "iobes": "bioes", "bilou": "bioes"}
_TAG_RE = re.compile(r"^(?:O|[BIESLU]-\S+)$")
_PREFIX_ALIAS = {"L": "E", "U": "S"}  # BILOU spelling of BIOES
_ALLOWED_PREFIXES = {"iob1": "BI", "iob2": "BI", "bioes": "BIES"}
CONLL_ABBREVIATIONS = {"PER": "person", "LOC": "location", "ORG": "organisation", "MISC": "misc"}
REGISTRY = {"conll2003": "conll2003", **{f"crossner_{d}": f"crossner/{d}" for d in CROSSNER_TYPES}}
HUB_IDS = {"conll2003": ("eriktks/conll2003", None), **{f"crossner_{d}": ("DFKI-SLT/cross_ner", d)
                                                          for d in CROSSNER_TYPES}}
SPLITS = {"train": "train", "dev": "dev", "validation": "dev", "valid": "dev", "test": "test"}
SPLIT_FILE_STEMS = {"train": ("train",), "dev": ("dev", "validation", "valid"), "test": ("test",)}


class DataFormatError(UserError):  # a ValueError; the scripts print it as one line (grpo.cli)
    """Malformed NER data. ``str(err)`` is ``"<file>, line <n>: <problem>"`` (no line when none applies)."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}, line {line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


# ----------------------------------------------------------------------------------------------- tag decoding
def _split_tag(tag: str) -> tuple[str, str]:
    """'B-person' -> ('B', 'person'); 'O' -> ('O', ''). The type may itself contain hyphens."""
    if tag == "O":
        return "O", ""
    return _PREFIX_ALIAS.get(tag[0], tag[0]), tag[2:]


def detect_scheme(tag_seqs: list[list[str]]) -> str:
    """BIOES if any S-/E- (or U-/L-) tag; IOB1 if some I-X opens a span (IOB2 would need B-X there); else IOB2."""
    iob1 = False
    for tags in tag_seqs:
        prev = ("O", "")
        for tag in tags:
            prefix, typ = _split_tag(tag)
            if prefix in "SE":
                return "bioes"
            if prefix == "I" and not (prev[0] in "BI" and prev[1] == typ):
                iob1 = True
            prev = (prefix, typ)
    return "iob1" if iob1 else "iob2"


def _decode(tags: list[str], scheme: str, strict: bool, path: str, lines: list[int]) -> list[tuple[str, int, int]]:
    """Tag sequence [n] -> spans (type, start, end exclusive). ``lines[i]`` is tag i's line for error messages.

    Lenient (default): an I-X/E-X that does not continue an open X span opens a new one (conlleval behaviour,
    which is also exactly how IOB1 is read). Strict: that is an error, except under IOB1 where it is legal.
    """
    spans: list[tuple[str, int, int]] = []
    open_type, start, prev_tag = None, 0, "sentence start"
    for i, tag in enumerate(tags):
        prefix, typ = _split_tag(tag)
        if prefix != "O" and prefix not in _ALLOWED_PREFIXES[scheme]:
            raise DataFormatError(path, lines[i], f"tag {tag!r} is not allowed in the {scheme.upper()} scheme")
        if prefix in "OBS" or (prefix in "IE" and open_type != typ):
            if prefix in "IE" and strict and scheme != "iob1":
                raise DataFormatError(path, lines[i], f"illegal span start: {tag!r} after {prev_tag!r}")
            if open_type is not None:
                spans.append((open_type, start, i))
            open_type, start = (None, i) if prefix == "O" else (typ, i)
        if prefix in "SE":  # the span closes on this token
            spans.append((typ, start, i + 1))
            open_type = None
        prev_tag = tag
    if open_type is not None:
        spans.append((open_type, start, len(tags)))
    return spans


def tags_to_spans(tags: list[str], scheme: str = "iob2", strict: bool = False) -> list[tuple[str, int, int]]:
    """Decode one tag sequence (scheme iob2/iob1/bioes, or auto) into (type, start, end exclusive) spans."""
    for i, tag in enumerate(tags):
        if not _TAG_RE.match(tag):
            raise DataFormatError("<tags>", i + 1, f"malformed tag {tag!r}")
    scheme = _resolve_scheme(scheme, [tags], strict, "<tags>")
    return _decode(tags, scheme, strict, "<tags>", list(range(1, len(tags) + 1)))


def _resolve_scheme(scheme: str, tag_seqs: list[list[str]], strict: bool, path: str) -> str:
    if scheme.lower() not in SCHEMES:
        raise DataFormatError(path, None, f"unknown tag scheme {scheme!r}; expected one of {sorted(SCHEMES)}")
    scheme = SCHEMES[scheme.lower()]
    if scheme != "auto":
        return scheme
    detected = detect_scheme(tag_seqs)
    # IOB1's defining feature (I-X opening a span) is exactly what strict mode rejects, so strict never infers it.
    return "iob2" if strict and detected == "iob1" else detected


def _make_sentence(tokens: list[str], spans: list[tuple[str, int, int]], sid: str) -> Sentence:
    return Sentence(tokens=tokens, id=sid,
                    entities=[Entity(t, s, e, " ".join(tokens[s:e])) for t, s, e in spans])


# ------------------------------------------------------------------------------------------------ file readers
def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataFormatError(path, line, f"invalid UTF-8 byte 0x{raw[err.start]:02x} at offset {err.start}") from None
    if not text.strip():
        raise DataFormatError(path, 1, "empty file (no data)")
    return text.removeprefix("\ufeff")


def _columns(line: str) -> list[str]:
    # Tab-separated files may hold tokens with spaces; otherwise any run of spaces separates columns.
    return [c for c in (line.split("\t") if "\t" in line else line.split(" ")) if c]


def _check_column_counts(path: Path, rows: list[tuple[int, list[str]]]) -> None:
    """Every token line has the file's usual column count (the most common one), else a DataFormatError."""
    counts = Counter(len(cols) for _, cols in rows if cols)
    if len(counts) <= 1:
        return
    usual = counts.most_common(1)[0][0]
    lineno, cols = next((n, c) for n, c in rows if c and len(c) != usual)
    hint = (" (a token with a space needs a tab between token and tag)" if len(cols) > usual else "")
    raise DataFormatError(path, lineno, f"line has {len(cols)} columns {cols!r} but the file's other lines have "
                                        f"{usual}; which column is the token is ambiguous{hint}")


def read_column_file(path: str | os.PathLike, scheme: str = "auto", strict: bool = False) -> list[Sentence]:
    """One token per line, blank line between sentences; ``token TAG`` or ``TAG token`` (detected per file).

    Columns are separated by tabs when the line has one, else by spaces. With more than two columns (CoNLL:
    token POS chunk tag) the first is the token and the last the tag. Every token line of a file must have the
    same number of columns: a space-separated ``New York B-LOC`` among two-column lines would otherwise lose
    "York" without a word, so it is an error naming the line (a token with a space needs a tab-separated file).
    ``-DOCSTART-`` lines end the current sentence and are dropped.
    """
    path = Path(path)
    rows: list[tuple[int, list[str]]] = []  # (line number, columns); [] marks a sentence boundary
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        cols = _columns(line.rstrip("\r").strip(" \t"))
        if cols and "-DOCSTART-" in (cols[0], cols[-1]):
            cols = []
        if len(cols) == 1:
            raise DataFormatError(path, lineno, f"line has one column ({cols[0]!r}); expected a token and a tag")
        rows.append((lineno, cols))
    _check_column_counts(path, rows)
    filled = [c for _, c in rows if c]
    tag_first = sum(map(bool, (_TAG_RE.match(c[0]) for c in filled))) > sum(
        map(bool, (_TAG_RE.match(c[-1]) for c in filled)))
    tok_i, tag_i = (-1, 0) if tag_first else (0, -1)

    sentences_raw: list[tuple[list[str], list[str], list[int]]] = []
    tokens, tags, lines = [], [], []
    for lineno, cols in rows + [(len(rows) + 1, [])]:
        if not cols:
            if tokens:
                sentences_raw.append((tokens, tags, lines))
            tokens, tags, lines = [], [], []
            continue
        if not _TAG_RE.match(cols[tag_i]):
            raise DataFormatError(path, lineno, f"malformed tag {cols[tag_i]!r}; expected O, B-X, I-X, E-X or S-X")
        tokens.append(cols[tok_i])
        tags.append(cols[tag_i])
        lines.append(lineno)
    if not sentences_raw:
        raise DataFormatError(path, 1, "empty file (no token lines)")
    resolved = _resolve_scheme(scheme, [t for _, t, _ in sentences_raw], strict, str(path))
    return [_make_sentence(tok, _decode(tg, resolved, strict, str(path), ln), f"{path.name}:{i}")
            for i, (tok, tg, ln) in enumerate(sentences_raw)]


def _entity_from_json(obj: object, n_tokens: int, path: Path, lineno: int) -> tuple[str, int, int, str | None]:
    def is_index(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a token index

    if not (isinstance(obj, dict) and isinstance(obj.get("type"), str) and is_index(obj.get("start"))
            and is_index(obj.get("end"))):
        raise DataFormatError(path, lineno, f"field 'entities': entity {json.dumps(obj)} needs a string 'type' and "
                                            f"integer 'start', 'end'")
    if obj.get("text") is not None and not isinstance(obj["text"], str):
        raise DataFormatError(path, lineno, f"field 'entities': entity text {json.dumps(obj['text'])} is not a string")
    if not 0 <= obj["start"] < obj["end"] <= n_tokens:
        raise DataFormatError(path, lineno, f"entity span [{obj['start']}, {obj['end']}) is outside the "
                                            f"{n_tokens} tokens or empty")
    return obj["type"], obj["start"], obj["end"], obj.get("text")


def read_jsonl(path: str | os.PathLike) -> list[Sentence]:
    """``{"tokens": [...], "entities": [{"type", "start", "end", "text"?}], "id"?}`` per line; end exclusive."""
    path = Path(path)
    sentences = []
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(path, lineno, f"bad JSON line ({err.msg}, column {err.colno})") from None
        tokens = rec.get("tokens") if isinstance(rec, dict) else None
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
            raise DataFormatError(path, lineno, "record needs a 'tokens' list of strings")
        entities = rec.get("entities", [])
        if not isinstance(entities, list):
            raise DataFormatError(path, lineno, f"field 'entities' must be a list of {{type, start, end}} objects "
                                                f"(or absent), got {json.dumps(entities)}")
        spans = []
        for ent in entities:
            typ, s, e, text = _entity_from_json(ent, len(tokens), path, lineno)
            if text is not None and text != " ".join(tokens[s:e]):
                raise DataFormatError(path, lineno, f"entity text {text!r} != tokens {s}:{e} "
                                                    f"{' '.join(tokens[s:e])!r}")
            spans.append((typ, s, e))
        sentences.append(_make_sentence(tokens, sorted(spans, key=lambda x: (x[1], x[2])),
                                        str(rec.get("id", f"{path.name}:{len(sentences)}"))))
    return sentences


def write_jsonl(sentences: list[Sentence], path: str | os.PathLike) -> None:
    """Inverse of ``read_jsonl`` (text and id included)."""
    with open(path, "w", encoding="utf-8") as f:
        for s in sentences:
            ents = [{"type": e.type, "start": e.start, "end": e.end, "text": e.text} for e in s.entities]
            f.write(json.dumps({"id": s.id, "tokens": s.tokens, "entities": ents}, ensure_ascii=False) + "\n")


def read_mrc_json(path: str | os.PathLike, label_map: dict[str, str] | None = None) -> list[Sentence]:
    """MRC-NER JSON: records grouped into sentences by the ``qas_id`` prefix ("<sentence>.<type>"), else context.

    ``context`` is whitespace-tokenised; ``start_position``/``end_position`` are word indices, end inclusive.
    ``label_map`` renames labels; by default the CoNLL abbreviations PER/LOC/ORG/MISC become the full names
    used everywhere else. Record problems name the record index (JSON has no useful line per record).
    """
    path = Path(path)
    label_map = CONLL_ABBREVIATIONS if label_map is None else label_map
    try:
        records = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise DataFormatError(path, err.lineno, f"bad JSON ({err.msg})") from None
    if not isinstance(records, list):
        raise DataFormatError(path, 1, "expected a JSON list of MRC records")
    groups: dict[str, tuple[list[str], set[tuple[str, int, int]]]] = {}
    for k, rec in enumerate(records):
        where = f"record {k}"
        if not isinstance(rec, dict) or not isinstance(rec.get("context"), str) or "entity_label" not in rec:
            raise DataFormatError(path, None, f"{where}: needs 'context' and 'entity_label'")
        qas = str(rec.get("qas_id", ""))
        key = qas.rsplit(".", 1)[0] if "." in qas else f"{path.name}:{rec['context']}"
        tokens, spans = groups.setdefault(key, (rec["context"].split(), set()))
        if tokens != rec["context"].split():
            raise DataFormatError(path, None, f"{where}: qas_id {qas!r} groups it with a different context")
        label = label_map.get(rec["entity_label"], rec["entity_label"])
        for s, e in _mrc_positions(rec, where, path):
            if not 0 <= s <= e < len(tokens):
                raise DataFormatError(path, None, f"{where}: span {s}..{e} (inclusive) outside {len(tokens)} words")
            spans.add((label, s, e + 1))
    return [_make_sentence(toks, sorted(spans, key=lambda x: (x[1], x[2], x[0])),
                           key if not key.startswith(f"{path.name}:") else f"{path.name}:{i}")
            for i, (key, (toks, spans)) in enumerate(groups.items())]


def _mrc_positions(rec: dict, where: str, path: Path) -> list[tuple[int, int]]:
    """(start, end inclusive) pairs from start_position/end_position, else from span_position "s;e" strings."""
    if "start_position" in rec or "end_position" in rec:
        starts, ends = rec.get("start_position"), rec.get("end_position")
    else:
        pairs = [str(x).split(";") for x in rec.get("span_position", [])]
        starts, ends = [p[0] for p in pairs], [p[-1] for p in pairs]
        try:
            starts, ends = [int(x) for x in starts], [int(x) for x in ends]
        except ValueError:
            raise DataFormatError(path, None, f"{where}: span_position must hold 'start;end' strings") from None
    ok = isinstance(starts, list) and isinstance(ends, list) and len(starts) == len(ends)
    if not ok or not all(isinstance(x, int) for x in [*starts, *ends]):
        raise DataFormatError(path, None, f"{where}: start_position/end_position must be integer lists of "
                                          f"equal length, got {starts!r} and {ends!r}")
    return list(zip(starts, ends))


# ------------------------------------------------------------------------------------------------ hub datasets
def hub_tag_names(features) -> list[str]:
    """ClassLabel names of a ``datasets`` feature dict's ``ner_tags`` column, in id order."""
    return list(features["ner_tags"].feature.names)


def hub_row_to_sentence(row: dict, tag_names: list[str], type_map: dict[str, str] | None = None,
                        sid: str = "") -> Sentence:
    """One hub row {tokens, ner_tags (int ids, IOB2)} -> Sentence, types renamed through ``type_map``."""
    tags = [tag_names[i] for i in row["ner_tags"]]
    spans = tags_to_spans(tags, scheme="iob2")
    type_map = type_map or {}
    return _make_sentence(list(row["tokens"]), [(type_map.get(t, t), s, e) for t, s, e in spans], sid)


def _load_hub_sentences(name: str, split: str) -> list[Sentence]:
    from datasets import load_dataset  # heavy import, only for users with internet
    repo, config = HUB_IDS[name]
    hub_split = "validation" if split == "dev" else split
    try:
        ds = load_dataset(repo, config, split=hub_split)
    except Exception:  # script-based repos need the auto-converted parquet branch on recent `datasets`
        ds = load_dataset(repo, config, split=hub_split, revision="refs/convert/parquet")
    names = hub_tag_names(ds.features)
    type_map = CONLL_ABBREVIATIONS if name == "conll2003" else None
    return [hub_row_to_sentence(row, names, type_map, f"{name}/{split}:{i}") for i, row in enumerate(ds)]


# ------------------------------------------------------------------------------------------------ registry
def default_data_dir() -> Path:
    """$NER_DATA_DIR, else <repo root>/../shared/data (repo root = parent of the ``ner`` package)."""
    env = os.environ.get("NER_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "data"


@functools.lru_cache(maxsize=64)
def _cached_read(path: str, mtime_ns: int, size: int, reader: str) -> tuple[Sentence, ...]:
    fn = {"column": read_column_file, "jsonl": read_jsonl, "mrc": read_mrc_json}[reader]
    return tuple(fn(path))


def read_any(path: str | os.PathLike) -> list[Sentence]:
    """Read by extension (.jsonl, .json = MRC, anything else = column file), cached on (path, mtime, size).

    The Sentence objects are shared between calls (prompts re-read the train split for few-shot examples):
    treat them as read-only.
    """
    p = Path(path).resolve()
    st = p.stat()
    reader = {".jsonl": "jsonl", ".json": "mrc"}.get(p.suffix.lower(), "column")
    return list(_cached_read(str(p), st.st_mtime_ns, st.st_size, reader))


def conll_descriptions(data_dir: Path) -> dict[str, str]:
    """CoNLL type descriptions from the MRC-NER ``conll2003/queries.json`` (ORG/PER/LOC/MISC keys)."""
    qfile = data_dir / "conll2003" / "queries.json"
    if not qfile.is_file():
        return dict(CONLL_FALLBACK)
    try:
        queries = json.loads(_read_text(qfile))["default"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataFormatError(qfile, None, f"expected {{'default': {{'ORG': ...}}}} ({err})") from None
    return {CONLL_ABBREVIATIONS[k]: v.strip() for k, v in queries.items() if k in CONLL_ABBREVIATIONS}


def data_file(name: str, split: str) -> Path | None:
    """The file ``load_ner_dataset(name, split)`` reads when ``name`` is a path: the file itself, or a folder's
    ``<split>.<ext>`` file (dev may be named dev, validation or valid). None for anything else."""
    path = Path(name)
    if name in REGISTRY or not path.is_dir():
        return path if name not in REGISTRY and path.is_file() else None
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    stems = SPLIT_FILE_STEMS[SPLITS[split]]
    found = sorted(p for p in path.iterdir() if p.is_file() and p.stem.lower() in stems)
    if len(found) != 1:
        have = ", ".join(sorted(p.name for p in path.iterdir() if p.is_file())) or "no files"
        problem = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
        raise FileNotFoundError(f"{path}: {problem} for split {split!r}; a data folder holds one file per split "
                                f"named {' or '.join(f'{s}.<ext>' for s in stems)} (it has: {have})")
    return found[0]


def user_type_descriptions(types: list[str], data_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Descriptions of a user file's types: CoNLL-2003's own for its four type names (what a model tuned on
    CoNLL saw in its prompts), else ``ner.descriptions.describe``."""
    conll = conll_descriptions(Path(data_dir) if data_dir else default_data_dir())
    return {t: conll.get(t) or describe(t) for t in types}


def load_ner_dataset(name: str, split: str, data_dir: str | None = None, source: str = "local") -> NERDataset:
    """A registered data set (``conll2003``, ``crossner_<domain>``), a path to a data file (the file is the split,
    whatever ``split`` says), or a folder of split files (``data_file``).

    ``source="hub"`` downloads the registered set with ``datasets`` instead of reading ``data_dir``.
    Types are sorted; every type has a description (generic fallback for types nobody described).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    split = SPLITS[split]
    root = Path(data_dir) if data_dir else default_data_dir()
    if name not in REGISTRY:
        path = data_file(name, split)
        if path is not None:
            sentences = read_any(path)
            types = sorted({e.type for s in sentences for e in s.entities})
            return NERDataset(name, split, sentences, types, user_type_descriptions(types, root))
        raise ValueError(f"unknown data set {name!r} (and no such file or folder); known: {sorted(REGISTRY)}")
    if source == "hub":
        sentences = _load_hub_sentences(name, split)
    elif source == "local":
        path = root / REGISTRY[name] / f"{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass data_dir or set NER_DATA_DIR")
        sentences = read_any(path)
    else:
        raise ValueError(f"unknown source {source!r}; expected 'local' or 'hub'")
    declared = CONLL_TYPES if name == "conll2003" else CROSSNER_TYPES[name.removeprefix("crossner_")]
    types = sorted(set(declared) | {e.type for s in sentences for e in s.entities})
    if name == "conll2003":
        known = conll_descriptions(root)
        descriptions = {t: known.get(t) or describe(t) for t in types}
    else:
        descriptions = {t: describe(t, name.removeprefix("crossner_")) for t in types}
    return NERDataset(name, split, sentences, types, descriptions)


def select_sentences(sentences: list[Sentence], offset: int = 0, limit: int = 0, seed: int = -1) -> list[Sentence]:
    """``sentences[offset : offset + limit]`` (``limit`` 0 = to the end) of the split in file order (``seed`` −1)
    or of one fixed shuffle of it (``seed`` ≥ 0).

    CoNLL-2003 train runs story by story, so its first 600 sentences come from a few dozen stories; a shuffle spreads
    any slice over the whole split. Two stages that take disjoint ranges under the same seed (CoT tuning
    ``[0, 1200)``, GRPO ``[4000, 6000)``) never share a sentence.
    """
    order = list(sentences)
    if seed >= 0:
        random.Random(seed).shuffle(order)
    return order[offset:offset + limit if limit else None]
