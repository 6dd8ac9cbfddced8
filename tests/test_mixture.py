"""Training mixtures (ner/mixture.py): several data sets, each sentence asked its own data set's types."""
from __future__ import annotations

import json

import pytest

from ner.data import load_ner_dataset, select_sentences


def _types_line(record: dict) -> str:
    return record["messages"][-1]["content"]


def test_a_mixture_asks_each_sentence_its_own_types_by_its_own_definitions(smollm2_tokenizer):
    import train_grpo
    from grpo.config import parse_config

    cfg = parse_config(train_grpo.NERGRPOConfig, ["--dataset", "conll2003,crossner_politics", "--format", "json",
                                                  "--k_shot", "0", "--limit", "3", "--sentence_seed", "5"])
    prompts, _ = train_grpo.build_train_prompts(cfg, smollm2_tokenizer)
    conll, politics = load_ner_dataset("conll2003", "train"), load_ner_dataset("crossner_politics", "train")
    # Each member's own selection (the first 3 of its shuffle by seed 5), in member order, ids prefixed.
    expected = [("conll2003", s) for s in select_sentences(conll.sentences, 0, 3, 5)] + \
               [("crossner_politics", s) for s in select_sentences(politics.sentences, 0, 3, 5)]
    assert [p["sentence_id"] for p in prompts] == [f"{name}/{s.id}" for name, s in expected]
    assert [p["sentence"] for p in prompts] == [s.text for _, s in expected]
    assert [p["types"] for p in prompts] == [conll.types] * 3 + [politics.types] * 3
    # `person` is defined as each data set defines it: CrossNER politics' excludes politicians, CoNLL's does not.
    assert politics.descriptions["person"] != conll.descriptions["person"]
    assert all(conll.descriptions["person"] in _types_line(p) for p in prompts[:3])
    assert all(politics.descriptions["person"] in _types_line(p) and conll.descriptions["person"] not in
               _types_line(p) for p in prompts[3:])
    # The gold is the sentence's own: every entity of a politics sentence is asked under its politics type.
    for (_, s), p in zip(expected, prompts):
        assert sorted((t, x) for t, xs in p["gold"].items() for x in xs) == sorted((e.type, e.text) for e in s.entities)


def test_cot_records_of_a_mixture_map_back_to_their_sentences():
    from ner.cot import build_cot_records

    records, by_id = build_cot_records("crossner_ai,crossner_music", "train", "json", limit=4)
    assert len(records) == len(by_id) == 8  # both train files name their sentences train.txt:N: the prefix splits them
    for r in records:
        s = by_id[r["sentence_id"]]
        assert r["sentence"] == s.text and r["sentence_id"].split("/")[0] in ("crossner_ai", "crossner_music")
    assert by_id["crossner_ai/train.txt:0"].text != by_id["crossner_music/train.txt:0"].text


def test_mixture_recipe_names_every_members_types_and_config_checks_each_member(tmp_path):
    from ner.config_checks import dataset_problems
    from ner.recipe import recipe_for_training

    recipe = recipe_for_training("json", "conll2003,crossner_music", "train", None, 0, 0, [], 256, "sft", [])
    music = load_ner_dataset("crossner_music", "train")
    assert recipe["types"] == ["location", "misc", "organisation", "person"] + [
        t for t in music.types if t not in ("location", "misc", "organisation", "person")]
    assert recipe["source"]["dataset"] == "conll2003,crossner_music"
    json.dumps(recipe)
    assert dataset_problems("dataset", "conll2003,crossner_music", "train", None) == []
    problems = dataset_problems("dataset", f"conll2003,{tmp_path / 'nope.txt'}", "train", None)
    assert len(problems) == 1 and "nope.txt" in problems[0]


def test_sft_steps_of_a_mixture_stay_inside_one_data_set():
    from grpo.sft import GROUP_STEPS, rows_for_step

    # Two groups interleaved, 8 rows per step, lengths all different: sorting a window by (group, length) makes every
    # step one group's, and the epoch still visits every row once.
    per_step = 8
    n = per_step * GROUP_STEPS
    groups = [i % 2 for i in range(n)]
    lengths = [(i * 53) % 97 + 1 for i in range(n)]
    steps = [rows_for_step(n, s, per_step, seed=1, lengths=lengths, groups=groups) for s in range(GROUP_STEPS)]
    assert sorted(i for step in steps for i in step) == list(range(n))
    assert all(len({groups[i] for i in step}) == 1 for step in steps)
    assert {groups[step[0]] for step in steps} == {0, 1}
    # Within a group a step still holds neighbours in length order.
    for g in (0, 1):
        by_length = sorted((i for i in range(n) if groups[i] == g), key=lambda i: -lengths[i])
        runs = {frozenset(by_length[k:k + per_step]) for k in range(0, len(by_length), per_step)}
        assert all(frozenset(step) in runs for step in steps if groups[step[0]] == g)


def test_instruction_groups_number_records_by_format_and_types():
    from ner.sft_data import instruction_groups

    records = [{"format": "json", "types": ["a", "b"]}, {"format": "json", "types": ["c"]},
               {"format": "json", "types": ["a", "b"]}, {"format": "tagged", "types": ["a", "b"]}]
    assert instruction_groups(records) == [0, 1, 0, 2]


@pytest.mark.parametrize("spec", ["", " , "])
def test_an_empty_mixture_is_refused(spec):
    from ner.mixture import mixture_names

    with pytest.raises(ValueError, match="names no data set"):
        mixture_names(spec)


def test_leave_one_domain_out_configs_never_show_the_held_out_domain(smollm2_tokenizer):
    """configs/{sft,grpo}_smollm2_mix.yaml (held out: politics) validate as shipped, train on CoNLL-2003 and the
    four other domains' train splits, and GRPO samples exactly the sentences the SFT phase tuned on."""
    from collections import Counter

    import train_grpo
    import train_sft
    from grpo.config import parse_config
    from ner.cot import build_cot_records

    sft = parse_config(train_sft.NERSFTConfig, ["--config", "configs/sft_smollm2_mix.yaml"])
    grpo = parse_config(train_grpo.NERGRPOConfig, ["--config", "configs/grpo_smollm2_mix.yaml"])
    sft.validate(1)
    grpo.validate(1)
    assert sft.dataset == grpo.dataset and "politics" not in sft.dataset and grpo.model == sft.out_dir
    prompts, n_long = train_grpo.build_train_prompts(grpo, smollm2_tokenizer)
    assert n_long == 0  # max_prompt_len fits every training prompt
    assert Counter(p["sentence_id"].split("/")[0] for p in prompts) == {
        "conll2003": 200, "crossner_ai": 100, "crossner_literature": 100, "crossner_music": 100,
        "crossner_science": 200}  # stats.json: the four train splits whole, CoNLL's first 200 of its shuffle
    records, _ = build_cot_records(sft.dataset, sft.split, sft.format, sft.limit, sft.k_shot, sft.prompt_seed,
                                   None, sft.sentence_seed)
    assert [r["sentence_id"] for r in records] == [p["sentence_id"] for p in prompts]
    assert [r["messages"] for r in records] == [p["messages"] for p in prompts]
