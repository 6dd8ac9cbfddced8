"""Stage 1 of ReasoningNER: chain-of-thought data generation, validation and resumable JSONL output.

For every prompt record of a data split (``ner.prompts.build_prompts``) a *teacher* writes
``<think>rationale</think>`` + answer. Teachers:
  * ``template``      no model: the rationale is ``candidate_rationale`` of the gold labels (offline fallback);
  * a model spec      any local model (``grpo.models``), sampled with ``grpo.engine.TorchEngine``;
  * ``http(s)://…``   an OpenAI-compatible server (``/v1/chat/completions``), key from an environment variable.
Modes: ``rationalise`` shows the teacher the gold answer and asks it to explain it; ``free`` does not, and only
answers that agree with gold survive. Every completion is validated: it must parse strictly (``format_ok`` and
``schema_ok``, non-empty think) and its entities must equal gold (``entity_f1 == 1``); an optional *judge* (a
second teacher of the same kinds) rates 1–10 whether the reasoning supports the answer (kept at ≥ threshold).

Output: one JSON line per prompt record, written with flush + fsync, so a killed run loses at most the line being
written; a restart truncates a torn last line and skips every id already present.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ner.metrics import entity_f1
from ner.parsing import parse_completion
from ner.prompts import format_answer, format_target, render_prompt
from ner.rationale import candidate_rationale
from ner.types import Sentence

MODES = ("rationalise", "free")


def record_id(record: dict) -> str:
    """Unique id of a prompt record: the sentence id, plus the asked type for the one-type tagged prompts."""
    if record["format"] == "tagged":
        return f"{record['sentence_id']}#{'|'.join(record['types'])}"
    return record["sentence_id"]


def teacher_messages(record: dict, mode: str) -> list[dict]:
    """The chat the teacher sees: the student's prompt, plus (rationalise) the gold answer to explain."""
    if mode not in MODES:
        raise ValueError(f"unknown CoT mode {mode!r}; expected one of {MODES}")
    messages = [dict(m) for m in record["messages"]]
    if mode == "rationalise":
        answer = format_target(record["gold"], record["format"], record["types"])
        messages[-1]["content"] += (
            f"\n\nThe correct answer is:\n{answer}\n"
            "Explain step by step inside <think></think> why exactly these spans (and no others) are entities "
            "of the asked types, without mentioning that the answer was given. Then write that answer exactly.")
    return messages


# ----------------------------------------------------------------------------- teachers

@dataclass
class Request:
    messages: list[dict]
    record: dict                  # the prompt record (gold labels etc.)
    sentence: Sentence | None     # needed by the template teacher only


class TemplateTeacher:
    """No model: rationale from gold labels. Only meaningful as a CoT teacher, never as a judge."""
    name = "template"

    def complete(self, requests: list[Request]) -> list[str | None]:
        out = []
        for r in requests:
            if r.sentence is None:
                raise ValueError("the template teacher needs the Sentence of each record (it cannot judge)")
            rec = r.record
            out.append(format_answer(rec["gold"], rec["format"], rec["types"],
                                     think=candidate_rationale(r.sentence, rec["types"])))
        return out


def chat_completions_url(base: str) -> str:
    base = base.rstrip("/")
    if base.endswith("/chat/completions"):
        return base
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


class HTTPTeacher:
    """An OpenAI-compatible chat endpoint. Transient failures (connection, timeout, 429, 5xx) are retried with
    exponential backoff; a request that still fails yields None (the record is left for a later resume)."""

    def __init__(self, url: str, model: str = "default", api_key_env: str = "OPENAI_API_KEY",
                 temperature: float = 0.0, max_tokens: int = 512, timeout: float = 60.0, retries: int = 4,
                 backoff: float = 1.0, concurrency: int = 4):
        self.name = url
        self.url = chat_completions_url(url)
        self.model, self.temperature, self.max_tokens = model, temperature, max_tokens
        self.api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.timeout, self.retries, self.backoff, self.concurrency = timeout, retries, backoff, concurrency
        self.last_error = ""

    def _post(self, messages: list[dict]) -> str | None:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.retries + 1):
            try:
                req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    data = json.loads(resp.read().decode("utf-8"))
                content = data["choices"][0]["message"]["content"]
                return content if isinstance(content, str) else None
            except urllib.error.HTTPError as exc:
                self.last_error = f"HTTP {exc.code} from {self.url}"
                if exc.code != 429 and exc.code < 500:
                    return None  # a client error will not fix itself
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                self.last_error = f"malformed response from {self.url}: {exc}"
                return None
            if attempt < self.retries:
                time.sleep(self.backoff * 2 ** attempt)
        return None

    def complete(self, requests: list[Request]) -> list[str | None]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(lambda r: self._post(r.messages), requests))


