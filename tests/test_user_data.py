"""A user's own data at evaluation (ner/user_data.py, evaluate.py): --split picks a folder's split file and is
refused for a single file, few-shot examples never come from the scored data, --label_map renames types."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import evaluate
from grpo.config import ConfigError, parse_config
from ner.data import conll_descriptions, default_data_dir
from ner.evaluation import load_eval_data
from ner.prompts import build_prompts

TEST = "John\tB-PER\nlives\tO\nin\tO\nParis\tB-LOC\n"
TRAIN = "Mary\tB-PER\nvisited\tO\nRome\tB-LOC\n\nIBM\tB-ORG\nhires\tO\n"
DEV = "Bob\tB-PER\nslept\tO\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def texts(data) -> list[str]:
    return [s.text for s in data.sentences]


def test_a_folder_of_split_files_respects_the_split(tmp_path):
    folder = tmp_path / "mine"
    write(folder / "train.txt", TRAIN)
    write(folder / "validation.txt", DEV)  # "validation" is one of dev's file names
    write(folder / "test.txt", TEST)
    for split, expected in (("train", ["Mary visited Rome", "IBM hires"]), ("dev", ["Bob slept"]),
                            ("validation", ["Bob slept"]), ("test", ["John lives in Paris"]),
                            ("", ["John lives in Paris"])):  # empty = test
        data, pool = load_eval_data(str(folder), split, 0, 0)
        assert texts(data) == expected and pool is None
    data, pool = load_eval_data(str(folder), "dev", 0, 2)  # few-shot: the folder's train file
    assert texts(pool) == ["Mary visited Rome", "IBM hires"]
    write(folder / "dev.jsonl", '{"tokens": ["x"]}\n')
    with pytest.raises(FileNotFoundError, match=r"mine: 2 files \(dev\.jsonl, validation\.txt\) for split 'dev'"):
        load_eval_data(str(folder), "dev", 0, 0)
    (folder / "train.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"mine: no file for split 'train'.*train\.<ext>"):
        load_eval_data(str(folder), "train", 0, 0)


def test_a_single_file_refuses_an_explicit_split(tmp_path):
    path = str(write(tmp_path / "mine.txt", TEST))
    with pytest.raises(ConfigError, match=r"split 'dev' of .*mine\.txt: a single data file has no splits"):
        parse_config(evaluate.EvalConfig, ["--dataset", path, "--split", "dev", "--k_shot", "0"])
    cfg = parse_config(evaluate.EvalConfig, ["--dataset", path, "--k_shot", "0"])  # no split: the whole file
    assert texts(load_eval_data(path, cfg.split, 0, cfg.k_shot)[0]) == ["John lives in Paris"]
    # A registered set keeps its splits and the empty default means test.
    assert parse_config(evaluate.EvalConfig, ["--split", "dev"]).split == "dev"


def test_fewshot_examples_never_come_from_the_scored_file(tmp_path):
    test = str(write(tmp_path / "test.txt", TEST))
    train = str(write(tmp_path / "train.txt", TRAIN))
    with pytest.raises(ValueError, match=r"k_shot 2: few-shot examples for the data file .*test\.txt would come "
                                         r"from that very file.*--fewshot_data.*--k_shot 0"):
        load_eval_data(test, "", 0, 2)
    with pytest.raises(ValueError, match=r"would come from the test split of .*test\.txt, the data being scored"):
        load_eval_data(test, "", 0, 2, fewshot_data=str(tmp_path / "." / "test.txt"))  # same file, other spelling
    data, pool = load_eval_data(test, "", 0, 2, fewshot_data=train)
    (record,) = build_prompts(data, "json", k_shot=2, fewshot_pool=pool)
    user = record["messages"][1]["content"]
    shown = [line.removeprefix("Example sentence: ") for line in user.splitlines() if line.startswith("Example sent")]
    assert sorted(shown) == ["IBM hires", "Mary visited Rome"]
    # Registered sets: the train split is the pool, so scoring the train split with examples is refused too.
    with pytest.raises(ValueError, match="train split of conll2003, the data being scored"):
        load_eval_data("conll2003", "train", 1, 2)
    assert load_eval_data("conll2003", "test", 1, 2)[1].split == "train"


def test_label_map_renames_a_files_types_and_gives_them_known_descriptions(tmp_path):
    test = str(write(tmp_path / "test.txt", TEST))
    train = str(write(tmp_path / "train.txt", TRAIN))
    conll_map = {"PER": "person", "LOC": "location", "ORG": "organisation", "MISC": "misc"}
    data, pool = load_eval_data(test, "", 0, 2, fewshot_data=train, label_map=conll_map)
    assert data.types == ["location", "person"] and pool.types == ["location", "organisation", "person"]
    assert data.sentences[0].gold() == {"person": ["John"], "location": ["Paris"]}
    known = conll_descriptions(default_data_dir())  # what a model tuned on CoNLL-2003 read in its prompts
    assert data.descriptions == {"location": known["location"], "person": known["person"]}
    (record,) = build_prompts(data, "json", k_shot=0)
    assert record["gold"] == {"location": ["Paris"], "person": ["John"]} and known["person"] in \
        record["messages"][1]["content"]
    with pytest.raises(ValueError, match=r"--label_map: 'PRE' is not a type of .*test\.txt, whose types 'PER' "
                                         r"the map leaves unmapped"):
        load_eval_data(test, "", 0, 0, label_map={"PRE": "person", "LOC": "location"})
    # Registered sets already use the model's names: never renamed.
    assert load_eval_data("conll2003", "test", 1, 0, label_map={"person": "human"})[0].types[-1] == "person"
    with pytest.raises(ConfigError, match=r"--label_map PER=: both sides must be type names"):
        parse_config(evaluate.EvalConfig, ["--label_map", "PER=,LOC=location"])


def test_cli_checks_user_data_before_loading_the_model(tmp_path):
    test = str(write(tmp_path / "test.txt", TEST))
    # The model folder passes the path check but holds no model, so loading it would fail: the data error is what is reported,
    # so it came first.
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "empty_model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="would come from that very file"):
        evaluate.main(["--model", str(tmp_path / "empty_model"), "--dataset", test, "--out_dir", str(tmp_path)])


def test_cli_scores_a_label_mapped_file_with_examples_from_the_named_file(tmp_path):
    test = str(write(tmp_path / "test.txt", TEST))
    train = str(write(tmp_path / "train.txt", TRAIN))
    evaluate.main(["--dataset", test, "--fewshot_data", train, "--label_map", "PER=person,LOC=location",
                   "--format", "json", "--max_new_tokens", "4", "--out_dir", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    (sentence,) = saved["results"][test]["sentences"]
    assert sentence["gold"] == {"location": ["Paris"], "person": ["John"]}
    assert saved["config"]["label_map"] == {"PER": "person", "LOC": "location"}


def test_grpo_prompts_and_eval_use_the_label_map_and_never_score_their_own_examples(tmp_path, smollm2_tokenizer):
    import train_grpo
    from ner.evaluation import make_eval_fn

    train = str(write(tmp_path / "train.txt", TRAIN))
    test = str(write(tmp_path / "test.txt", TEST))
    cfg = parse_config(train_grpo.NERGRPOConfig, ["--dataset", train, "--label_map", "PER=person,LOC=location",
                                                  "--format", "json", "--k_shot", "1", "--reward_weights", "f1=1"])
    prompts, _ = train_grpo.build_train_prompts(cfg, smollm2_tokenizer)
    assert [p["gold"] for p in prompts] == [{"location": ["Rome"], "ORG": [], "person": ["Mary"]},
                                            {"location": [], "ORG": ["IBM"], "person": []}]
    # The trainer's eval set is checked when the eval function is made, before any training step.
    with pytest.raises(ValueError, match=r"split 'dev' of .*test\.txt: a single data file has no splits"):
        make_eval_fn(None, smollm2_tokenizer, test, "dev", 1, "json", 1, 0, 8)
    with pytest.raises(ValueError, match="would come from that very file"):
        make_eval_fn(None, smollm2_tokenizer, test, "", 1, "json", 1, 0, 8)
    make_eval_fn(None, smollm2_tokenizer, test, "", 1, "json", 1, 0, 8, fewshot_data=train)


def test_schema_file_gives_the_descriptions_of_the_users_types(tmp_path):
    schema = write(tmp_path / "types.yaml", "drug: a medicine or other chemical given to patients\n"
                                            "person: a human being, named\n")
    recipe = {"person": "recipe's person", "location": "recipe's location"}
    assert evaluate.prompt_descriptions("my/test.txt", recipe, str(schema)) == {  # the file wins where both say
        "person": "a human being, named", "location": "recipe's location",
        "drug": "a medicine or other chemical given to patients"}
    assert evaluate.prompt_descriptions("my/test.txt", recipe, "") == recipe
    # A registered data set is scored by its own definitions, never the recipe's (a schema file still applies).
    assert evaluate.prompt_descriptions("crossner_politics", recipe, "") is None
    assert evaluate.prompt_descriptions("crossner_politics", recipe, str(schema)) == {
        "person": "a human being, named", "drug": "a medicine or other chemical given to patients"}
    # A broken schema file is reported before any model loads (this folder passes the path check, fails to load).
    bad = write(tmp_path / "bad.yaml", "drug: [not, a, description]\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    test = str(write(tmp_path / "test.txt", TEST))
    with pytest.raises(ValueError, match="bad.yaml"):
        evaluate.main(["--model", str(tmp_path / "model"), "--dataset", test, "--k_shot", "0", "--schema", str(bad),
                       "--out_dir", str(tmp_path / "out")])
