"""Generate answers with a rollout engine and score them: the code behind evaluate.py and the trainer's dev eval.

The tagged format asks one prompt per (sentence, type); its answers are merged back into one prediction per
sentence before scoring, so both formats are scored on the same unit: (sentence, type, span text).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

from tqdm import tqdm

from grpo.distributed import all_gather_objects, get_rank, get_world_size
from ner.json_guide import JsonAnswerGuide
from ner.metrics import NERReport, score_corpus
from ner.parsing import Parsed, parse_completion
from ner.prompts import build_prompts, render_prompt
from ner.types import NERDataset
from ner.user_data import check_split, load_fewshot_pool, load_user_dataset

# Tagged answers end with </entity>; stopping there saves the tokens a small model babbles afterwards.
STOP = {"tagged": ["</entity>"], "json": None}


def prompt_token_ids(tokenizer, records: list[dict]) -> list[list[int]]:
    """Each record's chat-rendered prompt as token ids: its ``prompt_ids`` when it carries them (tokenised once
    upstream, as ``evaluate_dataset`` and train_grpo do), else tokenised here."""
    return [r["prompt_ids"] if "prompt_ids" in r else
            tokenizer(render_prompt(tokenizer, r), add_special_tokens=False)["input_ids"] for r in records]


class Answer(NamedTuple):
    """One generated answer: its text, why it ended ("stop": EOS or a stop string; "length": cut by
    max_new_tokens), how many tokens it took (the EOS or stop-string tokens included) and how many of them a guide
    forced over the model's own pick (``Rollout.overridden``)."""
    text: str
    finish_reason: str
    completion_tokens: int
    overridden: int = 0


def generate_answers(engine, tokenizer, records: list[dict], max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, stop: list[str] | None = None, seed: int = 0, batch_size: int = 256,
                     progress: bool = True, split_over_ranks: bool = False,
                     guide: Callable | None = None) -> list[Answer]:
    """One ``Answer`` per record, in record order, ``batch_size`` prompts per engine call. Calls larger than the
    engine's batch let a continuous-batching engine (TorchEngine, vLLM) put waiting prompts in the places of
    finished ones; 256 against 64 was 1.18x faster on 1000 test sentences (bench/eval_throughput.py).

    ``guide(record index, completion ids)``: the engine's ``guide`` (grpo.guide.Guide), by record.
    Records go to the engine longest prompt first. ``split_over_ranks`` (the trainer's dev evaluation under
    torchrun): rank r generates every W-th record of that order, starting at r, and the answers are gathered,
    so every rank returns all of them. Every rank makes the same number of engine calls (some with no prompts):
    under FSDP2 each call starts with a collective unshard. A row's sampled tokens depend only on its seed and row,
    so with ``temperature`` 0 the result is the one a single process gets.
    """
    prompt_ids = prompt_token_ids(tokenizer, records)
    rank, world = (get_rank(), get_world_size()) if split_over_ranks else (0, 1)
    # Longest prompts first: a call's rows then have similar prompts and, as answers grow with the sentence, similar
    # answer lengths, so fewer rows idle while the longest answer of the call finishes.
    by_length = sorted(range(len(records)), key=lambda i: (-len(prompt_ids[i]), i))
    mine = by_length[rank::world]
    calls = math.ceil(math.ceil(len(records) / world) / batch_size)  # rank 0 holds the most records
    answers: list[Answer] = []
    with tqdm(total=len(mine), desc="generate", unit="prompt", disable=not progress or rank != 0) as bar:
        for c in range(calls):
            part = mine[c * batch_size:(c + 1) * batch_size]
            # guide goes only to engines asked to use it: a minimal engine need not know the argument.
            extra = {} if guide is None else {"guide": lambda i, ids, part=part: guide(part[i], ids)}
            rollouts = engine.generate([prompt_ids[i] for i in part], n=1, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, stop=stop,
                                       seed=seed + c * batch_size * world + rank, **extra)
            answers.extend(Answer(r.text, r.finish_reason, len(r.completion_ids), r.overridden) for r in rollouts)
            bar.update(len(rollouts))
    out: list[Answer] = [Answer("", "", 0, 0)] * len(records)
    for indices, part_answers in (all_gather_objects((mine, answers)) if world > 1 else [(mine, answers)]):
        for i, answer in zip(indices, part_answers):
            out[i] = answer
    return out


def generate_completions(*args, **kwargs) -> list[str]:
    """The texts of ``generate_answers`` (same arguments): for callers that need no finish reasons."""
    return [answer.text for answer in generate_answers(*args, **kwargs)]


def drop_long_sentences(tokenizer, records: list[dict], max_prompt_len: int | None) -> tuple[list[dict], int]:
    """``records`` without the sentences that have a prompt longer than ``max_prompt_len`` tokens (all of a
    sentence's prompts go, so that a tagged sentence is never scored on some of its types only), and how many
    sentences that dropped. None keeps everything."""
    if max_prompt_len is None:
        return records, 0
    lengths = map(len, prompt_token_ids(tokenizer, records))
    long = {r["sentence_id"] for r, n in zip(records, lengths) if n > max_prompt_len}
    return [r for r in records if r["sentence_id"] not in long], len(long)