class EngineTeacher:
    """A local causal LM sampled with the trainer's own ``TorchEngine``."""

    def __init__(self, spec: str, max_new_tokens: int = 512, temperature: float = 0.0, seed: int = 0,
                 dtype: str = "float32", device: str = "cpu", max_batch_tokens: int = 65536,
                 model=None, tokenizer=None):
        from grpo.engine import TorchEngine

        if model is None:
            from grpo.models import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(spec, dtype, device)
        model.eval()
        self.name, self.tokenizer = spec, tokenizer
        self.engine = TorchEngine(model, tokenizer, max_batch_tokens=max_batch_tokens)
        self.max_new_tokens, self.temperature, self.seed, self.calls = max_new_tokens, temperature, seed, 0

    def complete(self, requests: list[Request]) -> list[str | None]:
        prompts = [self.tokenizer(render_prompt(self.tokenizer, {"messages": r.messages}),
                                  add_special_tokens=False)["input_ids"] for r in requests]
        self.calls += 1
        rollouts = self.engine.generate(prompts, n=1, max_new_tokens=self.max_new_tokens,
                                        temperature=self.temperature, top_p=1.0, stop=None,
                                        seed=self.seed * 1_000_003 + self.calls)
        return [r.text for r in rollouts]


def make_teacher(spec: str, **opts):
    """``template`` | ``http(s)://…`` | a model spec. ``opts`` go to the teacher (unknown ones are ignored)."""
    def pick(*names):
        return {k: opts[k] for k in names if k in opts and opts[k] is not None}
    if spec == "template":
        return TemplateTeacher()
    if spec.startswith(("http://", "https://")):
        return HTTPTeacher(spec, **pick("model", "api_key_env", "temperature", "max_tokens", "timeout", "retries",
                                        "backoff", "concurrency"))
    return EngineTeacher(spec, **pick("max_new_tokens", "temperature", "seed", "dtype", "device"))


# ----------------------------------------------------------------------------- validation and judging

def validate_completion(text: str, record: dict, metric_mode: str = "exact") -> tuple[str | None, str]:
    """(canonical completion or None, reject reason or ""). Reasons, checked in this order: format (not strictly
    parseable: ``format_ok`` and ``schema_ok``) | empty_think | disagree (``entity_f1 < 1`` under ``metric_mode``).

    The canonical completion re-renders the parsed think and entities with ``format_answer``, so SFT data has
    one exact layout whatever spacing the teacher used.
    """
    fmt, types = record["format"], record["types"]
    parsed = parse_completion(text, fmt, types)
    if not (parsed.format_ok and parsed.schema_ok) or parsed.entities is None:
        return None, "format"
    if not (parsed.think or "").strip():
        return None, "empty_think"
    if entity_f1(record["gold"], parsed.entities, mode=metric_mode) < 1.0:
        return None, "disagree"
    return format_answer(parsed.entities, fmt, types, think=parsed.think.strip()), ""


def judge_messages(record: dict, completion: str) -> list[dict]:
    return [{"role": "system", "content": "You grade reasoning for named entity recognition."},
            {"role": "user", "content": (
                f"Sentence: {record['sentence']}\nEntity types: {', '.join(record['types'])}\n\n"
                f"Response:\n{completion}\n\nOn a scale of 1 to 10, how well does the reasoning inside "
                "<think></think> support the final answer (consistent, no contradictions, no unsupported "
                "claims)? Reply with a single integer.")}]


def parse_score(text: str | None) -> int:
    """The first integer 1–10 in a judge reply; 0 when there is none."""
    m = re.search(r"\b(10|[1-9])\b", text or "")
    return int(m.group(1)) if m else 0


