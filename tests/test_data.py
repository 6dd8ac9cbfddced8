"""Readers, errors, registry and descriptions of ner.data. Expected spans are written out by hand; registry counts
come from /work/shared/data/README.md (computed there by an independent script)."""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from ner.data import (CONLL_ABBREVIATIONS, REGISTRY, DataFormatError, detect_scheme, hub_row_to_sentence,
                      hub_tag_names, load_ner_dataset, read_any, read_column_file, read_jsonl, read_mrc_json,
                      tags_to_spans, write_jsonl)
from ner.descriptions import describe, generic_description
from ner.types import Entity, Sentence

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Three sentences in four tag schemes. Expected (type, start, end exclusive, text), by hand:
TOKENS = [["John", "Smith", "lives", "in", "New", "York", "City", "."],
          ["Real", "Madrid", "Barcelona"],
          ["EU", "rejects", "German", "call"]]
EXPECTED = [[("PER", 0, 2, "John Smith"), ("LOC", 4, 7, "New York City")],
            [("ORG", 0, 2, "Real Madrid"), ("ORG", 2, 3, "Barcelona")],  # adjacent, same type
            [("ORG", 0, 1, "EU"), ("MISC", 2, 3, "German")]]
TAGS = {
    "iob2": [["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC", "I-LOC", "O"], ["B-ORG", "I-ORG", "B-ORG"],
             ["B-ORG", "O", "B-MISC", "O"]],
    "iob1": [["I-PER", "I-PER", "O", "O", "I-LOC", "I-LOC", "I-LOC", "O"], ["I-ORG", "I-ORG", "B-ORG"],
             ["I-ORG", "O", "I-MISC", "O"]],
    "bioes": [["B-PER", "E-PER", "O", "O", "B-LOC", "I-LOC", "E-LOC", "O"], ["B-ORG", "E-ORG", "S-ORG"],
              ["S-ORG", "O", "S-MISC", "O"]],
}


def spans(sentences: list[Sentence]) -> list[list[tuple]]:
    return [[(e.type, e.start, e.end, e.text) for e in s.entities] for s in sentences]


def column_text(tags: list[list[str]], tag_first: bool = False, sep: str = "\t", docstart: bool = False,
                trailing: str = "\n\n", extra_cols: int = 0) -> str:
    blocks = []
    for toks, tgs in zip(TOKENS, tags):
        lines = []
        for tok, tag in zip(toks, tgs):
            cols = [tag, tok] if tag_first else [tok] + ["X"] * extra_cols + [tag]
            lines.append(sep.join(cols))
        blocks.append("\n".join(lines))
    head = f"-DOCSTART-{sep}O\n\n" if docstart else ""
    return head + "\n\n".join(blocks) + trailing


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize("scheme", ["iob2", "iob1", "bioes"])
@pytest.mark.parametrize("layout", [
    dict(), dict(tag_first=True), dict(docstart=True), dict(trailing=""), dict(trailing="\n\n\n\n"),
    dict(sep=" ", extra_cols=2, docstart=True), dict(sep="  ")])
def test_column_reader_layouts_and_schemes_give_identical_spans(tmp_path, scheme, layout):
    path = write(tmp_path, "x.bio", column_text(TAGS[scheme], **layout))
    sents = read_column_file(path)
    assert [s.tokens for s in sents] == TOKENS
    assert spans(sents) == EXPECTED


