"""ner.cot: validation, teachers (template, HTTP against a real local server, local engine), judge, resume."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ner.cot import (EngineTeacher, HTTPTeacher, TemplateTeacher, chat_completions_url, generate_cot, parse_score,
                     read_done_ids, record_id, validate_completion)
from ner.data import DataFormatError, write_jsonl
from ner.prompts import build_prompts
from ner.sft_data import read_cot_records, sft_pairs
from ner.types import Entity, NERDataset, Sentence

ROOT = Path(__file__).resolve().parents[1]
TYPES = ["location", "person"]


def _sentence(i: int, tokens: list[str], ents: list[tuple[str, int, int]]) -> Sentence:
    return Sentence(tokens, [Entity(t, s, e, " ".join(tokens[s:e])) for t, s, e in ents], id=f"s{i}")


def _dataset(n: int = 3) -> NERDataset:
    base = [(["Japan", "beat", "Syria", "."], [("location", 0, 1), ("location", 2, 3)]),
            (["John", "Smith", "lives", "in", "Oslo", "."], [("person", 0, 2), ("location", 4, 5)]),
            (["Nothing", "here", "."], [])]
    sents = [_sentence(i, *base[i % 3]) for i in range(n)]
    return NERDataset("toy", "train", sents, TYPES, {"location": "places", "person": "people"})


def _json_records(n: int = 3) -> tuple[list[dict], dict[str, Sentence]]:
    ds = _dataset(n)
    return build_prompts(ds, "json", k_shot=0), {s.id: s for s in ds.sentences}


# ----------------------------------------------------------------------------- validation

def test_validator_accepts_and_rejects_hand_written_completions():
    rec = _json_records()[0][0]                      # "Japan beat Syria ." : location [Japan, Syria]
    good = '<think>Japan and Syria are countries.</think>\n{"entities": {"location": ["Japan", "Syria"], "person": []}}'
    completion, reason = validate_completion(good, rec)
    assert (completion, reason) == (good, "")
    # Same answer with sloppy spacing is accepted and re-rendered canonically.
    sloppy = '<think> Both are countries. </think>  {"entities":{"person":[],"location":["Japan","Syria"]}}'
    completion, reason = validate_completion(sloppy, rec)
    assert reason == "" and completion == (
        '<think>Both are countries.</think>\n{"entities": {"location": ["Japan", "Syria"], "person": []}}')
    bad = {
        "format": ['{"entities": {"location": ["Japan", "Syria"], "person": []}}',                 # no think
                   '<think>x</think>\n{"entities": {"location": ["Japan", "Syria"]}}',              # missing type
                   '<think>x</think>\n{"entities": {"location": ["Japan", "Syria"], "person": []}} ok',  # trailing
                   '<think>x'],                                                                     # truncated
        "empty_think": ['<think> </think>\n{"entities": {"location": ["Japan", "Syria"], "person": []}}'],
        "disagree": ['<think>x</think>\n{"entities": {"location": ["Japan"], "person": []}}',
                     '<think>x</think>\n{"entities": {"location": ["Japan", "Syria"], "person": ["Syria"]}}'],
    }
    for want, texts in bad.items():
        for text in texts:
            assert validate_completion(text, rec) == (None, want), text
    # The normalized metric forgives case/articles that exact match does not.
    loose = '<think>x</think>\n{"entities": {"location": ["japan", "the Syria"], "person": []}}'
    assert validate_completion(loose, rec)[1] == "disagree"
    assert validate_completion(loose, rec, metric_mode="normalized")[1] == ""


def test_validator_tagged_format():
    ds = _dataset()
    rec = [r for r in build_prompts(ds, "tagged", k_shot=0) if r["sentence_id"] == "s1" and r["types"] == ["person"]][0]
    assert record_id(rec) == "s1#person"
    assert validate_completion("<think>A name.</think> <entity>John Smith</entity>", rec)[1] == ""
    assert validate_completion("<think>A name.</think> <entity>John</entity>", rec)[1] == "disagree"
    assert validate_completion("<think>A name.</think> John Smith", rec)[1] == "format"


def test_template_teacher_writes_accepted_records(tmp_path):
    records, sentences = _json_records(3)
    out = tmp_path / "cot.jsonl"
    stats = generate_cot(records, sentences, TemplateTeacher(), out, "rationalise", log=lambda s: None)
    assert {k: stats[k] for k in ("total", "parsed", "agreed", "judged_ok")} == \
        {"total": 3, "parsed": 3, "agreed": 3, "judged_ok": 3}
    assert json.loads(Path(str(out) + ".stats.json").read_text())["total"] == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["s0", "s1", "s2"] and all(r["teacher"] == "template" for r in rows)
    assert rows[1]["completion"].startswith('<think>"John Smith": a person\'s name, so person. '
                                            '"Oslo": a place, so location.</think>')
    # SFT pairs: prompt = chat-rendered student messages (no gold hint), completion = the CoT record.
    class ToyTemplate:  # minimal chat template stand-in: render_prompt only calls apply_chat_template
        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return "".join(f"[{m['role']}]{m['content']}" for m in messages) + "[assistant]"
    pairs = sft_pairs(read_cot_records(out), ToyTemplate())
    assert pairs[0][0].endswith("Sentence: Japan beat Syria .[assistant]") and "correct answer" not in pairs[0][0]
    assert pairs[0][1] == rows[0]["completion"]


GOOD_COT = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
            "completion": "<think>r</think> <entity></entity>", "accepted": True, "gold": {"person": []}}


@pytest.mark.parametrize("field,value,problem", [
    ("messages", "hello", "field 'messages' must be a non-empty list of {role, content} objects, got \"hello\""),
    ("messages", [], "field 'messages' must be a non-empty list"),
    ("messages", [{"role": "user", "content": "u"}, {"role": "user"}], "field 'messages'[1] must be an object"),
    ("messages", ["hello"], "field 'messages'[0] must be an object"),
    ("completion", None, "field 'completion' must be a string, got null"),
    ("accepted", "yes", "field 'accepted' must be true or false"),
    ("gold", None, "field 'gold' must be an object"),
])
def test_bad_cot_records_name_file_line_and_field(tmp_path, field, value, problem):
    path = tmp_path / "cot.jsonl"
    bad = {**GOOD_COT, field: value}
    path.write_text(json.dumps(GOOD_COT) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataFormatError) as err:
        read_cot_records(path)
    assert str(err.value).startswith(f"{path}, line 3: ") and problem in str(err.value)


def test_cot_record_that_is_not_an_object_or_lacks_fields(tmp_path):
    path = tmp_path / "cot.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataFormatError, match=r"cot\.jsonl, line 1: CoT record must be a JSON object, got \[1, 2\]"):
        read_cot_records(path)
    path.write_text(json.dumps({"messages": GOOD_COT["messages"]}) + "\n")
    with pytest.raises(DataFormatError, match=r"line 1: CoT record lacks \['completion', 'accepted'\]"):
        read_cot_records(path)
    path.write_text(json.dumps(GOOD_COT) + "\n")
    assert read_cot_records(path) == [GOOD_COT]


# ----------------------------------------------------------------------------- HTTP teacher

class _Server:
    """A real OpenAI-format chat server on 127.0.0.1. It answers with the gold it finds in a rationalise prompt,
    a fixed (wrong for most sentences) answer otherwise, and judge prompts with a score chosen per sentence."""

    def __init__(self, fail_first: int = 0, delay: float = 0.0, judge_scores: dict[str, int] | None = None):
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        self.fail_first, self.delay, self.judge_scores = fail_first, delay, judge_scores or {}
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    fail = len(server.requests) <= server.fail_first
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": "not found"})
                if fail:
                    return self._send(503, {"error": "busy"})
                time.sleep(server.delay)
                self._send(200, {"choices": [{"message": {"role": "assistant",
                                                          "content": server.answer(body["messages"])}}]})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def answer(self, messages: list[dict]) -> str:
        user = messages[-1]["content"]
        if messages[0]["content"].startswith("You grade"):
            return next((f"Score: {v}" for k, v in self.judge_scores.items() if k in user), "Score: 10")
        m = re.search(r"The correct answer is:\n(.*)\n", user)
        answer = m.group(1) if m else '{"entities": {"location": ["Japan", "Syria"], "person": []}}'
        return f"<think>Reasoning about the sentence.</think>\n{answer}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made: list[_Server] = []
    yield lambda **kw: made.append(_Server(**kw)) or made[-1]
    for s in made:
        s.close()


def test_http_teacher_retries_sends_key_and_is_validated(server, tmp_path, monkeypatch):
    srv = server(fail_first=2)
    monkeypatch.setenv("TEST_COT_KEY", "sk-test")
    teacher = HTTPTeacher(srv.url, model="teacher-x", api_key_env="TEST_COT_KEY", retries=3, backoff=0.01,
                          concurrency=1, timeout=5)
    records, sentences = _json_records(3)
    stats = generate_cot(records, sentences, teacher, tmp_path / "h.jsonl", "rationalise", log=lambda s: None)
    # 3 records + 2 retried 503s; every request carried the key and the model name.
    assert len(srv.requests) == 5 and set(srv.auth) == {"Bearer sk-test"}
    assert {r["model"] for r in srv.requests} == {"teacher-x"}
    assert "The correct answer is:" in srv.requests[-1]["messages"][-1]["content"]
    assert (stats["total"], stats["agreed"], stats["judged_ok"]) == (3, 3, 3)

    # Free mode: no gold in the prompt; the server's fixed answer is right only for sentence s0.
    srv2 = server()
    stats = generate_cot(records, sentences, HTTPTeacher(srv2.url, retries=0), tmp_path / "f.jsonl", "free",
                         log=lambda s: None)
    assert all("correct answer" not in r["messages"][-1]["content"] for r in srv2.requests)
    assert (stats["total"], stats["parsed"], stats["agreed"]) == (3, 3, 1)
    assert stats["reject_reasons"] == {"disagree": 2}


def test_http_judge_threshold(server, tmp_path):
    srv = server(judge_scores={"John Smith": 8, "Nothing here": 9})
    teacher = HTTPTeacher(srv.url, retries=0)
    records, sentences = _json_records(3)
    stats = generate_cot(records, sentences, teacher, tmp_path / "j.jsonl", "rationalise", judge=teacher,
                         judge_threshold=9, log=lambda s: None)
    # s0 scored 10, s1 8 (< 9: rejected), s2 9 (kept at the threshold).
    rows = {json.loads(line)["id"]: json.loads(line) for line in (tmp_path / "j.jsonl").read_text().splitlines()}
    assert {k: (r["judge_score"], r["accepted"]) for k, r in rows.items()} == \
        {"s0": (10, True), "s1": (8, False), "s2": (9, True)}
    assert (stats["agreed"], stats["judged_ok"]) == (3, 2) and rows["s1"]["reject_reason"] == "judge"
    assert [parse_score(x) for x in ("9", "I give it 10/10", "score: 0", None, "7.")] == [9, 10, 0, 0, 7]


def test_http_client_error_is_not_retried_and_nothing_is_written(server, tmp_path):
    srv = server()
    teacher = HTTPTeacher(srv.url + "/wrong/chat/completions", retries=3, backoff=0.01)
    assert teacher.url.endswith("/wrong/chat/completions")
    assert chat_completions_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    records, sentences = _json_records(2)
    stats = generate_cot(records, sentences, teacher, tmp_path / "e.jsonl", "rationalise", log=lambda s: None)
    assert len(srv.requests) == 2 and stats["total"] == 0 and stats["teacher_errors_this_run"] == 2
    assert "404" in teacher.last_error
    # A judge that fails leaves the record unwritten too (a resumed run judges it again), never "rejected".
    stats = generate_cot(records, sentences, TemplateTeacher(), tmp_path / "e.jsonl", "rationalise",
                         judge=teacher, log=lambda s: None)
    assert stats["total"] == 0 and stats["teacher_errors_this_run"] == 2 and len(srv.requests) == 4


# ----------------------------------------------------------------------------- local engine teacher

def test_engine_teacher_output_is_validated_not_trusted(tmp_path, smollm2_tokenizer):
    from grpo.models import tiny_llama

    model = tiny_llama(vocab_size=49152, hidden=32, layers=1, heads=4)
    teacher = EngineTeacher("tiny", max_new_tokens=6, model=model, tokenizer=smollm2_tokenizer)
    records, sentences = _json_records(2)
    stats = generate_cot(records, sentences, teacher, tmp_path / "e.jsonl", "rationalise", log=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "e.jsonl").read_text().splitlines()]
    # A random model writes 6 tokens of noise: recorded raw, rejected as unparseable, never crashing.
    assert stats["total"] == 2 and stats["parsed"] == 0 and all(r["reject_reason"] == "format" for r in rows)
    assert all(isinstance(r["raw"], str) and r["teacher"] == "tiny" for r in rows)


# ----------------------------------------------------------------------------- resume

def test_torn_last_line_is_truncated(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "sen')
    assert read_done_ids(path) == {"a", "b"}
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl:2"):
        read_done_ids(path)


def test_killed_generation_resumes_without_duplicates(server, tmp_path):
    ds = _dataset(12)
    data = tmp_path / "toy.jsonl"
    write_jsonl(ds.sentences, data)
    out = tmp_path / "cot.jsonl"
    srv = server(delay=0.15)
    args = ["--dataset", str(data), "--split", "train", "--format", "json", "--teacher", srv.url,
            "--batch_size", "1", "--concurrency", "1", "--retries", "0", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ner.cot", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    first = out.read_text().count("\n")
    assert 3 <= first < 12, "the run should have been killed part-way"
    with open(out, "a") as f:           # and a record torn mid-write, as a kill inside write() would leave
        f.write('{"id": "s11", "sentence": "Japan')
    from ner.cot import main

    stats = main(args)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"s{i}" for i in range(12)) and len(ids) == len(set(ids)) == 12
    assert stats["total"] == 12 and stats["judged_ok"] == 12
    # The server saw each record once, except those whose response was in flight when the run was killed.
    assert 12 <= len(srv.requests) <= 12 + 2


def test_limit_empty_answers_keeps_every_entity_record_and_order():
    from ner.prompts import limit_empty_answers

    records = [{"id": i, "gold": {"person": ["A"] if i in (1, 4) else []}} for i in range(7)]  # 2 with, 5 empty
    kept = limit_empty_answers(records, max_ratio=1.0, seed=3)
    ids = [r["id"] for r in kept]
    # 1.0 × 2 entity records = 2 empty ones survive; the entity records 1 and 4 always do; order is kept.
    assert len(ids) == 4 and {1, 4} <= set(ids) and ids == sorted(ids)
    assert kept == limit_empty_answers(records, max_ratio=1.0, seed=3)           # deterministic
    assert len(limit_empty_answers(records, max_ratio=0.0)) == 2
    assert limit_empty_answers(records, max_ratio=-1) == records == limit_empty_answers(records, max_ratio=10)
