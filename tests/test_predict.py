"""predict.py and what it stands on: raw-text tokens and character offsets (by hand), label sets, the prompt recipe
stored with SFT checkpoints, and the CLI end to end on a tiny trained checkpoint and on the embedded default."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ner.grounding import bio_tags, ground_entities, tokenize
from ner.predict import PredictInputError, prompt_setup, read_inputs
from ner.prompts import build_prompts, format_answer, render_prompt
from ner.recipe import RECIPE_FILE, build_recipe, read_recipe, recipe_records
from ner.schema import SchemaError, resolve_labels
from ner.types import Entity, NERDataset, Sentence

ROOT = Path(__file__).resolve().parents[1]
RAW = "Ann met Bob, then Ann flew to St. Louis."
# Character offsets of RAW, counted by hand: A0 n1 n2 _3 m4 e5 t6 _7 B8 o9 b10 ,11 _12 t13 h14 e15 n16 _17
# A18 n19 n20 _21 f22 l23 e24 w25 _26 t27 o28 _29 S30 t31 .32 _33 L34 o35 u36 i37 s38 .39
RAW_TOKENS = [("Ann", 0, 3), ("met", 4, 7), ("Bob", 8, 11), (",", 11, 12), ("then", 13, 17), ("Ann", 18, 21),
              ("flew", 22, 26), ("to", 27, 29), ("St", 30, 32), (".", 32, 33), ("Louis", 34, 39), (".", 39, 40)]


def _offsets(entities: list[dict]) -> list[tuple]:
    return [(e["text"], e["type"], e["start"], e["end"]) for e in entities]


# ------------------------------------------------------------------------------------------ tokens and offsets
def test_tokenize_keeps_character_spans_of_the_raw_text():
    assert [(t.text, t.start, t.end) for t in tokenize(RAW)] == RAW_TOKENS
    # Abbreviations, numbers with separators, inner hyphens/apostrophes stay whole; other punctuation splits.
    assert [t.text for t in tokenize("U.S. troops (3,000) don't re-enter.")] == [
        "U.S.", "troops", "(", "3,000", ")", "don't", "re-enter", "."]


def test_first_occurrence_grounding_by_hand():
    tokens = tokenize(RAW)
    pred = {"person": ["Ann", "Bob", "Ann", "Ann", "Carl"], "location": ["St . Louis"]}
    found, ungrounded = ground_entities(RAW, tokens, pred, ["location", "person"])
    # Each "Ann" claims the next unclaimed one; the third has none left, "Carl" is not in the text; the location
    # written with the prompt's spacing maps back to the raw "St. Louis".
    assert _offsets(found) == [("Ann", "person", 0, 3), ("Bob", "person", 8, 11), ("Ann", "person", 18, 21),
                               ("St. Louis", "location", 30, 39)]
    assert ungrounded == [{"text": "Ann", "type": "person"}, {"text": "Carl", "type": "person"}]
    assert all(RAW[e["start"]:e["end"]] == e["text"] for e in found)


def test_all_occurrences_and_types_do_not_compete():
    text = "Paris, Paris and Paris Hilton."
    tokens = tokenize(text)
    found, ungrounded = ground_entities(text, tokens, {"location": ["Paris"], "person": ["Paris Hilton"]},
                                        ["location", "person"], occurrences="all")
    assert _offsets(found) == [("Paris", "location", 0, 5), ("Paris", "location", 7, 12),
                               ("Paris Hilton", "person", 17, 29), ("Paris", "location", 17, 22)]
    assert ungrounded == []
    first, _ = ground_entities(text, tokens, {"location": ["Paris"]}, ["location"])
    assert _offsets(first) == [("Paris", "location", 0, 5)]
    assert ground_entities(text, tokens, None, ["location"]) == ([], [])  # unparseable answer: nothing


def test_bio_tags_by_hand_and_overlaps_left_out():
    text = "Paris and Paris Hilton."
    found, _ = ground_entities(text, tokenize(text), {"location": ["Paris"], "person": ["Paris Hilton"]},
                               ["location", "person"], occurrences="all")
    # tokens: Paris and Paris Hilton . ; the longer person span wins the overlap at token 2
    assert bio_tags(5, found) == ["B-location", "O", "B-person", "I-person", "O"]


# ------------------------------------------------------------------------------------------------ label sets
def test_registered_label_set_is_what_the_data_set_gives_prompts():
    from ner.data import load_ner_dataset

    for name in ("conll2003", "crossner_music"):
        data = load_ner_dataset(name, "dev")
        labels = resolve_labels(name)
        assert labels.types == data.types and labels.descriptions == data.descriptions


def test_schema_files_and_inline_labels(tmp_path):
    (tmp_path / "s.yaml").write_text("drug: A medicine, e.g. aspirin.\ndose:   An amount   of a drug.\n")
    labels = resolve_labels(str(tmp_path / "s.yaml"))
    assert labels.types == ["drug", "dose"]
    assert labels.descriptions == {"drug": "A medicine, e.g. aspirin.", "dose": "An amount of a drug."}
    (tmp_path / "s.json").write_text('["person", "location"]')
    assert resolve_labels(str(tmp_path / "s.json")).types == ["person", "location"]
    inline = resolve_labels("drug=A medicine, e.g. aspirin.;person")
    assert inline.types == ["drug", "person"] and inline.descriptions["drug"] == "A medicine, e.g. aspirin."
    assert inline.descriptions["person"] == "The name of a person, e.g. Marie Antoinette, John Smith."
    assert resolve_labels("person,location").types == ["person", "location"]


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "drug: a\n  dose: b: c\n", r"bad\.yaml, line 2: invalid YAML"),
    ("dup.json", '{"drug": "a",\n "drug": "b"}', r"dup\.json: type 'drug' is listed twice"),
    ("bad.json", '{"drug": "a",\n}', r"bad\.json, line 2: invalid JSON"),
    ("scalar.yaml", "just text\n", r"scalar\.yaml: expected a mapping of type: description"),
    ("empty.yaml", "{}\n", r"empty\.yaml: no entity types"),
    ("space.yaml", "drug name: a\n", r"space\.yaml: type name 'drug name' must be"),
    ("nodesc.yaml", "drug: ''\n", r"nodesc\.yaml: the description of 'drug' must be a non-empty string"),
])
def test_bad_schema_file_names_file_and_problem(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(SchemaError, match=message):
        resolve_labels(str(tmp_path / name))


def test_bad_inline_labels_and_missing_file():
    with pytest.raises(SchemaError, match=r"missing\.yaml: schema file not found"):
        resolve_labels("missing.yaml")
    with pytest.raises(SchemaError, match="not a registered data set"):
        resolve_labels("conll2004")
    with pytest.raises(SchemaError, match="an empty item"):
        resolve_labels("person,,location")
    with pytest.raises(SchemaError, match="listed twice"):
        resolve_labels("person,person")


# ------------------------------------------------------------------------------------------------ the recipe
def test_recipe_few_shot_examples_are_the_samplers_draw():
    """A k-shot recipe stores the examples build_prompts draws for a sentence with id "prompt_recipe", so its prompt
    for that sentence must equal build_prompts' own (sampler path vs stored path)."""
    from ner.data import load_ner_dataset

    pool = load_ner_dataset("conll2003", "train")
    tokens = "Ann met Bob in Paris .".split()
    for fmt in ("tagged", "json"):
        recipe = json.loads(json.dumps(build_recipe(fmt, pool.types, pool.descriptions, k_shot=2,
                                                    fewshot_pool=pool)))  # through JSON, as stored
        data = NERDataset("x", "test", [Sentence(tokens, id="prompt_recipe")], pool.types, pool.descriptions)
        expected = build_prompts(data, fmt, k_shot=2, fewshot_pool=pool)
        assert [r["messages"] for r in recipe_records(recipe, [tokens])] == [r["messages"] for r in expected]
        assert "Example sentence:" in expected[0]["messages"][1]["content"]


