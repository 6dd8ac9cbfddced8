"""The prompt recipe stored beside a checkpoint's weights (``prompt_recipe.json``), so the exact prompt a model was
trained on can be rebuilt from the checkpoint folder alone, by predict.py, evaluate.py or anyone outside the project.

A recipe is a JSON object:
  recipe_version    1
  format            "tagged" | "json" (ner/prompts.py)
  types             the asked entity types, in prompt order
  descriptions      {type: the description the prompt shows}
  system_prompt     the system message text
  k_shot, prompt_seed
  fewshot_examples  {group: [{"tokens": [...], "entities": [{"type", "start", "end"}]}]}: ``k_shot`` examples per
                    prompt group (group = the type for tagged, all types joined by "|" for json). Training drew a
                    fresh draw per sentence from the train split; the recipe keeps one draw made by the same
                    sampler (``ner.prompts.pick_fewshot``), which predict shows with every input.
  stop              stop strings generation should end on (also in generation_config.json as ``stop_strings``);
                    [] when the format has none (json answers end with the model's EOS token)
  max_new_tokens    a generation budget that fits the trained answers
  source            {"stage", "dataset", "split"}: where the recipe came from
  example_messages  the chat messages of one sentence rendered by this recipe: the layout, for readers
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from grpo.errors import UserError
from ner.prompts import FORMATS, build_prompts, pick_fewshot
from ner.types import Entity, NERDataset, Sentence

RECIPE_FILE = "prompt_recipe.json"
RECIPE_VERSION = 1
_REQUIRED = {"format": str, "types": list, "descriptions": dict, "k_shot": int, "stop": list}
EXAMPLE_TOKENS = "EU rejects German call to boycott British lamb .".split()


class RecipeError(UserError):
    """A prompt_recipe.json that cannot be used; the message names the file and the problem."""


def _sentence_to_json(s: Sentence) -> dict:
    return {"tokens": list(s.tokens), "entities": [{"type": e.type, "start": e.start, "end": e.end}
                                                   for e in s.entities]}


def _sentence_from_json(obj: dict) -> Sentence:
    tokens = list(obj["tokens"])
    return Sentence(tokens, [Entity(e["type"], e["start"], e["end"], " ".join(tokens[e["start"]:e["end"]]))
                             for e in obj["entities"]])


def fixed_examples(recipe: dict) -> dict[str, list[Sentence]]:
    return {key: [_sentence_from_json(s) for s in examples]
            for key, examples in recipe.get("fewshot_examples", {}).items()}


def recipe_records(recipe: dict, token_lists: list[list[str]], k_shot: int | None = None) -> list[dict]:
    """Prompt records (ner.prompts layout) asking ``recipe``'s types about each token list, with its few-shot
    examples and system prompt. ``k_shot`` (default: the recipe's) may be lower than the recipe's."""
    k_shot = recipe["k_shot"] if k_shot is None else k_shot
    data = NERDataset("input", "test", [Sentence(list(t), id=f"input/{i}") for i, t in enumerate(token_lists)],
                      list(recipe["types"]), dict(recipe["descriptions"]))
    records = build_prompts(data, recipe["format"], k_shot=k_shot,
                            fixed_examples=fixed_examples(recipe) if k_shot else None)
    if recipe.get("system_prompt"):  # a checkpoint trained with another system text keeps its own
        for r in records:
            r["messages"][0] = {"role": "system", "content": recipe["system_prompt"]}
    return records


def build_recipe(fmt: str, types: list[str], descriptions: dict[str, str], *, k_shot: int = 0,
                 prompt_seed: int = 0, fewshot_pool: NERDataset | None = None, stop: list[str] | None = None,
                 max_new_tokens: int = 256, source: dict | None = None) -> dict:
    """A recipe (see the module docstring); ``fewshot_pool`` is required when ``k_shot > 0``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; expected one of {FORMATS}")
    if k_shot and fewshot_pool is None:
        raise ValueError(f"k_shot={k_shot} needs the few-shot pool (the train split) to store examples from")
    picks = pick_fewshot(fewshot_pool, fmt, types, k_shot, prompt_seed) if k_shot else {}
    recipe = {"recipe_version": RECIPE_VERSION, "format": fmt, "types": list(types),
              "descriptions": {t: descriptions[t] for t in types}, "system_prompt": None,
              "k_shot": k_shot, "prompt_seed": prompt_seed,
              "fewshot_examples": {key: [_sentence_to_json(s) for s in examples] for key, examples in picks.items()},
              "stop": list(stop or []), "max_new_tokens": max_new_tokens, "source": source or {}}
    example = recipe_records(recipe, [EXAMPLE_TOKENS])[0]
    recipe["system_prompt"] = example["messages"][0]["content"]
    recipe["example_messages"] = example["messages"]
    return recipe


def default_stop(fmt: str, extra: list[str] | None = None) -> list[str]:
    """The stop strings evaluation uses for ``fmt`` (ner.evaluation.STOP), or ``extra`` when a run set its own."""
    from ner.evaluation import STOP

    return list(extra) if extra else list(STOP[fmt] or [])


def _descriptions_from_records(records: list[dict]) -> dict[str, str]:
    """Read the type descriptions back out of CoT records' user messages (SFT on a CoT file without its data set
    name). The two layouts are ner.prompts': "Entity type: T. Definition: D" and "- T: D" lines."""
    found: dict[str, str] = {}
    for r in records:
        head = r["messages"][-1]["content"].split("\n\n")[0]
        for t in r["types"]:
            for prefix in (f"Entity type: {t}. Definition: ", f"- {t}: "):
                for line in head.split("\n"):
                    if line.startswith(prefix) and t not in found:
                        found[t] = line[len(prefix):]
    return found


def training_prompt_matches(recipe: dict, record: dict) -> bool:
    """Does the recipe rebuild this zero-shot training record's messages exactly? (few-shot draws differ per
    sentence, so only the zero-shot layout can be compared whole)"""
    rebuilt = recipe_records(recipe, [record["sentence"].split(" ")], k_shot=0)
    return any(r["messages"] == record["messages"] for r in rebuilt if r["types"] == record["types"])


def recipe_for_training(fmt: str, dataset: str, split: str, data_dir: str | None, k_shot: int, prompt_seed: int,
                        stop: list[str], max_new_tokens: int, stage: str,
                        records: list[dict] | None = None) -> dict:
    """The recipe of a training run: from its data set (types, descriptions, few-shot pool = train split), or,
    when ``dataset`` is empty (SFT on an existing CoT file), from the CoT ``records`` themselves. Warns on stderr
    when the recipe does not rebuild the first zero-shot training prompt (a mixture's cannot: each of its prompts
    asks one member's types, the recipe all of them; evaluate.py scores a registered data set by its own types)."""
    from ner.data import load_ner_dataset
    from ner.mixture import load_mixture, mixture_schema

    members = load_mixture(dataset, split, data_dir, limit=1) if dataset else []
    mixture = len(members) > 1
    if dataset:  # a mixture's recipe asks every member's types (each described as its first member does)
        types, descriptions = mixture_schema(members)
    else:
        fmt = records[0]["format"] if records else fmt  # the CoT file's own format is what the model saw
        types = list(dict.fromkeys(t for r in records or [] for t in r["types"]))
        descriptions = _descriptions_from_records(records or [])
        descriptions = {t: descriptions.get(t, "") for t in types}
    pool = load_ner_dataset(dataset, "train", data_dir) if k_shot and dataset and not mixture else None
    recipe = build_recipe(fmt, types, descriptions, k_shot=k_shot if pool is not None else 0,
                          prompt_seed=prompt_seed, fewshot_pool=pool, stop=stop, max_new_tokens=max_new_tokens,
                          source={"stage": stage, "dataset": dataset, "split": split})
    if k_shot and pool is None:
        print(f"prompt recipe: k_shot={k_shot} but no single data set to draw stored examples from; the recipe "
              f"is zero-shot", file=sys.stderr)
    if records and k_shot == 0 and not mixture and not training_prompt_matches(recipe, records[0]):
        print("prompt recipe: WARNING the stored recipe does not rebuild the first training prompt exactly",
              file=sys.stderr)
    return recipe


def recipe_files(recipe: dict) -> dict[str, str]:
    """{file name: text} for ``grpo.checkpoint.save_checkpoint(extra_files=...)``."""
    return {RECIPE_FILE: json.dumps(recipe, indent=2, ensure_ascii=False) + "\n"}


def set_stop_strings(model, recipe: dict) -> None:
    """Put the recipe's stop strings into the model's generation config, so every saved generation_config.json
    carries them (``stop_strings``, read by transformers' generate when it is given the tokenizer)."""
    if recipe["stop"] and getattr(model, "generation_config", None) is not None:
        model.generation_config.stop_strings = list(recipe["stop"])


def evaluation_settings(model_spec: str, fmt: str, k_shot: int) -> tuple[str, int, list[str] | None,
                                                                     dict[str, str] | None, str]:
    """(format, k_shot, stop, descriptions, a note) for evaluating ``model_spec``: an empty ``fmt`` / negative
    ``k_shot`` takes the checkpoint recipe's (else tagged / 2). When the format is the recipe's, its stop strings
    and type descriptions apply too (None: the data set's own)."""
    stored = read_recipe(model_spec)
    if stored is None:
        fmt, k_shot = fmt or "tagged", 2 if k_shot < 0 else k_shot
        return fmt, k_shot, None, None, f"format {fmt}, k_shot {k_shot} (the model has no {RECIPE_FILE})"
    recipe, path = stored
    given = [name for name, value in (("format", fmt), ("k_shot", k_shot >= 0)) if value]
    fmt, k_shot = fmt or recipe["format"], recipe["k_shot"] if k_shot < 0 else k_shot
    same = fmt == recipe["format"]
    note = (f"format {fmt}, k_shot {k_shot} from {path}" + (f" ({' and '.join(given)} given)" if given else ""))
    return fmt, k_shot, (recipe["stop"] or None) if same else None, recipe["descriptions"] if same else None, note


def read_recipe(model_spec: str) -> tuple[dict, Path] | None:
    """(recipe, its path) of a model spec that resolves to a folder holding ``prompt_recipe.json``, else None."""
    from grpo.models import resolve_model_path

    folder = Path(resolve_model_path(model_spec))
    path = folder / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(recipe, dict):
        raise RecipeError(f"{path}: expected a JSON object")
    for key, kind in _REQUIRED.items():
        if not isinstance(recipe.get(key), kind):
            raise RecipeError(f"{path}: field {key!r} must be a {kind.__name__}, got {recipe.get(key)!r}")
    if recipe["format"] not in FORMATS:
        raise RecipeError(f"{path}: format {recipe['format']!r} is not one of {FORMATS}")
    missing = [t for t in recipe["types"] if not isinstance(recipe["descriptions"].get(t), str)]
    if missing:
        raise RecipeError(f"{path}: types {missing} have no description")
    return recipe, path
