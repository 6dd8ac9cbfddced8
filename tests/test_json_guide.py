"""Guided JSON answers (ner/json_guide.py): the fixed text after each list, by hand, and the guide's steers on
SmolLM2's real tokenizer, whose merged tokens ("],", " [],") are the reason a replacement is needed."""
from __future__ import annotations

import pytest

from ner.json_guide import JsonAnswerGuide, next_fixed_text
from ner.parsing import parse_completion

TYPES = ["a", "b", "c"]
THINK = "<think>x</think>\n"


@pytest.mark.parametrize("answer, expected", [
    ('{"entities": {"a": ["X"]', ("", ', "b":', False)),
    ('{"entities": {"a": ["X"],', (",", ', "b":', False)),
    ('{"entities": {"a": ["X"], "c": []', ("", ', "b":', False)),       # a skipped type comes next
    ('{"entities": {"a": [], "b": [], "c": ["Y"]', ("", "}}", True)),
    ('{"entities": {"a": [], "b": [], "c": []}', ("}", "}}", True)),
    ('{"entities": {"a": [], "b": [], "c": [], "c": []', ("", "}}", True)),  # a repeat: only the close is left
    ('{"a": [], "b": [], "c": []', ("", "}", True)),                      # the bare object closes with one brace
    ('{"entities": {"a": ["X]', None),                                    # the "]" is inside a string
    ('{"entities": {"a": ["X"', None),                                    # no list has ended
])
def test_next_fixed_text_by_hand(answer, expected):
    assert next_fixed_text(THINK + answer, TYPES) == expected


def test_no_think_block_no_guidance():
    assert next_fixed_text('{"entities": {"a": ["X"]', TYPES) is None


@pytest.fixture(scope="module")
def guide(smollm2_tokenizer):
    return smollm2_tokenizer, JsonAnswerGuide(smollm2_tokenizer, [TYPES])


def test_guide_writes_the_next_key_after_a_list(guide):
    tok, g = guide
    ids = tok.encode(THINK + '{"entities": {"a": ["X"]', add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids[-1:]) == ['"]']
    steer = g(0, ids)
    assert tok.decode(steer.forced) == ', "b":' and not steer.stop and not steer.replace


def test_guide_replaces_a_merged_token_that_runs_past_the_last_list(guide):
    tok, g = guide
    # The run-away of the LODO models: after the last asked type the model writes "],", not "]}}".
    ids = tok.encode(THINK + '{"entities": {"a": [], "b": [], "c": ["Y', add_special_tokens=False)
    ids += tok.convert_tokens_to_ids(['"],'])
    steer = g(0, ids)
    assert steer.replace and steer.stop
    text = tok.decode(ids[:-1] + list(steer.forced))
    assert text == THINK + '{"entities": {"a": [], "b": [], "c": ["Y"]}}'
    parsed = parse_completion(text, "json", TYPES)
    assert parsed.format_ok and parsed.schema_ok and parsed.entities == {"a": [], "b": [], "c": ["Y"]}


def test_guide_ignores_tokens_without_a_bracket_and_the_think_block(guide):
    tok, g = guide
    assert g(0, tok.encode(THINK + '{"entities": {"a": ["X', add_special_tokens=False)) is None
    assert g(0, tok.encode('<think>a list [1]', add_special_tokens=False)) is None


def test_a_model_that_closes_by_itself_is_not_overridden(guide):
    tok, g = guide
    # Each list end of a well-formed answer, token by token: the guide's forced text is what follows in the answer.
    text = THINK + '{"entities": {"a": ["X"], "b": [], "c": []}}'
    ids = tok.encode(text, add_special_tokens=False)
    steered = 0
    for k in range(1, len(ids) + 1):
        steer = g(0, ids[:k])
        if steer is not None:
            assert not steer.replace
            written = tok.decode(ids[:k])
            assert text.startswith(written + tok.decode(steer.forced))
            steered += 1
    assert steered == 3  # after "X"], after b's [], after c's []


def test_generate_answers_asks_the_guide_by_record(smollm2_tokenizer):
    # Records go to the engine longest first, two per call: the guide must still be asked with record indices.
    from grpo.engine import TorchEngine
    from grpo.guide import Steer
    from grpo.models import tiny_llama
    from ner.evaluation import generate_answers

    model = tiny_llama(vocab_size=len(smollm2_tokenizer), hidden=16, layers=1, heads=2).eval()
    records = [{"prompt_ids": [1] + list(range(100, 100 + n))} for n in (3, 9, 5, 7)]

    def stop_after_index_plus_one(record: int, ids: list[int]):
        return Steer(stop=True) if len(ids) == record + 1 else None

    engine = TorchEngine(model, smollm2_tokenizer, eos_token_ids=[])
    answers = generate_answers(engine, smollm2_tokenizer, records, max_new_tokens=8, batch_size=2, progress=False,
                               guide=stop_after_index_plus_one)
    assert [a.completion_tokens for a in answers] == [1, 2, 3, 4]
    assert all(a.finish_reason == "stop" for a in answers)


def test_evaluate_cli_reports_guided_answers(tmp_path, smollm2_tokenizer):
    import json

    import evaluate
    from grpo.models import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab_size=len(smollm2_tokenizer), hidden=16, layers=1, heads=2).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    evaluate.main(["--model", str(model_dir), "--dataset", "crossner_politics", "--limit", "2", "--format", "json",
                   "--k_shot", "0", "--max_new_tokens", "2", "--guided_json", "true", "--out_dir", str(tmp_path / "o")])
    saved = json.loads((tmp_path / "o" / "report.json").read_text())
    assert saved["results"]["crossner_politics"]["fit"]["guided_answers"] == 0  # 2 random tokens: nothing to guide
    assert "--guided_json" in (tmp_path / "o" / "report.md").read_text()