def test_recipe_file_errors_name_the_file(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / RECIPE_FILE).write_text("{not json")
    from ner.recipe import RecipeError

    with pytest.raises(RecipeError, match=rf"{RECIPE_FILE}: not valid JSON"):
        read_recipe(str(folder))
    (folder / RECIPE_FILE).write_text(json.dumps({"format": "xml", "types": [], "descriptions": {}, "k_shot": 0,
                                                  "stop": []}))
    with pytest.raises(RecipeError, match="format 'xml' is not one of"):
        read_recipe(str(folder))


def test_extra_checkpoint_file_may_not_replace_a_checkpoint_file(tmp_path, smollm2_tokenizer):
    from grpo.checkpoint import save_checkpoint
    from grpo.models import tiny_llama

    model = tiny_llama(vocab_size=len(smollm2_tokenizer), hidden=16, layers=1, heads=2)
    path = save_checkpoint(tmp_path, 1, model, None, None, None, {}, extra_files={"note.txt": "hello"})
    assert (path / "note.txt").read_text() == "hello" and (path / "COMPLETE").is_file()
    with pytest.raises(ValueError, match="'config.json': not a plain file name, or it would replace"):
        save_checkpoint(tmp_path, 2, model, None, None, None, {}, extra_files={"config.json": "{}"})
    assert not (tmp_path / "checkpoint-0000002").exists()


