"""ner.headroom: the summary is what its JSONL says, train_grpo's prompt_filter keeps exactly the prompts whose
groups disagreed, and a file measured on another prompt list is refused. Tiny random llama + char tokenizer."""
from __future__ import annotations

import json
import string

import pytest
import torch

import train_grpo
from grpo.config import parse_config
from grpo.engine import Rollout, TorchEngine
from grpo.trainer import step_prompt_indices
from grpo.distributed import DistInfo
from ner.headroom import keep_disagreeing_prompts, main, measure_headroom, summarize, trainer_order
from ner.rewards import build_reward_fns
from tiny_task import char_tokenizer, tiny_policy

SENTENCES = [(["John", "Smith", "lives", "in", "Paris", "."], [("person", 0, 2), ("location", 4, 5)]),
             (["Rain", "fell", "."], []),
             (["Mary", "visited", "Rome", "."], [("person", 0, 1), ("location", 2, 3)]),
             (["Berlin", "is", "big", "."], [("location", 0, 1)])]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "tiny.jsonl"
    with open(path, "w") as f:
        for i, (tokens, ents) in enumerate(SENTENCES):
            f.write(json.dumps({"id": f"s{i}", "tokens": tokens,
                                "entities": [{"type": t, "start": s, "end": e} for t, s, e in ents]}) + "\n")
    return path


def _cfg(data_file, *extra: str):
    # k_shot 0 and a char tokenizer keep every prompt under ~460 tokens (the tiny llama has 512 positions).
    return parse_config(train_grpo.NERGRPOConfig, ["--dataset", str(data_file), "--k_shot", "0", "--group_size", "4",
                                                   "--prompts_per_step", "2", "--max_completion_len", "10",
                                                   "--max_prompt_len", "1000", "--reward_weights", "format=0.5,f1=2",
                                                   "--stop", "</entity>", *extra])


def _gated_lowercase(completions: list[str], samples: list[dict]) -> list[float]:
    """Share of lowercase letters for sentences s0 and s2, 0 for s1 and s3: random completions then give both
    groups that disagree and groups that are all equal."""
    return [sum(c in string.ascii_lowercase for c in text) / max(len(text), 1)
            if s["sentence_id"] in ("s0", "s2") else 0.0 for text, s in zip(completions, samples)]


def _by_hand(lines: list[dict], group_size: int) -> dict[str, float]:
    """The summary recomputed from the JSONL lines: plain means, best-of-G = mean of each group's max."""
    n = len(lines)
    return {"prompts": n,
            "greedy_f1": sum(r["greedy_f1"] for r in lines) / n,
            "sample_f1": sum(sum(r["sample_f1"]) for r in lines) / (n * group_size),
            "best_of_g_f1": sum(max(r["sample_f1"]) for r in lines) / n,
            "greedy_reward": sum(r["greedy_reward"] for r in lines) / n,
            "sample_reward": sum(sum(r["rewards"]) for r in lines) / (n * group_size),
            "all_equal_share": sum(1 for r in lines if r["all_equal"]) / n}


def _measure(cfg, prompts, indices, out_path):
    torch.set_num_threads(1)
    tok = char_tokenizer()
    engine = TorchEngine(tiny_policy(seed=0), tok)
    reward_fns = build_reward_fns(cfg.reward_weights) + [("gated_lowercase", 1.0, _gated_lowercase)]
    return measure_headroom(engine, prompts, indices, reward_fns, group_size=cfg.group_size,
                            temperature=cfg.temperature, top_p=cfg.top_p, stop=cfg.stop or None,
                            max_new_tokens=cfg.max_completion_len, seed=cfg.seed, out_path=out_path,
                            batch_prompts=3, progress=False)


