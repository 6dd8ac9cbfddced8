"""Training on several data sets at once: ReasoningNER's type-diverse mix, ``dataset: conll2003,crossner_ai,…``.

Each sentence keeps its own data set's label set and type descriptions, so its all-types prompt asks exactly that
data set's types, defined as that data set defines them (CrossNER politics' `person` is not a politician). The
prompts of every member go into one list, which the trainers shuffle (GRPO per epoch, SFT per step).
``offset``, ``limit`` and ``sentence_seed`` select within each member: CrossNER's train splits hold 100–200
sentences and CoNLL-2003's 14,041, so one ``limit`` of 200 takes all of each small split and a slice of the
large one.
"""
from __future__ import annotations

from dataclasses import replace

from ner.crossner_table import expand_dataset_groups
from ner.data import select_sentences
from ner.prompts import build_prompts
from ner.types import NERDataset, Sentence
from ner.user_data import load_user_dataset


def mixture_names(spec: str) -> list[str]:
    """The data sets of a training ``dataset`` field: one name or path, or several joined by commas; a group name
    (``crossner``) stands for its members."""
    names = expand_dataset_groups([n.strip() for n in spec.split(",") if n.strip()])
    if not names:
        raise ValueError(f"dataset {spec!r} names no data set")
    return names


def load_mixture(spec: str, split: str, data_dir: str | None = None, label_map: dict[str, str] | None = None,
                 offset: int = 0, limit: int = 0, sentence_seed: int = -1) -> list[NERDataset]:
    """Each member of ``spec`` with its selected sentences (``ner.data.select_sentences`` per member). In a mixture
    a sentence id is prefixed with its data set's name: file-local ids (``train.txt:12``) repeat across members."""
    names = mixture_names(spec)
    members = []
    for name in names:
        data = load_user_dataset(name, split, data_dir, label_map)
        data.sentences = select_sentences(data.sentences, offset, limit, sentence_seed)
        if len(names) > 1:
            data.sentences = [replace(s, id=f"{name}/{s.id or i}") for i, s in enumerate(data.sentences)]
        members.append(data)
    return members


def mixture_prompts(members: list[NERDataset], fmt: str, k_shot: int = 0, prompt_seed: int = 0,
                    data_dir: str | None = None, label_map: dict[str, str] | None = None, fewshot_data: str = ""
                    ) -> tuple[list[dict], dict[str, Sentence]]:
    """(prompt records of every member, in member order; {sentence_id: sentence}). Few-shot examples come from
    each member's own train split (or all from ``fewshot_data``), so an example shows the types its prompt asks."""
    records, by_id = [], {}
    for data in members:
        pool = (load_user_dataset(fewshot_data or data.name, "train", data_dir, label_map, require_keys=False)
                if k_shot else None)
        member_records = build_prompts(data, fmt, k_shot=k_shot, seed=prompt_seed, fewshot_pool=pool)
        records += member_records
        firsts = list(dict.fromkeys(r["sentence_id"] for r in member_records))  # tagged: a record per type
        by_id.update(zip(firsts, data.sentences))
    return records, by_id


def mixture_schema(members: list[NERDataset]) -> tuple[list[str], dict[str, str]]:
    """(every member's types in first-seen order, a description per type: the first member's that has it)."""
    types = list(dict.fromkeys(t for data in members for t in data.types))
    descriptions: dict[str, str] = {}
    for data in members:
        for t in data.types:
            descriptions.setdefault(t, data.descriptions[t])
    return types, descriptions