def test_crlf_bom_and_scheme_detection(tmp_path):
    path = write(tmp_path, "crlf.txt", "\ufeff" + column_text(TAGS["iob2"]).replace("\n", "\r\n"))
    assert spans(read_column_file(path)) == EXPECTED
    assert detect_scheme(TAGS["iob2"]) == "iob2"
    assert detect_scheme(TAGS["iob1"]) == "iob1"  # I-PER opens the first sentence
    assert detect_scheme(TAGS["bioes"]) == "bioes"
    assert detect_scheme([["U-X", "O"]]) == "bioes"  # BILOU spelling
    # Lenient IOB2: a stray I-X opens a span (conlleval); it is the same decoding as IOB1.
    assert tags_to_spans(["O", "I-PER", "I-PER", "I-LOC"]) == [("PER", 1, 3), ("LOC", 3, 4)]
    assert tags_to_spans(["B-A", "E-A", "I-A", "S-B"], scheme="bioes") == [("A", 0, 2), ("A", 2, 3), ("B", 3, 4)]


def test_strict_mode_rejects_illegal_starts_except_in_iob1(tmp_path):
    bad = "a\tO\nb\tI-person\n\nc\tB-person\nd\tI-location\n"
    path = write(tmp_path, "strict.txt", bad)
    with pytest.raises(DataFormatError) as err:
        read_column_file(path, strict=True)
    assert "strict.txt" in str(err.value) and "line 2" in str(err.value) and "'I-person' after 'O'" in str(err.value)
    path2 = write(tmp_path, "strict2.txt", bad.replace("b\tI-person", "b\tB-person"))
    with pytest.raises(DataFormatError, match=r"strict2\.txt, line 5: .*'I-location' after 'B-person'"):
        read_column_file(path2, strict=True)
    # Declared IOB1: I- opening a span is legal there. Lenient: same spans, no error.
    assert spans(read_column_file(path, scheme="iob1", strict=True)) == spans(read_column_file(path))
    assert spans(read_column_file(path))[0] == [("person", 1, 2, "b")]


ERROR_CASES = [  # (file name, content, expected line, problem fragment)
    ("one_col.txt", "a\tO\nb\tB-PER\nlonely\n", 3, "one column"),
    ("bad_tag.txt", "a\tO\nb\tX-PER\n", 2, "malformed tag 'X-PER'"),
    ("bad_tag2.txt", "a\tO\n\nb\tB-\n", 3, "malformed tag 'B-'"),
    ("utf8.txt", b"a\tO\nb\xff\tO\n", 2, "invalid UTF-8"),
    ("empty.txt", b"", 1, "empty file"),
    ("blank.txt", "\n\n  \n", 1, "empty file"),
    ("docstart_only.txt", "-DOCSTART-\tO\n\n", 1, "empty file"),
    # A space-separated multi-word token: token-first would read "New" and drop "York", tag-first "York".
    ("space_token.txt", "John B-PER\nlives O\nin O\nNew York B-LOC\n. O\n", 4, "line has 3 columns"),
    ("space_token_tag_first.txt", "B-PER John\nO in\n\nB-LOC New York\n", 4, "line has 3 columns"),
    # The usual count is the most common one, so an odd FIRST line is the one reported.
    ("short_first.txt", "EU B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n", 1, "other lines have 4"),
]


@pytest.mark.parametrize("name,content,line,problem", ERROR_CASES)
def test_column_errors_name_file_line_and_problem(tmp_path, name, content, line, problem):
    path = write(tmp_path, name, content)
    with pytest.raises(DataFormatError) as err:
        read_column_file(path)
    msg = str(err.value)
    assert name in msg and f"line {line}" in msg and problem in msg
    assert err.value.line == line and isinstance(err.value, ValueError)


