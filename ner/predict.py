"""The library behind predict.py: read raw text, build the model's training prompt for it, generate, parse, and
ground each predicted entity in the original text (ner/grounding.py).

The prompt comes from the checkpoint's ``prompt_recipe.json`` (ner/recipe.py) when it has one; every part of it can
be overridden (labels, prompt format, k_shot, max_new_tokens). Without a recipe the defaults are the CoNLL-2003
label set, the all-types ``json`` format, zero-shot. Model output never raises: an unparseable answer gives no
entities, ``format_ok: false`` and its parser errors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from grpo.errors import UserError
from ner.grounding import bio_tags, ground_entities, tokenize
from ner.prompts import FORMATS, group_key
from ner.recipe import build_recipe, default_stop, read_recipe, recipe_records
from ner.schema import LabelSet, resolve_labels

DEFAULT_LABELS, DEFAULT_FORMAT, DEFAULT_MAX_NEW_TOKENS = "conll2003", "json", 256


class PredictInputError(UserError):
    """Unusable input text or options; the message names the file and line where there is one."""


def read_inputs(text: str = "", path: str = "", stdin=None) -> list[dict]:
    """Sentences to tag: ``{"text", "line"?, "id"?}`` each. ``text`` (one sentence), else ``path`` (``.jsonl``:
    one object with a string ``text`` per line, ``id`` kept; anything else: one sentence per line; ``-``: stdin),
    else ``stdin``. Blank lines are skipped."""
    if text:
        return [{"text": text}]
    if path and path != "-":
        file = Path(path)
        if not file.is_file():
            raise PredictInputError(f"{path}: input file not found")
        try:
            lines = file.read_text(encoding="utf-8").removeprefix("\ufeff").splitlines()
        except UnicodeDecodeError as err:
            raise PredictInputError(f"{path}: not UTF-8 text (byte {err.start})") from None
        name = path
    else:
        if stdin is None or stdin.isatty():
            raise PredictInputError("no text: give a sentence, --input FILE (.txt or .jsonl) or pipe text to stdin")
        lines, name = stdin.read().splitlines(), "<stdin>"
    rows = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if name.lower().endswith(".jsonl"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise PredictInputError(f"{name}, line {n}: invalid JSON ({err.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise PredictInputError(f"{name}, line {n}: expected an object with a string \"text\" field")
            row = {"text": obj["text"], "line": n}
            if "id" in obj:
                row["id"] = obj["id"]
        else:
            row = {"text": line, "line": n}
        if not tokenize(row["text"]):
            raise PredictInputError(f"{name}, line {n}: empty text")
        rows.append(row)
    if not rows:
        raise PredictInputError(f"{name}: no sentences in it")
    return rows


def prompt_setup(model: str, labels: str = "", prompt_format: str = "", k_shot: int = -1,
                 max_new_tokens: int = 0, data_dir: str | None = None) -> tuple[dict, list[str]]:
    """The recipe predict prompts with (the checkpoint's, with the given overrides), and notes saying where each
    part came from. Empty / negative / zero arguments mean "the recipe's, else the default"."""
    stored = read_recipe(model)
    recipe, notes = (dict(stored[0]), [f"prompt recipe: {stored[1]}"]) if stored else (None, [])
    if prompt_format and prompt_format not in FORMATS:
        raise PredictInputError(f"--prompt_format {prompt_format!r}: expected one of {FORMATS}")
    if recipe is not None and not labels and prompt_format in ("", recipe["format"]):
        if k_shot > recipe["k_shot"]:
            raise PredictInputError(f"--k_shot {k_shot}: the recipe stores {recipe['k_shot']} examples per prompt")
        notes.append(f"labels: {', '.join(recipe['types'])} (from the recipe); format {recipe['format']}")
    else:  # another label set or format: a new recipe, keeping what still applies of the stored one
        if labels:
            label_set = resolve_labels(labels, data_dir)
        elif recipe is not None:
            label_set = LabelSet(list(recipe["types"]), dict(recipe["descriptions"]), "the recipe")
        else:
            label_set = resolve_labels(DEFAULT_LABELS, data_dir)
        fmt = prompt_format or (recipe["format"] if recipe else DEFAULT_FORMAT)
        pool = _fewshot_pool(label_set.source, data_dir, k_shot) if k_shot > 0 else None
        recipe = build_recipe(fmt, label_set.types, label_set.descriptions, k_shot=max(k_shot, 0),
                              fewshot_pool=pool, stop=default_stop(fmt),
                              max_new_tokens=recipe["max_new_tokens"] if recipe else DEFAULT_MAX_NEW_TOKENS)
        notes.append(f"labels: {', '.join(label_set.types)} (from {label_set.source}); format {fmt}")
    if k_shot >= 0:
        recipe["k_shot"] = k_shot
    if max_new_tokens > 0:
        recipe["max_new_tokens"] = max_new_tokens
    recipe.setdefault("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    return recipe, notes


def _fewshot_pool(source: str, data_dir: str | None, k_shot: int):
    from ner.data import REGISTRY, load_ner_dataset

    if source not in REGISTRY:
        raise PredictInputError(f"--k_shot {k_shot} needs examples: use a registered data set as --labels (its "
                                f"train split gives them) or a checkpoint whose recipe stores them")
    return load_ner_dataset(source, "train", data_dir)


def predict_sentences(engine, tokenizer, recipe: dict, inputs: list[dict], batch_size: int = 16,
                      occurrences: str = "first", show_reasoning: bool = False, progress: bool = True,
                      guided_json: bool = False) -> list[dict]:
    """One output row per input: ``text`` (and ``id``/``line`` when given), ``entities`` (text, type, start, end:
    character offsets into ``text``), ``ungrounded``, ``format_ok``, ``errors``, and ``reasoning`` on request.
    ``guided_json``: json answers are written with ner.json_guide's keys and closing braces (a torch engine)."""
    from ner.evaluation import generate_completions
    from ner.json_guide import JsonAnswerGuide
    from ner.parsing import parse_completion

    tokens = [tokenize(row["text"]) for row in inputs]
    records = recipe_records(recipe, [[t.text for t in toks] for toks in tokens])
    guide = (JsonAnswerGuide(tokenizer, [r["types"] for r in records])
             if guided_json and recipe["format"] == "json" else None)
    completions = generate_completions(engine, tokenizer, records, recipe["max_new_tokens"],
                                       stop=recipe["stop"] or None, batch_size=batch_size, progress=progress,
                                       guide=guide)
    per_sentence = len(records) // max(len(inputs), 1)  # build_prompts keeps sentence order, a fixed count each
    out = []
    for i, row in enumerate(inputs):
        mine = range(i * per_sentence, (i + 1) * per_sentence)
        pred: dict[str, list[str]] = {}
        result = {k: row[k] for k in ("id", "line") if k in row}
        result.update(text=row["text"], format_ok=True, errors=[])
        reasoning = []
        for j in mine:
            parsed = parse_completion(completions[j], records[j]["format"], records[j]["types"])
            pred.update(parsed.entities or {})
            result["format_ok"] = result["format_ok"] and parsed.format_ok
            result["errors"] += [f"{group_key(records[j]['types'])}: {e}" for e in parsed.errors]
            reasoning.append({"types": records[j]["types"], "think": parsed.think, "completion": completions[j]})
        entities, result["ungrounded"] = ground_entities(row["text"], tokens[i], pred, recipe["types"], occurrences)
        result["entities"] = entities
        result["_tokens"] = tokens[i]  # for write_bio; writers leave "_" keys out
        if show_reasoning:
            result["reasoning"] = reasoning
        out.append(result)
    return out


def write_jsonl(rows: list[dict], stream) -> None:
    for row in rows:
        ents = [{k: e[k] for k in ("text", "type", "start", "end")} for e in row["entities"]]
        shown = {k: v for k, v in row.items() if not k.startswith("_")}
        stream.write(json.dumps({**shown, "entities": ents}, ensure_ascii=False) + "\n")


def write_bio(rows: list[dict], stream) -> None:
    """CoNLL columns: ``token<TAB>tag`` per line, a blank line after each sentence."""
    for row in rows:
        for token, tag in zip(row["_tokens"], bio_tags(len(row["_tokens"]), row["entities"])):
            stream.write(f"{token.text}\t{tag}\n")
        stream.write("\n")


def note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
