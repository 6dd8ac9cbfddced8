"""Guided JSON answers (opt-in: ``--guided_json``): the answer's keys and closing braces are written for the model.

Asked about a type list it never trained on, a small model can answer some types and then, instead of the next
asked type or the closing ``}}``, repeat a key (``"politicalparty": [], "politicalparty": [], …``) until
max_new_tokens cuts it; the strict parser, like ReasoningNER's evaluation, then scores every entity of that
sentence as missed. A schema-guided decoder (vLLM's structured outputs, Outlines) would not let it: with every asked
type a required key, in order, the only text allowed after a list is the next key or, after the last one, the
closing braces. This module is that grammar's fixed part, as a TorchEngine ``guide`` (grpo/guide.py):

  * each time the model closes a list of the answer, ``next_fixed_text`` gives what must follow it: the first asked
    type it has not answered yet (``, "politician":``) or, when none is left, the closing braces;
  * ``JsonAnswerGuide`` turns that into forced tokens; when the model's token already ran past the "]" onto
    another path (``],`` where the object must close), that token is replaced by its text up to the "]" and the
    fixed text. The model still writes the think block, the opening of the object and every list's contents: its
    entity choices.

A model that writes every asked type in order and closes the object gets its own text back (the forced text is what
it would have written, though possibly split into other tokens); the engine counts, per answer, the forced tokens it
would not have picked (``Rollout.overridden``), and evaluate.py reports how many answers that changed.
"""
from __future__ import annotations

import json

from grpo.guide import Steer
from ner.parsing import THINK_CLOSE

_CLOSINGS = ("}}", "}")  # {"entities": {...}} is the schema; a bare {type: [...]} object is read too


def next_fixed_text(text: str, types: list[str]) -> tuple[str, str, bool] | None:
    """What the grammar writes after the last list of the JSON answer in ``text``: (``tail``, ``fixed``, done).
    ``tail`` is what the model wrote after that list's "]"; ``fixed`` is ``, "<first unanswered asked type>":``
    (done False) or the closing braces (done True). None when there is no such list: no think block closed, or the
    last "]" not a list's end (inside a string, or after broken JSON)."""
    _, sep, answer = text.rpartition(THINK_CLOSE)
    start, end = answer.find("{"), answer.rfind("]")
    if not sep or start < 0 or end < start:
        return None
    decoder = json.JSONDecoder()
    for closing in _CLOSINGS:
        try:
            value = decoder.decode(answer[start:end + 1] + closing)
        except ValueError:
            continue
        mapping = value["entities"] if isinstance(value.get("entities"), dict) else value
        missing = [t for t in types if t not in mapping]
        # The key but not its "[": a model writes "[]" as one token (and " [" as another), so forcing "[" would make
        # it write "[ []".
        fixed = f", {json.dumps(missing[0], ensure_ascii=False)}:" if missing else closing
        return answer[end + 1:], fixed, not missing
    return None


class JsonAnswerGuide:
    """A TorchEngine guide (grpo/guide.py) for all-types JSON answers; ``types_of[i]``: the types the i-th prompt
    asks, in order. Asked after every token; only a token holding "]" can end a list, so every other costs one set
    lookup."""

    def __init__(self, tokenizer, types_of: list[list[str]]):
        self.tokenizer, self.types_of = tokenizer, types_of
        self.list_ends = {i for piece, i in tokenizer.get_vocab().items() if "]" in piece}

    def __call__(self, prompt_index: int, completion_ids: list[int]) -> Steer | None:
        if completion_ids[-1] not in self.list_ends:
            return None
        text = self.tokenizer.decode(completion_ids, skip_special_tokens=True)
        found = next_fixed_text(text, self.types_of[prompt_index])
        if found is None:
            return None
        tail, fixed, done = found
        if fixed.startswith(tail):  # on the grammar's path: write the rest of the fixed text
            rest = fixed[len(tail):]
            return Steer(self.tokenizer.encode(rest, add_special_tokens=False) if rest else [], stop=done)
        # The newest token ran past the "]" onto another path ("]," where the object must close): it is replaced
        # by its own text up to the "]" followed by the fixed text.
        head = text[len(self.tokenizer.decode(completion_ids[:-1], skip_special_tokens=True)):len(text) - len(tail)]
        return Steer(self.tokenizer.encode(head + fixed, add_special_tokens=False), stop=done, replace=True)