def test_tab_files_keep_tokens_with_spaces_and_conll_four_columns_read_token_and_tag(tmp_path):
    tab = write(tmp_path, "tab.txt", "I\tO\nlove\tO\nNew York\tB-LOC\n")
    assert [s.tokens for s in read_column_file(tab)] == [["I", "love", "New York"]]
    assert spans(read_column_file(tab)) == [[("LOC", 2, 3, "New York")]]
    conll = write(tmp_path, "conll.txt", "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                                         "German JJ B-NP B-MISC\n")
    assert [s.tokens for s in read_column_file(conll)] == [["EU", "rejects", "German"]]
    assert spans(read_column_file(conll)) == [[("ORG", 0, 1, "EU"), ("MISC", 2, 3, "German")]]


def test_scheme_errors(tmp_path):
    path = write(tmp_path, "s.txt", column_text(TAGS["bioes"]))
    with pytest.raises(DataFormatError, match=r"s\.txt, line 2: tag 'E-PER' is not allowed in the IOB2 scheme"):
        read_column_file(path, scheme="iob2")
    with pytest.raises(DataFormatError, match=r"s\.txt: unknown tag scheme 'bilux'"):
        read_column_file(path, scheme="bilux")


def test_jsonl_roundtrip_and_errors(tmp_path):
    sents = [Sentence(tokens=t, id=f"s{i}", entities=[Entity(ty, s, e, x) for ty, s, e, x in exp])
             for i, (t, exp) in enumerate(zip(TOKENS, EXPECTED))]
    path = tmp_path / "out.jsonl"
    write_jsonl(sents, path)
    assert read_jsonl(path) == sents
    # "text" is optional; unknown-order entities are sorted by position.
    p2 = write(tmp_path, "min.jsonl", '\n{"tokens": ["a", "b", "c"], "entities": [{"type": "T", "start": 2, '
                                      '"end": 3}, {"type": "T", "start": 0, "end": 1}]}\n\n')
    assert spans(read_jsonl(p2)) == [[("T", 0, 1, "a"), ("T", 2, 3, "c")]]
    bad = [('{"tokens": ["a"]}\n{"tokens": ["a"], oops}\n', 2, "bad JSON line"),
           ('{"tokens": ["a", "b"], "entities": [{"type": "T", "start": 1, "end": 3}]}\n', 1, "outside the 2 tokens"),
           ('{"tokens": ["a"], "entities": [{"type": "T", "start": 0, "end": 1, "text": "b"}]}\n', 1,
            "entity text 'b' != tokens"),
           ('\n\n{"tokens": "a b"}\n', 3, "'tokens' list of strings"),
           ('{"tokens": ["a"]}\n{"tokens": ["a"], "entities": null}\n', 2, "field 'entities' must be a list"),
           ('{"tokens": ["a"], "entities": {"type": "T"}}\n', 1, "field 'entities' must be a list"),
           ('{"tokens": ["a"], "entities": [null]}\n', 1, "field 'entities': entity null needs"),
           ('{"tokens": ["a"], "entities": [{"type": "T", "start": false, "end": true}]}\n', 1,
            "integer 'start', 'end'"),
           ('{"tokens": ["a"], "entities": [{"type": "T", "start": 0, "end": 1, "text": 7}]}\n', 1,
            "entity text 7 is not a string")]
    for k, (content, line, problem) in enumerate(bad):
        path = write(tmp_path, f"bad{k}.jsonl", content)
        with pytest.raises(DataFormatError) as err:
            read_jsonl(path)
        assert f"bad{k}.jsonl" in str(err.value) and f"line {line}" in str(err.value) and problem in str(err.value)


def mrc_record(qas: str, context: str, label: str, starts: list[int], ends: list[int]) -> dict:
    return {"context": context, "entity_label": label, "query": f"find {label}", "qas_id": qas,
            "impossible": not starts, "start_position": starts, "end_position": ends,
            "span_position": [f"{s};{e}" for s, e in zip(starts, ends)]}


def test_mrc_reader_groups_records_and_reads_inclusive_ends(tmp_path):
    c0, c1 = "EU rejects German call to boycott British lamb .", "Peter Blackburn"
    records = [mrc_record("0.0", c0, "ORG", [0], [0]), mrc_record("0.1", c0, "PER", [], []),
               mrc_record("0.3", c0, "MISC", [2, 6], [2, 6]),
               mrc_record("1.1", c1, "PER", [0], [1]),  # end 1 inclusive -> "Peter Blackburn"
               mrc_record("2.1", c1, "PER", [], [])]  # same context, another sentence: kept apart
    span_only = {"context": "Ann met Bob", "entity_label": "PER", "span_position": ["0;0", "2;2"]}
    path = write(tmp_path, "mrc.json", json.dumps(records + [span_only]))
    sents = read_mrc_json(path)
    assert [s.tokens for s in sents] == [c0.split(), c1.split(), c1.split(), ["Ann", "met", "Bob"]]
    assert spans(sents) == [[("organisation", 0, 1, "EU"), ("misc", 2, 3, "German"), ("misc", 6, 7, "British")],
                            [("person", 0, 2, "Peter Blackburn")], [],
                            [("person", 0, 1, "Ann"), ("person", 2, 3, "Bob")]]
    assert spans(read_mrc_json(path, label_map={}))[1] == [("PER", 0, 2, "Peter Blackburn")]
    for k, (content, problem) in enumerate([
            ("[\n{\"context\": 1,\n", "line 3: bad JSON"),
            (json.dumps([mrc_record("0.0", "a b", "PER", [1], [2])]), "record 0: span 1..2 (inclusive) outside 2"),
            (json.dumps([mrc_record("0.0", "a b", "PER", [0, 1], [0])]), "record 0: start_position/end_position")]):
        path = write(tmp_path, f"bad{k}.json", content)
        with pytest.raises(DataFormatError) as err:
            read_mrc_json(path)
        assert f"bad{k}.json" in str(err.value) and problem in str(err.value)


# README.md tables: conll2003/test.txt and crossner/ai/dev.txt.
README_COUNTS = {
    ("conll2003", "test"): (3453, 46435, {"location": 1662, "organisation": 1656, "person": 1617, "misc": 693}),
    ("crossner_ai", "validation"): (350, 10919, {
        "misc": 180, "algorithm": 178, "field": 178, "product": 173, "metrics": 147, "task": 147,
        "researcher": 142, "organisation": 94, "conference": 89, "university": 59, "country": 44,
        "location": 42, "person": 41, "programlang": 35}),
}


@pytest.mark.parametrize("name,split", list(README_COUNTS))
def test_registry_counts_match_readme(name, split):
    n_sent, n_tok, by_type = README_COUNTS[(name, split)]
    ds = load_ner_dataset(name, split)
    assert ds.split in ("test", "dev") and len(ds) == n_sent
    assert sum(len(s.tokens) for s in ds.sentences) == n_tok
    assert Counter(e.type for s in ds.sentences for e in s.entities) == by_type
    assert ds.types == sorted(by_type)


def test_registry_errors_paths_env_and_cache(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="crossner_politics"):
        load_ner_dataset("ontonotes", "dev")
    with pytest.raises(ValueError, match="unknown split"):
        load_ner_dataset("conll2003", "heldout")
    (tmp_path / "conll2003").mkdir()
    small = tmp_path / "conll2003" / "test.txt"
    small.write_text(column_text([[t.replace("PER", "person") for t in TAGS["iob2"][0]], *TAGS["iob2"][1:]]))
    monkeypatch.setenv("NER_DATA_DIR", str(tmp_path))
    ds = load_ner_dataset("conll2003", "test")  # no queries.json there: built-in CoNLL descriptions
    assert len(ds) == 3 and "person" in ds.types and "ORG" in ds.types and all(ds.descriptions.values())
    # The cache is keyed on mtime and size: an edited file is re-read.
    small.write_text("only\tB-person\n")
    os.utime(small, ns=(small.stat().st_atime_ns, small.stat().st_mtime_ns + 10**9))
    assert spans(load_ner_dataset("conll2003", "test").sentences) == [[("person", 0, 1, "only")]]
    # A path as the name: types from the data, generic descriptions for unknown types.
    jl = tmp_path / "mine.jsonl"
    jl.write_text('{"tokens": ["x", "y"], "entities": [{"type": "gadget", "start": 1, "end": 2}]}\n')
    ds = load_ner_dataset(str(jl), "test")
    assert ds.types == ["gadget"] and ds.descriptions == {"gadget": generic_description("gadget")}
    assert read_any(jl) == read_any(jl) and read_any(jl) is not read_any(jl)


def test_every_registered_type_has_a_specific_description():
    queries = json.loads((DATA / "conll2003" / "queries.json").read_text())["default"]
    for name in REGISTRY:
        ds = load_ner_dataset(name, "train" if name != "conll2003" else "test")
        assert set(ds.descriptions) == set(ds.types)
        for t, text in ds.descriptions.items():
            assert text and text != generic_description(t), (name, t)
        assert len(set(ds.descriptions.values())) == len(ds.types), name  # no two types share a text
        if name == "conll2003":
            assert ds.descriptions == {CONLL_ABBREVIATIONS[k]: v.strip() for k, v in queries.items()}
    assert describe("person", "music") != describe("person", "politics") != describe("person")


def test_hub_row_conversion_on_classlabel_dataset():
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    features = Features({"id": Value("string"), "tokens": Sequence(Value("string")),
                         "ner_tags": Sequence(ClassLabel(names=names))})
    ds = Dataset.from_dict({"id": ["0", "1"],
                            "tokens": [TOKENS[0], ["EU", "rejects", "German", "call"]],
                            "ner_tags": [[1, 2, 0, 0, 5, 6, 6, 0], [3, 0, 7, 0]]}, features=features)
    tag_names = hub_tag_names(ds.features)
    assert tag_names == names
    sents = [hub_row_to_sentence(row, tag_names, CONLL_ABBREVIATIONS, sid=row["id"]) for row in ds]
    assert spans(sents) == [[("person", 0, 2, "John Smith"), ("location", 4, 7, "New York City")],
                            [("organisation", 0, 1, "EU"), ("misc", 2, 3, "German")]]
    assert sents[1].id == "1" and sents[0].tokens == TOKENS[0]


def test_select_sentences_file_order_or_one_fixed_shuffle_with_disjoint_ranges():
    from ner.data import select_sentences

    sents = [Sentence(id=f"s{i}", tokens=[f"w{i}"], entities=[]) for i in range(50)]
    assert select_sentences(sents, 5, 10) == sents[5:15]          # seed -1: file order, as slicing
    assert select_sentences(sents, 45, 0) == sents[45:]           # limit 0: to the end
    head, tail = select_sentences(sents, 0, 20, seed=3), select_sentences(sents, 20, 0, seed=3)
    assert head == select_sentences(sents, 0, 20, seed=3)         # the same shuffle every call
    assert sorted(s.id for s in head + tail) == sorted(s.id for s in sents)  # disjoint and complete
    assert head != sents[:20] and head != select_sentences(sents, 0, 20, seed=4)


def test_sft_and_grpo_stages_take_disjoint_sentences_of_one_shuffle(smollm2_tokenizer):
    import train_grpo
    from grpo.config import parse_config
    from ner.cot import build_cot_records

    sft_records, _ = build_cot_records("conll2003", "train", "json", limit=40, sentence_seed=11)
    cfg = parse_config(train_grpo.NERGRPOConfig, ["--format", "json", "--k_shot", "0", "--offset", "40",
                                                  "--limit", "40", "--sentence_seed", "11"])
    grpo_prompts, _ = train_grpo.build_train_prompts(cfg, smollm2_tokenizer)
    sft_ids = {r["sentence_id"] for r in sft_records}
    grpo_ids = {r["sentence_id"] for r in grpo_prompts}
    assert len(sft_ids) == 40 and len(grpo_ids) == 40 and not sft_ids & grpo_ids
    # the SFT slice is the head of the split's shuffle, not its first sentences
    assert sft_ids != {f"train.txt:{i}" for i in range(40)}