def merge_sentences(records: list[dict], completions: list[str], parsed: list[Parsed],
                    types: list[str]) -> list[dict]:
    """One entry per sentence, in first-seen order: the unit every score is computed on.

    Each entry: ``sentence_id``, ``sentence``, ``types`` (every type asked about it), ``gold`` {type: [texts]}
    with every schema type present, ``pred`` ({type: [texts]}, or None when a json answer is unparseable),
    ``format_ok`` (all of its answers well formed) and ``completions`` (its raw answers in record order).
    Tagged prompts ask one type each; their answers are merged, and a malformed answer predicts nothing for its
    type (so ``pred`` is never None in the tagged format: the other types' answers still count).
    """
    by_id: dict[str, dict] = {}
    for record, text, answer in zip(records, completions, parsed):
        sid = record["sentence_id"]
        entry = by_id.setdefault(sid, {"sentence_id": sid, "sentence": record["sentence"], "types": [],
                                       "gold": {t: [] for t in types}, "pred": None, "format_ok": True,
                                       "completions": []})
        entry["types"] += [t for t in record["types"] if t not in entry["types"]]
        for t, texts in record["gold"].items():
            entry["gold"][t] = list(texts)
        if record["format"] == "json":
            entry["pred"] = answer.entities
        else:
            if entry["pred"] is None:
                entry["pred"] = {t: [] for t in types}
            for t in record["types"]:
                entry["pred"][t] = list((answer.entities or {}).get(t, []))
        entry["format_ok"] = entry["format_ok"] and answer.format_ok
        entry["completions"].append(text)
    return list(by_id.values())


def score_sentences(records: list[dict], completions: list[str], types: list[str],
                    mode: str = "exact") -> tuple[NERReport, list[dict], list[dict]]:
    """Parse every completion, merge per sentence, score. Returns the report, one row per record and one entry
    per sentence (see ``merge_sentences``); the report is computed from those entries, so a report.json that
    keeps them can be re-scored (``ner.compare``) to the same numbers."""
    parsed = [parse_completion(text, record["format"], record["types"])
              for record, text in zip(records, completions)]
    rows = [{"sentence_id": record["sentence_id"], "sentence": record["sentence"], "types": record["types"],
             "gold": record["gold"], "completion": text, "pred": answer.entities,
             "format_ok": answer.format_ok, "schema_ok": answer.schema_ok, "errors": answer.errors}
            for record, text, answer in zip(records, completions, parsed)]
    sentences = merge_sentences(records, completions, parsed, types)
    report = score_corpus([s["gold"] for s in sentences], [s["pred"] for s in sentences], types, mode=mode)
    return report, rows, sentences


def score_answers(records: list[dict], completions: list[str], types: list[str],
                  mode: str = "exact") -> tuple[NERReport, list[dict]]:
    """``score_sentences`` without the per-sentence entries: the report and one row per record."""
    report, rows, _ = score_sentences(records, completions, types, mode)
    return report, rows


def load_eval_data(dataset: str, split: str, limit: int, k_shot: int, data_dir: str | None = None,
                   fewshot_data: str = "", label_map: dict[str, str] | None = None
                   ) -> tuple[NERDataset, NERDataset | None]:
    """(the first ``limit`` sentences to score, the few-shot pool or None); ner.user_data says which split is
    scored, how ``label_map`` renames a data file's types and where few-shot examples come from (never the
    scored data). Cheap after the first call (files are cached), so callers may check it before loading a model."""
    check_split(dataset, split)
    data = load_user_dataset(dataset, split, data_dir, label_map)
    if limit:
        data.sentences = data.sentences[:limit]
    return data, load_fewshot_pool(dataset, split, k_shot, fewshot_data, data_dir, label_map)


def build_eval_records(dataset: str, split: str, limit: int, fmt: str, k_shot: int, prompt_seed: int,
                       data_dir: str | None = None, fewshot_data: str = "", label_map: dict[str, str] | None = None,
                       descriptions: dict[str, str] | None = None) -> tuple[NERDataset, list[dict]]:
    """(the data scored, its prompt records): what ``evaluate_dataset`` generates on, and ner.token_fit counts.
    ``descriptions`` (a checkpoint recipe's) replace the data set's for the types both have."""
    data, pool = load_eval_data(dataset, split, limit, k_shot, data_dir, fewshot_data, label_map)
    data.descriptions = {**data.descriptions, **{t: d for t, d in (descriptions or {}).items() if t in data.types}}
    return data, build_prompts(data, fmt, k_shot=k_shot, seed=prompt_seed, fewshot_pool=pool)


def length_stats(lengths: list[int]) -> dict[str, float | int]:
    """Mean and max of token counts (0 and 0 for none)."""
    return {"mean": sum(lengths) / len(lengths) if lengths else 0.0, "max": max(lengths, default=0)}


