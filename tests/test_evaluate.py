"""evaluate.py and ner.evaluation: per-type answers merge into per-sentence predictions; the CLI writes reports."""
from __future__ import annotations

import json

import pytest

import evaluate
from ner.evaluation import score_answers, score_sentences
from ner.metrics import score_corpus
from ner.types import Entity, NERDataset, Sentence
from ner.prompts import build_prompts


def _dataset() -> NERDataset:
    s1 = Sentence("John lives in Paris".split(), [Entity("person", 0, 1, "John"), Entity("location", 3, 4, "Paris")],
                  id="s1")
    s2 = Sentence("Rain fell".split(), [], id="s2")
    return NERDataset("toy", "test", [s1, s2], ["location", "person"],
                      {"location": "places", "person": "people"})


def test_tagged_answers_merge_per_sentence_and_score_by_hand():
    records = build_prompts(_dataset(), "tagged", k_shot=0)
    by_key = {(r["sentence_id"], r["types"][0]): r for r in records}
    answers = {  # s1/location right; s1/person spurious "Paris" instead of John; s2 both empty; one malformed
        ("s1", "location"): "<think>Paris is a city.</think> <entity>Paris</entity>",
        ("s1", "person"): "<think>x</think> <entity>Paris</entity>",
        ("s2", "location"): "<think>none</think> <entity></entity>",
        ("s2", "person"): "garbage without tags",
    }
    completions = [answers[(r["sentence_id"], r["types"][0])] for r in records]
    report, rows = score_answers(records, completions, ["location", "person"])
    # gold: John/person, Paris/location = 2; pred: Paris/location (tp), Paris/person (wrong type of a gold text) = 2
    # → P = 1/2, R = 1/2, F1 = 1/2; the John miss and the Paris/person pred form one wrong-type pair.
    assert (report.tp, report.n_gold, report.n_pred) == (1, 2, 2)
    assert report.f1 == pytest.approx(0.5)
    assert sum(r["format_ok"] for r in rows) == 3 and len(rows) == len(by_key) == 4


def test_tagged_answers_become_one_entry_per_sentence_that_rescoring_reproduces():
    records = build_prompts(_dataset(), "tagged", k_shot=0)  # order: s1/location, s1/person, s2/location, ...
    answers = {
        ("s1", "location"): "<think>a city</think> <entity>Paris</entity>",
        ("s1", "person"): "<think>x</think> <entity>Paris</entity>",
        ("s2", "location"): "garbage without tags",  # malformed first: format_ok must be all(), not the last one
        ("s2", "person"): "<think>none</think> <entity></entity>",
    }
    completions = [answers[(r["sentence_id"], r["types"][0])] for r in records]
    report, rows, sentences = score_sentences(records, completions, ["location", "person"])
    assert len(rows) == 4 and [s["sentence_id"] for s in sentences] == ["s1", "s2"]
    s1, s2 = sentences
    # s1: both answers parse; their per-type predictions and golds merge into one dict each
    assert s1 == {"sentence_id": "s1", "sentence": "John lives in Paris", "types": ["location", "person"],
                  "gold": {"location": ["Paris"], "person": ["John"]},
                  "pred": {"location": ["Paris"], "person": ["Paris"]}, "format_ok": True,
                  "completions": [answers[("s1", "location")], answers[("s1", "person")]]}
    # s2: the garbage location answer makes the sentence not format_ok, and predicts nothing for location
    assert s2["pred"] == {"location": [], "person": []} and s2["format_ok"] is False
    assert s2["gold"] == {"location": [], "person": []}
    assert s2["completions"] == ["garbage without tags", answers[("s2", "person")]]
    rescored = score_corpus([s["gold"] for s in sentences], [s["pred"] for s in sentences], ["location", "person"])
    assert rescored.to_dict() == report.to_dict()
    assert score_answers(records, completions, ["location", "person"])[0].to_dict() == report.to_dict()


def test_json_answer_unparseable_counts_gold_as_missed():
    records = build_prompts(_dataset(), "json", k_shot=0)
    completions = ['<think>ok</think> {"entities": {"person": ["John"], "location": ["Paris"]}}', "{not json"]
    report, _ = score_answers(records, completions, ["location", "person"])
    assert (report.tp, report.n_gold, report.n_pred, report.f1) == (2, 2, 2, 1.0)
    _, _, sentences = score_sentences(records, completions, ["location", "person"])
    assert [(s["pred"], s["format_ok"]) for s in sentences] == [
        ({"person": ["John"], "location": ["Paris"]}, True), (None, False)]


def test_cli_writes_reports_with_one_row_per_dataset_and_the_average(tmp_path, capsys):
    from ner.data import load_ner_dataset

    results = evaluate.main(["--dataset", "conll2003,crossner_politics", "--limit", "1", "--k_shot", "0",
                             "--max_new_tokens", "8", "--out_dir", str(tmp_path), "--samples", "2"])
    n_test = len(load_ner_dataset("conll2003", "test").sentences)
    assert f"scored 1 of {n_test} test sentences (the first 1: --limit; 0 = all)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "report.json").read_text())["results"]
    assert set(saved) == {"conll2003", "crossner_politics", "average"}
    f1s = [saved[d]["report"]["f1"] for d in ("conll2003", "crossner_politics")]
    assert saved["average"]["f1"] == pytest.approx(sum(f1s) / 2)
    assert results["average"]["f1"] == pytest.approx(saved["average"]["f1"])
    for name in ("conll2003", "crossner_politics"):  # --limit 1: one sentence, every protocol by default
        assert len(saved[name]["sentences"]) == 1
        assert set(saved[name]["sentences"][0]) == {"sentence_id", "sentence", "types", "gold", "pred",
                                                    "format_ok", "completions"}
        assert list(saved[name]["protocols"]) == ["strict", "blog", "reasoningner"]
        assert saved[name]["protocols"]["strict"]["f1"] == pytest.approx(saved[name]["report"]["f1"])
    md = (tmp_path / "report.md").read_text()
    assert "| **average** |" in md and "## conll2003" in md and "### Sample outputs" in md


def test_protocol_option_accepts_a_protocol_or_all_and_rejects_others():
    from grpo.config import ConfigError, parse_config

    assert parse_config(evaluate.EvalConfig, []).protocol == "all"
    assert parse_config(evaluate.EvalConfig, ["--protocol", "blog"]).protocol == "blog"
    with pytest.raises(ConfigError, match="--protocol: unknown protocol 'loose'"):
        parse_config(evaluate.EvalConfig, ["--protocol", "loose"])


def test_default_scores_every_sentence_and_the_output_says_how_many(tmp_path, capsys, smollm2_tokenizer):
    # 501 sentences: one more than the old silent default of 500. A tiny random model keeps the run short.
    from grpo.models import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=len(smollm2_tokenizer), hidden=16, layers=1, heads=2).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"tokens": ["Rain", str(i)], "entities": []}) + "\n" for i in range(501)))
    evaluate.main(["--model", str(model_dir), "--dataset", str(data), "--format", "json", "--k_shot", "0",
                   "--max_new_tokens", "1", "--batch_size", "256", "--out_dir", str(tmp_path / "out")])  # no --limit
    assert "scored 501 of 501 test sentences\n" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "report.json").read_text())["results"][str(data)]
    assert (saved["sentences_scored"], saved["sentences_total"], len(saved["sentences"])) == (501, 501, 501)
