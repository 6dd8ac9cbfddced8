"""Do prompts and answers fit the token budgets? Counted with the tokenizer alone, before anything is generated
(``evaluate.py --fit_only``), and from a run's rollouts (``ner.evaluation.generation_fit``).

CrossNER sentences run 30-84 tokens with 9-17 entity types, each described in the prompt, and an all-types JSON
answer lists every type, so both the prompt and the answer are several times a CoNLL-2003 one. A prompt longer than
``--max_prompt_len`` is dropped; an answer longer than ``--max_new_tokens`` is cut (finish_reason "length") and
scores as a miss. Per data set, ``tokenizer_fit`` counts:

* ``prompt_tokens``: the chat-rendered prompt evaluate.py sends (same format, k_shot, descriptions);
* ``gold_json_tokens``: the gold answer block alone (``{"entities": {...}}`` or ``<entity>…</entity>``);
* ``cot_answer_tokens``: the whole answer a CoT-tuned model is taught to write, ``<think>`` with the template
  teacher's candidate reasoning (ner/rationale.py) then the gold block, plus the EOS token that ends a JSON answer
  (max_new_tokens counts it). A model's own reasoning can be longer or shorter: this is a floor to plan with.

Answers are tokenised alone, not after their prompt, so a token merged across the boundary may count once more.
"""
from __future__ import annotations

from ner.evaluation import STOP, length_stats, prompt_token_ids
from ner.prompts import format_answer, prompt_groups
from ner.rationale import candidate_rationale
from ner.types import NERDataset


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenizer_fit(tokenizer, data: NERDataset, records: list[dict], max_new_tokens: int,
                  max_prompt_len: int | None = None) -> dict:
    """Token counts of ``records`` (``build_prompts(data, …)``'s output, in its order) against the budgets; see the
    module docstring. ``over_max_prompt_len`` / ``over_max_new_tokens``: how many prompts / CoT answers exceed them
    (shares of all records alongside)."""
    groups = len(prompt_groups(records[0]["format"], data.types)) if records else 1
    # build_prompts makes `groups` consecutive records per sentence, in sentence order.
    sentences = [sentence for sentence in data.sentences for _ in range(groups)]
    if len(sentences) != len(records):
        raise ValueError(f"{len(records)} records for {len(data.sentences)} sentences × {groups} prompts each")
    prompt_lengths = [len(ids) for ids in prompt_token_ids(tokenizer, records)]
    gold_lengths = [_count(tokenizer, record["target"]) for record in records]
    cot_lengths = [_count(tokenizer, format_answer(record["gold"], record["format"], record["types"],
                                                   candidate_rationale(sentence, record["types"])))
                   + (STOP[record["format"]] is None)  # the EOS token that ends an answer without a stop string
                   for record, sentence in zip(records, sentences)]
    over_prompt = sum(n > max_prompt_len for n in prompt_lengths) if max_prompt_len else 0
    over_answer = sum(n > max_new_tokens for n in cot_lengths)
    n = max(len(records), 1)
    return {"sentences": len(data.sentences), "prompts": len(records), "types": len(data.types),
            "prompt_tokens": length_stats(prompt_lengths), "gold_json_tokens": length_stats(gold_lengths),
            "cot_answer_tokens": length_stats(cot_lengths),
            "max_prompt_len": max_prompt_len, "over_max_prompt_len": over_prompt, "over_prompt_share": over_prompt / n,
            "max_new_tokens": max_new_tokens, "over_max_new_tokens": over_answer, "over_answer_share": over_answer / n}


def _stats(stats: dict) -> str:
    return f"{stats['mean']:.0f} / {stats['max']}"


def format_tokenizer_fit(fits: dict[str, dict]) -> str:
    """Markdown: one row per data set of ``tokenizer_fit``'s output."""
    first = next(iter(fits.values()))
    cut = f"> {first['max_prompt_len']}" if first["max_prompt_len"] else "(no --max_prompt_len)"
    lines = [f"| dataset | sentences | types | prompt tokens mean / max | prompts {cut} | gold JSON tokens mean / max "
             f"| CoT answer tokens mean / max | CoT answers > {first['max_new_tokens']} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {f['sentences']} | {f['types']} | {_stats(f['prompt_tokens'])} | "
              f"{100 * f['over_prompt_share']:.1f}% | {_stats(f['gold_json_tokens'])} | "
              f"{_stats(f['cot_answer_tokens'])} | {100 * f['over_answer_share']:.1f}% |" for name, f in fits.items()]
    return "\n".join(lines)


def format_generation_fit(fits: dict[str, dict]) -> str:
    """Markdown: one row per data set of ``ner.evaluation.generation_fit``'s output (and, when any data set was
    run with --guided_json, how many of its answers the guide changed)."""
    guided = any("guided_answers" in f for f in fits.values())
    lines = ["| dataset | answers | cut by max_new_tokens | answer tokens mean / max | sentences dropped "
             "(prompt > max_prompt_len) | prompt tokens mean / max |" + (" changed by --guided_json |" if guided else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if guided else "")]
    for name, f in fits.items():
        dropped = (f"{f['dropped_long']} ({100 * f['dropped_share']:.1f}%, > {f['max_prompt_len']})"
                   if f["max_prompt_len"] else "— (no --max_prompt_len)")
        lines.append(f"| {name} | {f['answers']} | {f['truncated']} ({100 * f['truncated_share']:.1f}%, budget "
                     f"{f['max_new_tokens']}) | {_stats(f['answer_tokens'])} | {dropped} | "
                     f"{_stats(f['prompt_tokens'])} |" + (f" {f.get('guided_answers', '—')} |" if guided else ""))
    return "\n".join(lines)
