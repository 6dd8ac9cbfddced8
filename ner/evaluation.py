"""Generate answers with a rollout engine and score them: the code behind evaluate.py and the trainer's dev eval.

The tagged format asks one prompt per (sentence, type); its answers are merged back into one prediction per
sentence before scoring, so both formats are scored on the same unit: (sentence, type, span text).
"""
from __future__ import annotations

from typing import Callable

from tqdm import tqdm

from ner.data import load_ner_dataset
from ner.metrics import NERReport, score_corpus
from ner.parsing import parse_completion
from ner.prompts import build_prompts, render_prompt

# Tagged answers end with </entity>; stopping there saves the tokens a small model babbles afterwards.
STOP = {"tagged": ["</entity>"], "json": None}


def generate_completions(engine, tokenizer, records: list[dict], max_new_tokens: int, temperature: float = 0.0,
                         top_p: float = 1.0, stop: list[str] | None = None, seed: int = 0, batch_size: int = 32,
                         progress: bool = True) -> list[str]:
    """One completion per record, in record order, ``batch_size`` prompts per engine call."""
    prompt_ids = [tokenizer(render_prompt(tokenizer, r), add_special_tokens=False)["input_ids"] for r in records]
    out: list[str] = []
    with tqdm(total=len(records), desc="generate", unit="prompt", disable=not progress) as bar:
        for i in range(0, len(records), batch_size):
            rollouts = engine.generate(prompt_ids[i:i + batch_size], n=1, max_new_tokens=max_new_tokens,
                                       temperature=temperature, top_p=top_p, stop=stop, seed=seed + i)
            out.extend(r.text for r in rollouts)
            bar.update(len(rollouts))
    return out


def score_answers(records: list[dict], completions: list[str], types: list[str],
                      mode: str = "exact") -> tuple[NERReport, list[dict]]:
    """Parse every completion, merge per sentence, score. Returns the report and one row per record."""
    golds: dict[str, dict[str, list[str]]] = {}
    preds: dict[str, dict[str, list[str]] | None] = {}
    rows = []
    for record, text in zip(records, completions):
        parsed = parse_completion(text, record["format"], record["types"])
        sid = record["sentence_id"]
        gold = golds.setdefault(sid, {t: [] for t in types})
        for t, texts in record["gold"].items():
            gold[t] = list(texts)
        if record["format"] == "json":
            preds[sid] = parsed.entities
        else:  # tagged: an unparseable answer for one type predicts nothing for that type
            merged = preds.setdefault(sid, {t: [] for t in types})
            for t in record["types"]:
                merged[t] = list((parsed.entities or {}).get(t, []))
        rows.append({"sentence_id": sid, "sentence": record["sentence"], "types": record["types"],
                     "gold": record["gold"], "completion": text, "pred": parsed.entities,
                     "format_ok": parsed.format_ok, "schema_ok": parsed.schema_ok, "errors": parsed.errors})
    ids = list(golds)
    report = score_corpus([golds[s] for s in ids], [preds.get(s) for s in ids], types, mode=mode)
    return report, rows


def evaluate_dataset(engine, tokenizer, dataset: str, split: str, limit: int, fmt: str, k_shot: int,
                     prompt_seed: int, max_new_tokens: int, data_dir: str | None = None,
                     stop: list[str] | None = None, mode: str = "exact", batch_size: int = 32,
                     temperature: float = 0.0, progress: bool = True) -> tuple[NERReport, list[dict]]:
    data = load_ner_dataset(dataset, split, data_dir)
    if limit:
        data.sentences = data.sentences[:limit]
    pool = load_ner_dataset(dataset, "train", data_dir) if k_shot else None
    records = build_prompts(data, fmt, k_shot=k_shot, seed=prompt_seed, fewshot_pool=pool)
    completions = generate_completions(engine, tokenizer, records, max_new_tokens, temperature=temperature,
                                       stop=stop if stop is not None else STOP[fmt], batch_size=batch_size,
                                       progress=progress)
    return score_answers(records, completions, data.types, mode)


def make_eval_fn(engine, tokenizer, dataset: str, split: str, limit: int, fmt: str, k_shot: int, prompt_seed: int,
                 max_new_tokens: int, data_dir: str | None = None,
                 stop: list[str] | None = None) -> Callable[[int], dict[str, float]]:
    """A plain callable for the trainer: greedy decoding on the first ``limit`` dev sentences → scalar metrics."""
    def eval_fn(step: int) -> dict[str, float]:
        report, rows = evaluate_dataset(engine, tokenizer, dataset, split, limit, fmt, k_shot, prompt_seed,
                                        max_new_tokens, data_dir, stop, progress=False)
        return {"f1": report.f1, "precision": report.precision, "recall": report.recall,
                "format_ok": sum(r["format_ok"] for r in rows) / max(len(rows), 1)}
    return eval_fn
