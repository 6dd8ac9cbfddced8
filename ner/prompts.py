"""Prompt records for the two NER answer formats.

``tagged`` (the blog "Reinforcement Learning meets NER"): one prompt per (sentence, entity type); the answer is
    <think>reasoning</think> <entity>A, B</entity>          (no entity: <entity></entity>)
  Entity texts are joined with ", ", so a text that itself contains ", " cannot be told apart from two texts
  ("Washington , D.C." reads back as "Washington" and "D.C."). It hits 115 of the 66,182 entities in
  /work/shared/data (0.17%); we keep the blog's format and accept that ambiguity. Because the list carries no
  counts either, a tagged record's gold is de-duplicated (the format cannot say "Japan" twice).
``json`` (ReasoningNER): one prompt per sentence asking for every type at once; the answer is
    <think>reasoning</think>
    {"entities": {"person": ["A"], "location": []}}
  with every asked type as a key. Duplicate texts are kept: the JSON list can express them.

A record is a plain dict, because the trainer is task-agnostic and only hands records to reward callables:
  {"messages": [system, user], "target": answer without think, "gold": {type: [texts]}, "types": [asked types],
   "format": fmt, "sentence_id": str, "sentence": str}
The caller renders ``messages`` with the tokenizer's chat template (``render_prompt``). Prompts are kept short
on purpose: SmolLM2 has a small context and CPU generation is slow.
"""
from __future__ import annotations

import json
import random

from ner.rationale import candidate_rationale
from ner.types import NERDataset, Sentence

FORMATS = ("tagged", "json")

_SYSTEM = {
    "tagged": ("You are an expert at named entity recognition. Reason briefly inside <think></think>, then "
               "list the entities of the asked type inside <entity></entity>, separated by \", \". "
               "Write <entity></entity> when there are none."),
    "json": ("You are an expert at named entity recognition. Reason briefly inside <think></think>, then "
             "answer with one JSON object {\"entities\": {type: [entity texts]}} that has every listed type "
             "as a key (an empty list when there are none)."),
}

def _dedupe(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(texts))


def format_target(gold: dict[str, list[str]], fmt: str, types: list[str]) -> str:
    """The answer block alone (no think): ``<entity>A, B</entity>`` or the JSON object."""
    _check_format(fmt)
    if fmt == "tagged":
        if len(types) != 1:
            raise ValueError(f"the tagged format asks for exactly one type per prompt, got {types}")
        return "<entity>" + ", ".join(_dedupe(gold.get(types[0], []))) + "</entity>"
    return json.dumps({"entities": {t: list(gold.get(t, [])) for t in types}}, ensure_ascii=False)


def format_answer(gold: dict[str, list[str]], fmt: str, types: list[str], think: str = "") -> str:
    """A full answer: think block, separator (a space for tagged, a newline for json), answer block."""
    sep = " " if fmt == "tagged" else "\n"
    return f"<think>{think}</think>{sep}{format_target(gold, fmt, types)}"


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; expected one of {FORMATS}")


# Few-shot examples longer than this (in tokens) are used only when no shorter one holds the type: a CoNLL
# sentence averages 14 tokens, and long examples would double the prompt for little extra signal.
FEWSHOT_MAX_TOKENS = 32


class _FewShotSampler:
    """Deterministic few-shot picks from a pool, preferring short sentences that hold an entity of the asked
    types, then longer ones that hold one, then any sentence.

    Picks depend only on (seed, sentence_id, key), never on call order, so a record is reproducible alone.
    Indices of candidates are precomputed once per key because pools are large (14k CoNLL train sentences).
    """

    def __init__(self, pool: NERDataset, seed: int, max_tokens: int = FEWSHOT_MAX_TOKENS):
        self.pool = pool
        self.seed = seed
        self.max_tokens = max_tokens
        self._with_type: dict[str, list[int]] = {}
        for i, s in enumerate(pool.sentences):
            for t in {e.type for e in s.entities}:
                self._with_type.setdefault(t, []).append(i)
        self._cache: dict[tuple[str, ...], list[list[int]]] = {}

    def _tiers(self, types: list[str]) -> list[list[int]]:
        """Candidate lists in order of preference: short holders of a type, any holder, any sentence."""
        key = tuple(types)
        if key not in self._cache:
            holders = sorted({i for t in types for i in self._with_type.get(t, [])})
            short = [i for i in holders if len(self.pool.sentences[i].tokens) <= self.max_tokens]
            self._cache[key] = [short, holders, list(range(len(self.pool.sentences)))]
        return self._cache[key]

    def pick(self, k: int, sentence: Sentence, sentence_id: str, types: list[str]) -> list[Sentence]:
        # str seeds are hashed with sha512 by `random`, so this is stable across processes and PYTHONHASHSEED.
        rng = random.Random(f"{self.seed}|{sentence_id}|{'|'.join(types)}")
        chosen: list[int] = []

        def usable(i: int) -> bool:
            other = self.pool.sentences[i]
            # Never show the sentence itself, nor a duplicate of its text (CoNLL repeats texts across splits).
            same = (sentence.id and other.id == sentence.id) or other.tokens == sentence.tokens
            return i not in chosen and not same

        for candidates in self._tiers(types):
            n = len(candidates)
            tries = 0
            while len(chosen) < k and tries < 8 * k + 16 and n:
                tries += 1
                i = candidates[rng.randrange(n)]
                if usable(i):
                    chosen.append(i)
            # Rejection sampling can miss in tiny pools; finish with a deterministic scan.
            for i in candidates:
                if len(chosen) >= k:
                    break
                if usable(i):
                    chosen.append(i)
        return [self.pool.sentences[i] for i in chosen]


