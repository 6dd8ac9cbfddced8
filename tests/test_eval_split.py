"""The trainer's dev evaluation: shared between ranks (each generates its share; all get every answer), and
sentences whose prompt is longer than the training cut left out whole."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ner.evaluation import drop_long_sentences, prompt_token_ids
from tiny_task import char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "eval_split.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def test_two_ranks_generate_their_shares_and_return_what_one_process_returns(tmp_path):
    for cmd in ([sys.executable, str(SCRIPT), str(tmp_path)],
                [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
                 str(tmp_path)]):
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single = json.loads((tmp_path / "world1-rank0.json").read_text())
    assert len(single) == 5 and any(single)
    for rank in (0, 1):  # greedy: the same answers, in record order, on both ranks
        assert json.loads((tmp_path / f"world2-rank{rank}.json").read_text()) == single


def test_sentences_with_a_prompt_over_the_cut_are_dropped_whole():
    tok = char_tokenizer()
    # Two tagged prompts of sentence "a" (one short, one long) and one of sentence "b".
    records = [{"sentence_id": sid, "messages": [{"role": "user", "content": text}]}
               for sid, text in (("a", "hi"), ("a", "x" * 40), ("b", "hello"))]
    lengths = [len(ids) for ids in prompt_token_ids(tok, records)]
    # The char template adds the same overhead to each: lengths differ by the content's characters.
    assert lengths[1] - lengths[0] == 38 and lengths[2] - lengths[0] == 3
    kept, dropped = drop_long_sentences(tok, records, max_prompt_len=lengths[2])
    assert [r["sentence_id"] for r in kept] == ["b"] and dropped == 1  # "a" goes whole, its short prompt too
    assert drop_long_sentences(tok, records, max_prompt_len=lengths[1]) == (records, 0)
    assert drop_long_sentences(tok, records, None) == (records, 0)
