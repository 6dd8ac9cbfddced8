"""A parser exception never crashes scoring, and is never silent: it scores like an unparseable answer and is
counted, per batch, as ``reward/parse_errors`` in the GRPO trainer's metrics."""
from __future__ import annotations

import pytest
import torch

import ner.parsing
from grpo.distributed import DistInfo
from grpo.engine import TorchEngine
from grpo.grpo_config import GRPOConfig
from grpo.trainer import reward_diagnostics, train
from ner.rewards import REWARDS, _parse_cached, build_reward_fns, f1_reward, parse_metrics
from tiny_task import char_tokenizer, tiny_policy

TAGGED = {"format": "tagged", "types": ["person"], "gold": {"person": ["Peter Blackburn"]}}
JSON = {"format": "json", "types": ["person"], "gold": {"person": []}}
GOOD_TAGGED = "<think>r</think> <entity>Peter Blackburn</entity>"
GOOD_JSON = '<think>r</think>\n{"entities": {"person": []}}'


@pytest.fixture
def raising_json_parser(monkeypatch):
    """The JSON parser replaced by one that always raises (a stand-in for a parser bug); the tagged one is real."""
    def broken(text, types):
        raise KeyError("bug")

    monkeypatch.setattr(ner.parsing, "_parse_json", broken)
    _parse_cached.cache_clear()  # results parsed by the real parser must not answer for the broken one
    yield
    _parse_cached.cache_clear()


def test_healthy_parser_counts_nothing():
    _parse_cached.cache_clear()
    assert parse_metrics([GOOD_TAGGED, GOOD_JSON, "garbage"], [TAGGED, JSON, JSON]) == {"parse_errors": 0.0}


def test_raising_parser_scores_zero_and_is_counted(raising_json_parser):
    completions = [GOOD_TAGGED, GOOD_JSON, GOOD_JSON, "garbage"]
    samples = [TAGGED, JSON, JSON, JSON]
    # The JSON answers would score F1 1 (both empty); through the broken parser they score 0, and the tagged one
    # (real parser) keeps its 1.
    assert f1_reward(completions, samples) == [1.0, 0.0, 0.0, 0.0]
    # Three JSON completions went through the raising parser; every reward reports the same count.
    for fn in REWARDS.values():
        assert fn.batch_metrics(completions, samples) == {"parse_errors": 3.0}
    assert reward_diagnostics(completions, samples, build_reward_fns("reasoningner")) == {"parse_errors": 3.0}


def test_trainer_logs_parse_errors(raising_json_parser, tmp_path):
    # One real GRPO step on the tiny policy: every completion is scored as JSON, so every one goes through the
    # broken parser: 2 prompts x G 4 = 8 parse errors in the step's metrics.
    torch.manual_seed(0)
    tok = char_tokenizer()
    policy = tiny_policy(seed=0)
    cfg = GRPOConfig(reward_weights="reasoningner", prompts_per_step=2, group_size=4, micro_batch_size=8, beta=0.0,
                     max_completion_len=6, lr=1e-3, total_steps=1, out_dir=str(tmp_path), save_every=100,
                     sample_log_count=0)
    prompts = [{"messages": [{"role": "user", "content": text}], **JSON} for text in ("Say hi", "Name one")]
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    history = train(cfg, policy, tok, prompts, build_reward_fns(cfg.reward_weights), info, TorchEngine(policy, tok))
    assert history[0]["reward/parse_errors"] == 8.0
    assert history[0]["reward/f1"] == 0.0