def test_summary_is_recomputable_from_the_jsonl_and_the_filter_keeps_disagreeing_groups(data_file, tmp_path):
    cfg = _cfg(data_file)
    prompts, n_long = train_grpo.build_train_prompts(cfg, char_tokenizer())
    assert (len(prompts), n_long) == (8, 0)  # 4 sentences × 2 types
    indices = trainer_order(cfg, len(prompts), 6)  # 6 of 8: two prompts stay uncovered
    out = tmp_path / "headroom.jsonl"
    rows = _measure(cfg, prompts, indices, out)

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in lines] == indices
    for r in lines:
        assert (r["sentence_id"], tuple(r["types"])) == (prompts[r["index"]]["sentence_id"],
                                                         tuple(prompts[r["index"]]["types"]))
        assert len(r["sample_f1"]) == len(r["rewards"]) == cfg.group_size
        assert r["all_equal"] == (max(r["rewards"]) == min(r["rewards"]))

    n_equal = sum(r["all_equal"] for r in lines)
    assert 0 < n_equal < len(lines)  # both kinds, or the filter check below proves nothing
    assert summarize(rows) == pytest.approx(_by_hand(lines, cfg.group_size))

    kept, note = keep_disagreeing_prompts(prompts, out)
    expected = sorted(r["index"] for r in lines if not r["all_equal"])
    assert kept == [prompts[i] for i in expected]
    assert f"training on {len(expected)} of 8 prompts" in note


class ScriptedEngine:
    """Greedy calls answer ``greedy``; sample j of the k-th prompt of a call is texts[(j + k) % len(texts)]."""

    def __init__(self, texts: list[str], greedy: str = "<think>x</think> <entity></entity>"):
        self.texts, self.greedy = texts, greedy

    def generate(self, prompts, n=1, max_new_tokens=16, temperature=1.0, top_p=1.0, stop=None, seed=None):
        return [Rollout(list(p), [1, 2], [0.0, 0.0], "stop",
                        self.greedy if temperature == 0 else self.texts[(j + k) % len(self.texts)])
                for k, p in enumerate(prompts) for j in range(n)]


def test_f1_and_rewards_of_known_answers(data_file, tmp_path):
    """Scripted answers make every number known: John Smith's person prompt has gold ["John Smith"]."""
    cfg = _cfg(data_file)
    prompts, _ = train_grpo.build_train_prompts(cfg, char_tokenizer())
    i = next(k for k, p in enumerate(prompts) if p["sentence_id"] == "s0" and p["types"] == ["person"])
    texts = ["<think>x</think> <entity>John Smith</entity>",        # F1 1, format 1 -> 2.5
             "<think>x</think> <entity>John Smith, Paris</entity>",  # F1 2/3       -> 0.5 + 4/3
             "garbage",                                                # F1 0, format 0 -> 0
             "<think>x</think> <entity></entity>"]                   # F1 0         -> 0.5
    rows = measure_headroom(ScriptedEngine(texts), prompts, [i], build_reward_fns(cfg.reward_weights),
                            group_size=4, temperature=1.0, top_p=1.0, stop=None, max_new_tokens=10,
                            progress=False)
    (row,) = rows
    assert row["greedy_f1"] == 0.0 and row["greedy_reward"] == pytest.approx(0.5)
    assert row["sample_f1"] == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    assert row["rewards"] == pytest.approx([2.5, 0.5 + 4 / 3, 0.0, 0.5])
    assert row["all_equal"] is False
    s = summarize(rows)
    assert (s["best_of_g_f1"], s["sample_f1"]) == pytest.approx((1.0, (1 + 2 / 3) / 4))

    # Every prompt, greedy answering "Paris": F1 now varies across prompts and samples, and the summary is still
    # the JSONL's numbers.
    out = tmp_path / "all.jsonl"
    rows = measure_headroom(ScriptedEngine(texts, greedy=texts[1].replace("John Smith, ", "")), prompts,
                            list(range(len(prompts))), build_reward_fns(cfg.reward_weights), group_size=3,
                            temperature=1.0, top_p=1.0, stop=None, max_new_tokens=10, out_path=out,
                            batch_prompts=3, progress=False)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len({r["greedy_f1"] for r in lines}) > 1 and len({max(r["sample_f1"]) for r in lines}) > 1
    assert summarize(rows) == pytest.approx(_by_hand(lines, 3))

    # Four identical answers: an all-equal group, which the filter drops (and then nothing is left).
    rows = measure_headroom(ScriptedEngine(texts[:1]), prompts, [i], build_reward_fns(cfg.reward_weights),
                            group_size=4, temperature=1.0, top_p=1.0, stop=None, max_new_tokens=10,
                            out_path=tmp_path / "same.jsonl", progress=False)
    assert rows[0]["all_equal"] is True and summarize(rows)["all_equal_share"] == 1.0
    with pytest.raises(ValueError, match="all-equal rewards: nothing to train on"):
        keep_disagreeing_prompts(prompts, tmp_path / "same.jsonl")


