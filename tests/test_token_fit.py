"""Fit reports: answers cut by max_new_tokens counted from real rollouts, prompts over max_prompt_len, and the
tokenizer-only counts (ner.token_fit, evaluate.py --fit_only) against a direct tokenizer count."""
from __future__ import annotations

import json

import torch

import evaluate
from grpo.engine_factory import build_engine
from grpo.models import tiny_llama
from ner.evaluation import build_eval_records, evaluate_dataset
from ner.rationale import candidate_rationale
from ner.token_fit import tokenizer_fit


def _chat_length(tok, record: dict) -> int:
    """The prompt's tokens straight from the chat template (not render-then-tokenize as the code does)."""
    return len(tok.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"])


def _eos_only_model(vocab: int, eos: int) -> torch.nn.Module:
    """A tiny llama whose head scores EOS above every other token for any input: greedy answers stop at once."""
    model = tiny_llama(vocab_size=vocab, hidden=16, layers=1, heads=2)
    head = torch.nn.Linear(16, vocab, bias=True)
    torch.nn.init.zeros_(head.weight)
    with torch.no_grad():
        head.bias.zero_()
        head.bias[eos] = 10.0
    model.lm_head = head
    return model


def test_truncated_share_follows_the_rollouts_finish_reason_and_long_prompts_are_dropped(smollm2_tokenizer):
    tok = smollm2_tokenizer
    _, records = build_eval_records("crossner_politics", "test", 4, "json", 0, 0)
    lengths = sorted(_chat_length(tok, r) for r in records)
    cut = lengths[1]  # the two longest prompts are over it (lengths differ: the sentences do)
    assert lengths[1] < lengths[2]

    def fit_of(model, max_new_tokens):
        engine = build_engine("torch", model.eval(), tok)
        _, rows, sentences, fit = evaluate_dataset(engine, tok, "crossner_politics", "test", 4, "json", 0, 0,
                                                   max_new_tokens, progress=False, max_prompt_len=cut)
        assert len(rows) == len(sentences) == 2
        return fit

    # A random model's one-token answers: a budget of 1 cuts every answer whose token is not EOS, i.e. all here.
    cut_fit = fit_of(tiny_llama(vocab_size=len(tok), hidden=16, layers=1, heads=2), 1)
    assert (cut_fit["answers"], cut_fit["truncated"], cut_fit["truncated_share"]) == (2, 2, 1.0)
    assert cut_fit["answer_tokens"] == {"mean": 1.0, "max": 1}
    # The same budget with a model that answers EOS at once: nothing is cut. The count is the engine's reason.
    stop_fit = fit_of(_eos_only_model(len(tok), tok.eos_token_id), 1)
    assert (stop_fit["truncated"], stop_fit["truncated_share"]) == (0, 0.0)
    for fit in (cut_fit, stop_fit):  # prompts: all four counted, the two over the cut dropped
        assert (fit["sentences"], fit["dropped_long"], fit["dropped_share"]) == (4, 2, 0.5)
        assert fit["prompt_tokens"] == {"mean": sum(lengths) / 4, "max": lengths[-1]}


def _direct_counts(tok, data, records) -> tuple[list[int], list[int], list[int]]:
    """(prompt, gold answer block, CoT answer) tokens per record, the answers written out by hand from the data."""
    prompts, golds, cots = [], [], []
    for record in records:
        sentence = next(s for s in data.sentences if s.text == record["sentence"])
        gold = sentence.gold(record["types"])
        if record["format"] == "json":
            block, sep, eos = json.dumps({"entities": gold}, ensure_ascii=False), "\n", 1
        else:
            (t,) = record["types"]
            block, sep, eos = "<entity>" + ", ".join(dict.fromkeys(gold[t])) + "</entity>", " ", 0
        cot = f"<think>{candidate_rationale(sentence, record['types'])}</think>{sep}{block}"
        prompts.append(_chat_length(tok, record))
        golds.append(len(tok.encode(block, add_special_tokens=False)))
        cots.append(len(tok.encode(cot, add_special_tokens=False)) + eos)
    return prompts, golds, cots


def test_tokenizer_fit_equals_a_direct_count_in_both_formats(smollm2_tokenizer):
    tok = smollm2_tokenizer
    for fmt, limit in (("json", 6), ("tagged", 2)):
        data, records = build_eval_records("crossner_science", "test", limit, fmt, 0, 0)
        prompts, golds, cots = _direct_counts(tok, data, records)
        prompt_cut, budget = sorted(prompts)[len(prompts) // 2], sorted(cots)[len(cots) // 2]
        fit = tokenizer_fit(tok, data, records, budget, prompt_cut)
        assert fit["prompts"] == len(records) == limit * (1 if fmt == "json" else len(data.types))
        for key, direct in (("prompt_tokens", prompts), ("gold_json_tokens", golds), ("cot_answer_tokens", cots)):
            assert fit[key] == {"mean": sum(direct) / len(direct), "max": max(direct)}, (fmt, key)
        assert fit["over_max_prompt_len"] == sum(n > prompt_cut for n in prompts)
        assert fit["over_max_new_tokens"] == sum(n > budget for n in cots) > 0


def test_fit_only_counts_with_the_tokenizer_and_loads_no_model(tmp_path, smollm2_tokenizer):
    # A model folder with a config and a tokenizer but no weights: loading the model would fail.
    model_dir = tmp_path / "no_weights"
    tiny_llama(vocab_size=len(smollm2_tokenizer), hidden=16, layers=1, heads=2).config.save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    fits = evaluate.main(["--model", str(model_dir), "--dataset", "crossner_ai,crossner_music", "--limit", "3",
                          "--format", "json", "--k_shot", "0", "--max_new_tokens", "64", "--fit_only"])
    assert list(fits) == ["crossner_ai", "crossner_music"]
    data, records = build_eval_records("crossner_music", "test", 3, "json", 0, 0)
    assert fits["crossner_music"] == tokenizer_fit(smollm2_tokenizer, data, records, 64)