# ------------------------------------------------------------------------------------- a tiny trained checkpoint
TRAIN_TOKENS = [t for t, _, _ in RAW_TOKENS]
DESCRIPTIONS = {"location": "A place.", "person": "A human."}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """train_sft.py (in process) on one tagged sentence until the tiny char-level model answers it by heart.
    The CoT file holds messages built by ner.prompts directly: the reference the recipe must rebuild."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_task import char_tokenizer, tiny_policy

    import train_sft

    root = tmp_path_factory.mktemp("tiny_run")
    tiny_policy().save_pretrained(root / "tiny")
    char_tokenizer().save_pretrained(root / "tiny")
    sentence = Sentence(TRAIN_TOKENS, [Entity("person", 0, 1, "Ann"), Entity("person", 2, 3, "Bob"),
                                       Entity("person", 5, 6, "Ann"), Entity("location", 8, 11, "St . Louis")], "s0")
    records = build_prompts(NERDataset("tiny", "train", [sentence], ["location", "person"], DESCRIPTIONS),
                            "tagged", k_shot=0)
    with open(root / "cot.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({**r, "accepted": True,
                                "completion": format_answer(r["gold"], "tagged", r["types"], "names")}) + "\n")
    state = train_sft.main(["--model", str(root / "tiny"), "--data", str(root / "cot.jsonl"), "--dataset", "",
                            "--max_steps", "150", "--lr", "3e-3", "--warmup_ratio", "0", "--lr_scheduler", "constant",
                            "--batch_size", "2", "--max_len", "512", "--out_dir", str(root / "run")])
    assert state["loss"] < 0.05
    return root, records


def test_sft_checkpoint_stores_recipe_and_stop_string(tiny_run):
    from grpo.models import load_tokenizer

    root, records = tiny_run
    ckpt = root / "run" / "checkpoint-0000150"
    recipe, path = read_recipe(str(root / "run"))  # the run folder resolves to its newest checkpoint
    assert path == ckpt / RECIPE_FILE
    assert json.loads((ckpt / "generation_config.json").read_text())["stop_strings"] == ["</entity>"]
    assert (recipe["format"], recipe["types"], recipe["descriptions"], recipe["k_shot"], recipe["stop"]) == (
        "tagged", ["location", "person"], DESCRIPTIONS, 0, ["</entity>"])
    # predict's prompt for the training sentence, rendered, is the training prompt byte for byte
    tok = load_tokenizer(str(ckpt))
    rebuilt = recipe_records(recipe, [TRAIN_TOKENS])
    assert [render_prompt(tok, r) for r in rebuilt] == [render_prompt(tok, r) for r in records]


def _predict(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "predict.py", *args], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_predict_cli_on_the_tiny_checkpoint(tiny_run, tmp_path):
    root, _ = tiny_run
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "a", "text": RAW}) + "\n\n"
                                       + json.dumps({"text": "Zzz qqq ."}) + "\n")
    out = tmp_path / "out.jsonl"
    proc = _predict(["--model", str(root / "run"), "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
                     "--max_new_tokens", "60", "--show_reasoning"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labels: location, person (from the recipe); format tagged" in proc.stderr
    first, second = [json.loads(line) for line in out.read_text().splitlines()]
    assert (first["id"], first["line"], first["text"], first["format_ok"]) == ("a", 1, RAW, True)
    assert _offsets(first["entities"]) == [("Ann", "person", 0, 3), ("Bob", "person", 8, 11),
                                           ("St. Louis", "location", 30, 39)]
    assert [r["completion"] for r in first["reasoning"]] == ["<think>names</think> <entity>St . Louis</entity>",
                                                             "<think>names</think> <entity>Ann, Bob</entity>"]
    # an unseen sentence: whatever the model writes, the row is there and every reported span is real text
    assert second["line"] == 3 and second["text"] == "Zzz qqq ."
    assert all(second["text"][e["start"]:e["end"]] == e["text"] for e in second["entities"])
    again = _predict(["--model", str(root / "run"), "--input", str(tmp_path / "in.jsonl"), "--output", str(out)])
    assert again.returncode == 2 and "exists; pass --overwrite" in again.stderr


def test_predict_bio_and_all_occurrences_in_process(tiny_run, capsys):
    import predict

    root, _ = tiny_run
    predict.main(["--model", str(root / "run"), RAW, "--occurrences", "all", "--format", "bio",
                  "--max_new_tokens", "60"])
    lines = capsys.readouterr().out.split("\n")
    assert lines == ["Ann\tB-person", "met\tO", "Bob\tB-person", ",\tO", "then\tO", "Ann\tB-person", "flew\tO",
                     "to\tO", "St\tB-location", ".\tI-location", "Louis\tI-location", ".\tO", "", ""]
    # --guided_json guides json answers only: this checkpoint's recipe is tagged, so nothing changes.
    predict.main(["--model", str(root / "run"), RAW, "--occurrences", "all", "--format", "bio",
                  "--max_new_tokens", "60", "--guided_json", "true"])
    assert capsys.readouterr().out.split("\n") == lines


@pytest.mark.slow
def test_predict_cli_on_the_embedded_default_from_stdin(tmp_path):
    (tmp_path / "labels.yaml").write_text("person: A human being.\ncity: A city.\n")
    proc = _predict(["--labels", str(tmp_path / "labels.yaml"), "--max_new_tokens", "12", "--show_reasoning"],
                    stdin="Angela Merkel visited Paris.\n\nBerlin is big.\n")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "labels: person, city (from labels.yaml); format json" in proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["line"], r["text"]) for r in rows] == [(1, "Angela Merkel visited Paris."), (3, "Berlin is big.")]
    for r in rows:
        assert set(r) >= {"entities", "ungrounded", "format_ok", "errors", "reasoning"}
        assert all(r["text"][e["start"]:e["end"]] == e["text"] and e["type"] in ("person", "city")
                   for e in r["entities"])
        assert r["reasoning"][0]["types"] == ["person", "city"]


# ------------------------------------------------------------------------------------------- input and options
def test_read_inputs_sources_and_errors(tmp_path):
    assert read_inputs("One sentence .") == [{"text": "One sentence ."}]
    assert read_inputs(stdin=io.StringIO("a b\n\n c d \n")) == [{"text": "a b", "line": 1},
                                                                 {"text": " c d ", "line": 3}]
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(PredictInputError, match=r"x\.jsonl, line 2: expected an object with a string \"text\""):
        read_inputs(path=str(tmp_path / "x.jsonl"))
    (tmp_path / "y.txt").write_text("\n  \n")
    with pytest.raises(PredictInputError, match=r"y\.txt: no sentences"):
        read_inputs(path=str(tmp_path / "y.txt"))
    (tmp_path / "z.jsonl").write_text('{"text": "fine"}\n{"text": "  "}\n')
    with pytest.raises(PredictInputError, match=r"z\.jsonl, line 2: empty text"):
        read_inputs(path=str(tmp_path / "z.jsonl"))


def test_prompt_setup_defaults_and_overrides():
    recipe, notes = prompt_setup("smollm2-135m-instruct")  # no recipe: CoNLL labels, json, zero-shot
    assert (recipe["format"], recipe["types"], recipe["k_shot"], recipe["stop"], recipe["max_new_tokens"]) == (
        "json", ["location", "misc", "organisation", "person"], 0, [], 256)
    tagged, _ = prompt_setup("smollm2-135m-instruct", labels="crossner_music", prompt_format="tagged", k_shot=1)
    assert tagged["stop"] == ["</entity>"] and len(tagged["fewshot_examples"]) == len(tagged["types"])
    with pytest.raises(PredictInputError, match="needs examples"):
        prompt_setup("smollm2-135m-instruct", labels="person,city", k_shot=1)
    with pytest.raises(PredictInputError, match="--prompt_format 'xml'"):
        prompt_setup("smollm2-135m-instruct", prompt_format="xml")


def test_user_errors_exit_2_before_the_model_loads(tmp_path, capsys):
    import predict

    (tmp_path / "bad.yaml").write_text("a: [\n")
    for argv, message in ((["--labels", str(tmp_path / "bad.yaml"), "x"], "bad.yaml, line 2: invalid YAML"),
                          (["--format", "csv", "x"], "--format 'csv': expected jsonl or bio"),
                          (["--input", "nope.txt"], "nope.txt: input file not found")):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "Loading weights" not in err


def test_sentence_argument_is_found_between_options():
    from predict import split_sentence_argument

    assert split_sentence_argument(["--model", "m", "Hello there .", "--show_reasoning"]) == [
        "--model", "m", "--show_reasoning", "--text", "Hello there ."]
    assert split_sentence_argument(["--show_reasoning", "Hi", "--k_shot=0"]) == [
        "--show_reasoning", "--k_shot=0", "--text", "Hi"]
    assert split_sentence_argument(["--show_reasoning", "false", "Hi"]) == ["--show_reasoning", "false",
                                                                             "--text", "Hi"]


def test_evaluate_takes_format_and_descriptions_from_the_recipe(tiny_run, tmp_path, capsys):
    """evaluate.py without --format/--k_shot on the tiny checkpoint: the recipe's tagged zero-shot prompt with its
    own type descriptions (not the data file's generic ones) is the one the model answers by heart: F1 = 1."""
    import evaluate

    root, _ = tiny_run
    data = tmp_path / "gold.jsonl"
    data.write_text(json.dumps({"tokens": TRAIN_TOKENS, "entities": [
        {"type": "person", "start": 0, "end": 1}, {"type": "person", "start": 2, "end": 3},
        {"type": "location", "start": 8, "end": 11}]}) + "\n")
    results = evaluate.main(["--model", str(root / "run"), "--dataset", str(data), "--max_new_tokens", "60",
                             "--out_dir", str(tmp_path / "eval"), "--batch_size", "2"])
    assert f"format tagged, k_shot 0 from {root / 'run' / 'checkpoint-0000150' / RECIPE_FILE}" in \
        capsys.readouterr().err
    assert results[str(data)]["report"]["f1"] == 1.0
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())["config"]
    assert (saved["format"], saved["k_shot"]) == ("tagged", 0)


@pytest.mark.vllm
def test_predict_with_the_vllm_engine_answers_as_the_torch_engine():
    """--engine vllm goes through grpo.engine_factory like torch; greedy answers of the same prompts must agree.
    Runs in the vLLM venv only (see tests/test_vllm_engine.py)."""
    from test_vllm_engine import _require_vllm

    import predict

    _require_vllm()
    args = ["--labels", "person,city", "--max_new_tokens", "12", "--show_reasoning", "Angela Merkel visited Paris."]
    by_torch = predict.main(args + ["--engine", "torch"])
    by_vllm = predict.main(args + ["--engine", "vllm"])
    assert [r["completion"] for r in by_vllm[0]["reasoning"]] == [r["completion"] for r in by_torch[0]["reasoning"]]
    assert by_vllm[0]["entities"] == by_torch[0]["entities"]