def generation_fit(prompt_lengths: list[int], answers: list[Answer], n_sentences: int, n_dropped: int,
                   max_new_tokens: int, max_prompt_len: int | None) -> dict:
    """Did prompts and answers fit? ``prompt_lengths``: every prompt built, the dropped ones too; ``answers``: the
    generated ones. A truncated answer is one the engine ended for ``max_new_tokens`` (finish_reason "length"):
    its JSON is usually unparseable, so it scores as a miss, and a share above zero means the budget is short."""
    truncated = sum(answer.finish_reason == "length" for answer in answers)
    return {"sentences": n_sentences, "max_prompt_len": max_prompt_len, "dropped_long": n_dropped,
            "dropped_share": n_dropped / n_sentences if n_sentences else 0.0,
            "prompt_tokens": length_stats(prompt_lengths),
            "answers": len(answers), "max_new_tokens": max_new_tokens, "truncated": truncated,
            "truncated_share": truncated / len(answers) if answers else 0.0,
            "answer_tokens": length_stats([answer.completion_tokens for answer in answers])}


def evaluate_dataset(engine, tokenizer, dataset: str, split: str, limit: int, fmt: str, k_shot: int,
                     prompt_seed: int, max_new_tokens: int, data_dir: str | None = None,
                     stop: list[str] | None = None, mode: str = "exact", batch_size: int = 256,
                     temperature: float = 0.0, progress: bool = True, fewshot_data: str = "",
                     label_map: dict[str, str] | None = None, descriptions: dict[str, str] | None = None,
                     max_prompt_len: int | None = None, split_over_ranks: bool = False, guided_json: bool = False
                     ) -> tuple[NERReport, list[dict], list[dict], dict]:
    """Generate on the first ``limit`` sentences and score: ``score_sentences``'s report, rows, sentences, and
    ``generation_fit``'s dict. ``descriptions``: see ``build_eval_records``. ``max_prompt_len``: sentences with a
    longer prompt are left out (``drop_long_sentences``); ``split_over_ranks``: see ``generate_answers``.
    ``guided_json`` (json format): the answers' keys and closing braces are forced in the asked order
    (ner.json_guide); the fit dict then counts the answers that changed as ``guided_answers``."""
    data, records = build_eval_records(dataset, split, limit, fmt, k_shot, prompt_seed, data_dir, fewshot_data,
                                       label_map, descriptions)
    # Tokenised once here: the length cut, the fit report and the engine all read these ids.
    records = [{**r, "prompt_ids": ids} for r, ids in zip(records, prompt_token_ids(tokenizer, records))]
    prompt_lengths = [len(r["prompt_ids"]) for r in records]
    records, n_dropped = drop_long_sentences(tokenizer, records, max_prompt_len)
    guide = JsonAnswerGuide(tokenizer, [r["types"] for r in records]) if guided_json and fmt == "json" else None
    answers = generate_answers(engine, tokenizer, records, max_new_tokens, temperature=temperature,
                               stop=stop if stop is not None else STOP[fmt], batch_size=batch_size,
                               progress=progress, split_over_ranks=split_over_ranks, guide=guide)
    fit = generation_fit(prompt_lengths, answers, len(data.sentences), n_dropped, max_new_tokens, max_prompt_len)
    if guide is not None:
        fit["guided_answers"] = sum(answer.overridden > 0 for answer in answers)
    return (*score_sentences(records, [answer.text for answer in answers], data.types, mode), fit)


def make_eval_fn(engine, tokenizer, dataset: str, split: str, limit: int, fmt: str, k_shot: int, prompt_seed: int,
                 max_new_tokens: int, data_dir: str | None = None, stop: list[str] | None = None,
                 fewshot_data: str = "", label_map: dict[str, str] | None = None,
                 max_prompt_len: int | None = None) -> Callable[[int], dict[str, float]]:
    """A plain callable for the trainer: greedy decoding on the first ``limit`` dev sentences → scalar metrics.

    The data is checked here, so a bad eval set fails before training instead of at the first evaluation. Sentences
    whose prompt is longer than ``max_prompt_len`` (the training prompts' cut) are left out and counted
    (``dropped_long``). Under torchrun the ranks share the generation and all return the same metrics.
    """
    data, _ = load_eval_data(dataset, split, limit, k_shot, data_dir, fewshot_data, label_map)

    def eval_fn(step: int) -> dict[str, float]:
        report, rows, sentences, _ = evaluate_dataset(
            engine, tokenizer, dataset, split, limit, fmt, k_shot, prompt_seed, max_new_tokens, data_dir, stop,
            progress=False, fewshot_data=fewshot_data, label_map=label_map, max_prompt_len=max_prompt_len,
            split_over_ranks=True)
        return {"f1": report.f1, "precision": report.precision, "recall": report.recall,
                "format_ok": sum(r["format_ok"] for r in rows) / max(len(rows), 1),
                "dropped_long": len(data.sentences) - len(sentences)}
    return eval_fn