def _describe_types(dataset: NERDataset, types: list[str]) -> str:
    return "\n".join(f"- {t}: {dataset.descriptions.get(t, t + ' entities')}" for t in types)


def _user_message(dataset: NERDataset, fmt: str, types: list[str], sentence: Sentence,
                  examples: list[Sentence]) -> str:
    if fmt == "tagged":
        t = types[0]
        head = f"Entity type: {t}. Definition: {dataset.descriptions.get(t, t + ' entities')}"
    else:
        head = "Entity types:\n" + _describe_types(dataset, types)
    parts = [head]
    for ex in examples:
        answer = format_answer(ex.gold(types), fmt, types, candidate_rationale(ex, types))
        parts.append(f"Example sentence: {ex.text}\nExample answer: {answer}")
    parts.append(f"Sentence: {sentence.text}")
    return "\n\n".join(parts)


def build_prompts(dataset: NERDataset, fmt: str, k_shot: int = 2, seed: int = 0,
                  fewshot_pool: NERDataset | None = None, types: list[str] | None = None,
                  fixed_examples: dict[str, list[Sentence]] | None = None) -> list[dict]:
    """One record per (sentence, type) for ``tagged``, one per sentence for ``json``; see the module docstring.

    ``fewshot_pool`` (normally the train split) is required when ``k_shot > 0``. ``types`` defaults to the
    dataset's schema and must be a subset of it. ``fixed_examples`` (``pick_fewshot``'s output, keyed by
    ``group_key``) replaces the per-sentence draw: every sentence then shows the same examples (predict.py).
    """
    _check_format(fmt)
    types = list(dataset.types if types is None else types)
    unknown = [t for t in types if t not in dataset.types]
    if unknown:
        raise ValueError(f"types {unknown} are not in the schema of {dataset.name}/{dataset.split}: "
                         f"{dataset.types}")
    if k_shot < 0:
        raise ValueError(f"k_shot must be >= 0, got {k_shot}")
    if k_shot > 0 and fewshot_pool is None and fixed_examples is None:
        raise ValueError(f"k_shot={k_shot} needs a fewshot_pool (normally the train split)")
    sampler = _FewShotSampler(fewshot_pool, seed) if k_shot > 0 and fixed_examples is None else None
    groups = prompt_groups(fmt, types)

    records = []
    for index, sentence in enumerate(dataset.sentences):
        sentence_id = sentence.id or f"{dataset.name}/{dataset.split}/{index}"
        full_gold = sentence.gold(types)
        for asked in groups:
            gold = {t: (_dedupe if fmt == "tagged" else list)(full_gold.get(t, [])) for t in asked}
            if fixed_examples is not None:
                examples = fixed_examples[group_key(asked)][:k_shot]
            else:
                examples = sampler.pick(k_shot, sentence, sentence_id, asked) if sampler else []
            records.append({
                "messages": [{"role": "system", "content": _SYSTEM[fmt]},
                             {"role": "user", "content": _user_message(dataset, fmt, asked, sentence, examples)}],
                "target": format_target(gold, fmt, asked),
                "gold": gold,
                "types": list(asked),
                "format": fmt,
                "sentence_id": sentence_id,
                "sentence": sentence.text,
            })
    return records


def group_key(types: list[str]) -> str:
    """Name of one prompt's asked types: the type itself (tagged) or all of them joined by "|" (json)."""
    return "|".join(types)


def prompt_groups(fmt: str, types: list[str]) -> list[list[str]]:
    """The asked types of each prompt of one sentence: one type per prompt (tagged), all at once (json)."""
    _check_format(fmt)
    return [[t] for t in types] if fmt == "tagged" else [list(types)]


def pick_fewshot(pool: NERDataset, fmt: str, types: list[str], k_shot: int, seed: int = 0,
                 sentence_id: str = "prompt_recipe") -> dict[str, list[Sentence]]:
    """``k_shot`` examples per prompt group (keyed by ``group_key``), drawn from ``pool`` exactly as
    ``build_prompts`` draws them for a sentence with id ``sentence_id``: a fixed set to store with a model."""
    sampler = _FewShotSampler(pool, seed)
    placeholder = Sentence(tokens=[], id=sentence_id)
    return {group_key(g): sampler.pick(k_shot, placeholder, sentence_id, g) for g in prompt_groups(fmt, types)}


def limit_empty_answers(records: list[dict], max_ratio: float, seed: int = 0) -> list[dict]:
    """Keep at most ``max_ratio`` × (records with an entity) records whose gold answer is empty; order kept.

    Works on prompt records (``build_prompts``) and CoT records alike: both carry ``gold``. Why: in the tagged
    format (one prompt per type) about two thirds of CoNLL prompts have no entity, and a small model trained on
    that mix, by SFT or by GRPO, learns to answer "none" to everything. ``max_ratio < 0`` keeps everything.
    """
    if max_ratio < 0:
        return list(records)
    empty = [i for i, r in enumerate(records) if not any(r["gold"].values())]
    n_keep = int(max_ratio * (len(records) - len(empty)))
    if n_keep >= len(empty):
        return list(records)
    dropped = set(empty) - set(random.Random(seed).sample(empty, n_keep))
    return [r for i, r in enumerate(records) if i not in dropped]


def render_prompt(tokenizer, record: dict) -> str:
    """The prompt text the policy continues: the chat template with the assistant turn opened."""
    return tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=False)