# ----------------------------------------------------------------------------- resumable JSONL

def read_done_ids(path: Path) -> set[str]:
    """Ids already written to ``path``. A torn last line (no newline or bad JSON) is truncated away; a bad line
    anywhere else is corruption, reported with its line number."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    ids, offset = set(), 0
    for n, line in enumerate(lines, start=1):
        last = n == len(lines)
        if line.strip():
            try:
                ids.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError) as exc:
                if last or (n == len(lines) - 1 and not lines[-1]):
                    with open(path, "r+b") as f:
                        f.truncate(offset)
                        f.flush()
                        os.fsync(f.fileno())
                    break
                raise ValueError(f"{path}:{n}: not a CoT record ({exc}); fix or delete the line") from None
            if last:  # complete JSON but no newline: keep it, finish the line so the next append starts fresh
                with open(path, "ab") as f:
                    f.write(b"\n")
        offset += len(line) + 1
    return ids


def append_record(f, record: dict) -> None:
    f.write(json.dumps(record, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


def file_stats(path: Path) -> dict:
    """Acceptance counts over every record in ``path``: total ≥ parsed ≥ agreed ≥ judged_ok (= accepted).

    parsed: strict format and schema; agreed: also a non-empty think and entities equal to gold; judged_ok:
    also at or above the judge threshold (= agreed when there is no judge)."""
    reasons: dict[str, int] = {}
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            total += 1
            r = json.loads(line)
            if not r["accepted"]:
                reasons[r["reject_reason"]] = reasons.get(r["reject_reason"], 0) + 1
    parsed = total - reasons.get("format", 0)
    agreed = parsed - reasons.get("empty_think", 0) - reasons.get("disagree", 0)
    return {"total": total, "parsed": parsed, "agreed": agreed, "judged_ok": agreed - reasons.get("judge", 0),
            "reject_reasons": reasons}


@dataclass
class _Outcome:
    record: dict
    raw: str
    completion: str | None   # canonical completion when it passed validation
    reason: str              # "" = accepted
    score: int | None = None


def _apply_judge(outcomes: list[_Outcome], judge, threshold: int) -> list[_Outcome]:
    """Score the validated outcomes; returns the outcomes to write (a failed judge call drops its record, so a
    resumed run judges it again instead of storing a rejection that says nothing about the reasoning)."""
    valid = [o for o in outcomes if o.completion is not None]
    replies = judge.complete([Request(judge_messages(o.record, o.completion), o.record, None) for o in valid])
    failed = set()
    for o, reply in zip(valid, replies):
        if reply is None:
            failed.add(id(o))
            continue
        o.score = parse_score(reply)
        if o.score < threshold:
            o.reason = "judge"
    return [o for o in outcomes if id(o) not in failed]


def generate_cot(records: list[dict], sentences: dict[str, Sentence], teacher, out: str | Path, mode: str,
                 metric_mode: str = "exact", judge=None, judge_threshold: int = 9, batch_size: int = 8,
                 log=print) -> dict:
    """Generate, validate and append CoT records for every prompt record not yet in ``out``; returns the stats
    (also written to ``<out>.stats.json``). ``sentences`` maps sentence_id → Sentence (template teacher).
    A teacher or judge call that fails writes nothing: the record is retried by the next run."""
    if mode not in MODES:
        raise ValueError(f"unknown CoT mode {mode!r}; expected one of {MODES}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done_ids(out)
    todo = [r for r in records if record_id(r) not in done]
    log(f"cot: {len(records)} records, {len(records) - len(todo)} already in {out}, {len(todo)} to do")
    errors = 0
    with open(out, "a", encoding="utf-8") as f:
        for b in range(0, len(todo), batch_size):
            chunk = todo[b:b + batch_size]
            texts = teacher.complete([Request(teacher_messages(r, mode), r, sentences.get(r["sentence_id"]))
                                      for r in chunk])
            outcomes = [_Outcome(rec, text, *validate_completion(text, rec, metric_mode))
                        for rec, text in zip(chunk, texts) if text is not None]
            if judge is not None:
                n = len(outcomes)
                outcomes = _apply_judge(outcomes, judge, judge_threshold)
                errors += n - len(outcomes)
            errors += sum(text is None for text in texts)
            for o in outcomes:
                rec = o.record
                append_record(f, {"id": record_id(rec), "sentence": rec["sentence"], "messages": rec["messages"],
                                  "completion": o.completion if o.completion is not None else o.raw, "raw": o.raw,
                                  "teacher": teacher.name, "mode": mode, "format": rec["format"],
                                  "types": rec["types"], "gold": rec["gold"], "judge_score": o.score,
                                  "accepted": o.reason == "", "reject_reason": o.reason})
    stats = {**file_stats(out), "teacher_errors_this_run": errors}
    Path(str(out) + ".stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log(f"cot: total {stats['total']}, parsed {stats['parsed']}, agreed {stats['agreed']}, "
        f"judged_ok {stats['judged_ok']}; teacher errors this run {errors}")
    return stats


def build_cot_records(dataset: str, split: str, fmt: str, limit: int = 0, k_shot: int = 0, prompt_seed: int = 0,
                      data_dir: str | None = None, sentence_seed: int = -1) -> tuple[list[dict], dict[str, Sentence]]:
    """(prompt records, {sentence_id: sentence}) of the first ``limit`` sentences of a split (of its shuffle by
    ``sentence_seed`` ≥ 0, ``ner.data.select_sentences``), built exactly as ``train_grpo.py`` builds its prompts
    (few-shot pool: the whole train split), so a model tuned on them meets the same prompts in GRPO. ``dataset``
    may be a mixture (``ner.mixture``): the first ``limit`` of each member."""
    from ner.mixture import load_mixture, mixture_prompts

    members = load_mixture(dataset, split, data_dir, offset=0, limit=limit, sentence_seed=sentence_seed)
    return mixture_prompts(members, fmt, k_shot, prompt_seed, data_dir)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m ner.cot", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="conll2003 | crossner_ai | …")
    p.add_argument("--split", default="train")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--limit", type=int, default=0, help="first N sentences (0 = all)")
    p.add_argument("--sentence_seed", type=int, default=-1,
                   help="-1: file order; N ≥ 0: the first --limit of a fixed shuffle by seed N (ner.data)")
    p.add_argument("--format", default="json", choices=("tagged", "json"))
    p.add_argument("--k_shot", type=int, default=0, help="few-shot examples in the student prompt")
    p.add_argument("--prompt_seed", type=int, default=0, help="seed of the few-shot choice (as in train_grpo)")
    p.add_argument("--seed", type=int, default=0, help="teacher sampling seed")
    p.add_argument("--teacher", default="template", help="template | model spec | http(s)://host:port")
    p.add_argument("--teacher_model", default="default", help="model name sent to an HTTP teacher")
    p.add_argument("--mode", default="rationalise", choices=MODES)
    p.add_argument("--metric_mode", default="exact", choices=("exact", "normalized"))
    p.add_argument("--judge", default=None, help="optional judge: model spec | http(s)://… (same kinds)")
    p.add_argument("--judge_model", default="default")
    p.add_argument("--judge_threshold", type=int, default=9)
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--retries", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=4, help="parallel HTTP requests")
    p.add_argument("--batch_size", type=int, default=8, help="records per teacher call (and per write burst)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    records, sentences = build_cot_records(a.dataset, a.split, a.format, a.limit, a.k_shot, a.prompt_seed,
                                             a.data_dir, a.sentence_seed)
    common = dict(api_key_env=a.api_key_env, temperature=a.temperature, max_tokens=a.max_new_tokens,
                  max_new_tokens=a.max_new_tokens, timeout=a.timeout, retries=a.retries,
                  concurrency=a.concurrency, seed=a.seed)
    teacher = make_teacher(a.teacher, model=a.teacher_model, **common)
    judge = None
    if a.judge:
        if a.judge == "template":
            raise SystemExit("--judge template: the template teacher cannot judge; give a model spec or URL")
        judge = make_teacher(a.judge, model=a.judge_model, **{**common, "max_tokens": 8, "max_new_tokens": 8})
    return generate_cot(records, sentences, teacher, a.out, a.mode, a.metric_mode, judge, a.judge_threshold,
                        a.batch_size, log=lambda s: print(s, file=sys.stderr))


if __name__ == "__main__":
    main()