def _row(index: int, record: dict, all_equal: bool) -> str:
    return json.dumps({"index": index, "sentence_id": record["sentence_id"], "types": record["types"],
                       "greedy_f1": 0.0, "greedy_reward": 0.0, "sample_f1": [0.0, 0.0], "rewards": [0.0, 1.0],
                       "all_equal": all_equal})


def test_filter_refuses_a_file_measured_on_another_prompt_list(data_file, tmp_path):
    cfg = _cfg(data_file)
    prompts, _ = train_grpo.build_train_prompts(cfg, char_tokenizer())
    path = tmp_path / "h.jsonl"
    path.write_text("\n".join(_row(i, p, all_equal=i == 1) for i, p in enumerate(prompts[:3])) + "\n")
    kept, _ = keep_disagreeing_prompts(prompts, path)
    assert kept == [prompts[0], prompts[2]]  # prompt 1 was all-equal; 3..7 are not covered

    other, _ = train_grpo.build_train_prompts(_cfg(data_file, "--max_empty_ratio", "0"), char_tokenizer())
    assert len(other) < len(prompts)  # dropping s1's empty prompts shifts every index after them
    with pytest.raises(ValueError, match=r"h\.jsonl:3: prompt 2 is .* in the file but .* rerun ner\.headroom"):
        keep_disagreeing_prompts(other, path)
    with pytest.raises(ValueError, match="outside this config's 2 prompts"):
        keep_disagreeing_prompts(prompts[:2], path)
    path.write_text(_row(0, prompts[0], False) + "\n" + _row(0, prompts[0], False) + "\n")
    with pytest.raises(ValueError, match="appears twice"):
        keep_disagreeing_prompts(prompts, path)


def test_trainer_order_is_the_trainers_first_steps(data_file):
    cfg = _cfg(data_file)
    one = DistInfo(0, 1, 0, torch.device("cpu"))
    first_steps = [i for step in range(3) for i in step_prompt_indices(step, cfg, 8, one)]
    assert trainer_order(cfg, 8, 5) == first_steps[:5]
    assert sorted(trainer_order(cfg, 8, 0)) == sorted(trainer_order(cfg, 8, 100)) == list(range(8))


def test_cli_on_a_saved_tiny_model(data_file, tmp_path, capsys):
    """python -m ner.headroom end to end (in-process): config flags + headroom flags, model loaded from a folder."""
    model_dir = tmp_path / "tiny_model"
    tiny_policy(seed=0).save_pretrained(model_dir)
    char_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "cli.jsonl"
    summary = main(["--dataset", str(data_file), "--k_shot", "0", "--model", str(model_dir), "--engine", "torch",
                    "--group_size", "2", "--prompts_per_step", "2", "--max_completion_len", "6",
                    "--max_prompt_len", "1000", "--reward_weights", "format=0.5,f1=2", "--headroom_prompts", "3",
                    "--headroom_out", str(out)])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == summary["prompts"] == 3
    assert summary["all_equal_share"] == pytest.approx(sum(r["all_equal"] for r in lines) / 3)
    assert "groups whose 2 rewards are all equal" in capsys.readouterr().out
