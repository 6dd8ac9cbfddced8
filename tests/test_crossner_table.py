"""ner.crossner_table: the crossner group, the Table 1 layout and the published rows, with numbers worked by hand;
and evaluate.py --dataset crossner end to end on a tiny random model."""
from __future__ import annotations

import json

import pytest

import evaluate
from grpo.config import ConfigError, check_paths, parse_config
from ner.crossner_table import PUBLISHED, expand_dataset_groups, format_table1, table1

PAPER_ORDER = ["crossner_ai", "crossner_literature", "crossner_music", "crossner_politics", "crossner_science"]


def test_crossner_group_expands_to_the_five_domains_in_the_papers_column_order():
    assert expand_dataset_groups(["crossner"]) == PAPER_ORDER
    # a domain named before the group keeps its place and is scored once
    assert expand_dataset_groups(["crossner_music", "crossner", "conll2003"]) == [
        "crossner_music", "crossner_ai", "crossner_literature", "crossner_politics", "crossner_science", "conll2003"]
    assert parse_config(evaluate.EvalConfig, ["--dataset", "crossner"]).dataset == PAPER_ORDER


def test_a_missing_domain_file_and_a_negative_prompt_cut_are_named_before_anything_loads(tmp_path):
    cfg = parse_config(evaluate.EvalConfig, ["--dataset", "crossner", "--data_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match=r"dataset=crossner_ai: .*crossner/ai/test.txt not found"):
        check_paths(cfg)
    with pytest.raises(ConfigError, match="max_prompt_len=-1 must be ≥ 0"):
        parse_config(evaluate.EvalConfig, ["--max_prompt_len", "-1"])


def _result(sentences: list[tuple[dict, dict | None]], types: list[str]) -> dict:
    """The parts of one evaluate.py result that table1 reads."""
    return {"report": {"per_type": {t: {} for t in types}},
            "sentences": [{"gold": gold, "pred": pred} for gold, pred in sentences]}


def test_table1_rows_per_protocol_their_average_and_the_published_rows():
    ai = _result([  # misc and case matter here
        ({"person": ["Geoffrey Hinton"], "misc": ["Turing Award"]},
         {"person": ["geoffrey hinton"], "misc": ["Turing Award"]}),
        ({"person": ["Yann LeCun"], "misc": []}, None),  # unparseable answer
    ], ["misc", "person"])
    music = _result([({"band": ["The Beatles"], "misc": []}, {"band": ["Beatles"], "misc": ["Liverpool"]})],
                    ["band", "misc"])
    # strict, AI: gold {person Geoffrey Hinton, misc Turing Award, person Yann LeCun} = 3, pred 2, tp 1 (the misc):
    #   F1 = 2·1/(2+3) = 40.0. Music: gold 1, pred 2, tp 0 ("Beatles" ≠ "The Beatles"): 0.0. Avg 20.0.
    # reasoningner, AI: misc out; "geoffrey hinton" = "Geoffrey Hinton" normalised: tp 1, pred 1, gold 2: 2/3 = 66.7.
    #   Music: misc out; "the beatles" and "beatles" normalise alike: tp 1, pred 1, gold 1: 100.0. Avg 83.3.
    table = table1({"crossner_ai": ai, "crossner_music": music, "average": {"f1": 0.0}})
    assert table["columns"] == ["crossner_ai", "crossner_music"]  # the average row of results is no column
    ours = {row["protocol"]: row for row in table["rows"] if row["source"] == "ours"}
    assert ours["strict"]["f1"] == pytest.approx({"crossner_ai": 40.0, "crossner_music": 0.0})
    assert ours["reasoningner"]["f1"] == pytest.approx({"crossner_ai": 200 / 3, "crossner_music": 100.0})
    assert ours["strict"]["average"] == pytest.approx(20.0)
    assert ours["reasoningner"]["average"] == pytest.approx((200 / 3 + 100) / 2)
    published = [row for row in table["rows"] if row["source"] != "ours"]
    assert [row["label"] for row in published] == [
        "ReasoningNER 8B, published (paper Table 1)", "ReasoningNER 1.7B, published (paper Table 1)",
        "GPT-4, published (paper Table 1)", "UniNER 7B, published (paper Table 1)"]
    # ReasoningNER 8B: AI 71.0, Music 78.7 → the mean of the two columns shown, 74.85; the paper's Avg 72.4
    assert published[0]["f1"] == {"crossner_ai": 71.0, "crossner_music": 78.7}
    assert published[0]["average"] == pytest.approx(74.85) and published[0]["paper_average"] == 72.4
    md = format_table1(table).splitlines()
    assert md[0] == "| | AI | Music | Avg | paper's Avg (7 sets) |"
    assert "| ours, reasoningner (the paper's protocol) | 66.7 | 100.0 | 83.3 | — |" in md
    assert "| ours, strict (our strict protocol) | 40.0 | 0.0 | 20.0 | — |" in md
    assert "| GPT-4, published (paper Table 1) | 50.0 | 69.2 | 59.6 | 60.1 |" in md
    # no CrossNER column: no published row; a published cell missing would make its average "—"
    plain = table1({"conll2003": ai, "my_file.txt": music})
    assert [row["source"] for row in plain["rows"]] == ["ours", "ours"]
    mixed = table1({"conll2003": ai, "crossner_ai": music})
    assert [row["average"] for row in mixed["rows"][2:]] == [None] * 4


def test_published_rows_match_the_papers_averages_over_seven_sets_not_five():
    assert {row.model: row.paper_average for row in PUBLISHED} == {
        "ReasoningNER 8B": 72.4, "ReasoningNER 1.7B": 65.1, "GPT-4": 60.1, "UniNER 7B": 53.4}  # the numbers
    for row in PUBLISHED:
        assert set(row.f1) == {"mit_movie", "mit_restaurant", *PAPER_ORDER}
        # seven cells each rounded to 0.1 (mean off by ≤ 0.05) and the Avg rounded to 0.1 (≤ 0.05): ≤ 0.1 apart
        assert abs(sum(row.f1.values()) / 7 - row.paper_average) <= 0.1 + 1e-9, row.model
    eight_b = PUBLISHED[0]
    assert sum(eight_b.f1[d] for d in PAPER_ORDER) / 5 == pytest.approx(74.74)  # not 72.4: the MIT sets pull it down


def test_evaluate_crossner_writes_table1_and_the_fit_of_every_domain(tmp_path, smollm2_tokenizer):
    from grpo.models import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=len(smollm2_tokenizer), hidden=16, layers=1, heads=2).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    evaluate.main(["--model", str(model_dir), "--dataset", "crossner", "--limit", "1", "--format", "json",
                   "--k_shot", "0", "--max_new_tokens", "1", "--out_dir", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(saved["results"]) == PAPER_ORDER + ["average"]
    table = saved["table1"]
    assert table["columns"] == PAPER_ORDER and len(table["rows"]) == 2 + len(PUBLISHED)
    for row in table["rows"][:2]:
        cells = [row["f1"][d] for d in PAPER_ORDER]
        assert row["average"] == pytest.approx(sum(cells) / 5)
    for domain in PAPER_ORDER:  # one sentence each, and a one-token budget cuts every answer
        fit = saved["results"][domain]["fit"]
        assert (fit["answers"], fit["truncated"], fit["truncated_share"]) == (1, 1, 1.0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Table 1 layout" in md and "| ReasoningNER 8B, published (paper Table 1) | 71.0 | 69.4 |" in md
    assert "| crossner_science | 1 | 1 (100.0%, budget 1) |" in md
