"""Rule-based NER rewards. Each is a plain callable ``fn(completions, samples) -> list[float]``.

``completions[i]`` is the decoded text answering prompt record ``samples[i]`` (a dict from
``ner.prompts.build_prompts`` with "gold", "types" and "format"). Rewards never raise on model output:
an unparseable completion scores 0 (or the penalty of the reward).

Presets (weights passed to ``build_reward_fns``):
  blog          format 0.5 + blog_entity 1 + exact_match 2. These are the weights of the blog's own code
                (github.com/israel-adewuyi/ner_with_grpo, rewards.py: soft format 0.5, +/-0.5 per entity,
                exact answer 2.0; TRL sums reward functions with weight 1). Our format/exact_match return
                1.0, so the weights carry the blog's scale.
  reasoningner  10 * f1 + 1 * schema (ReasoningNER, arXiv 2511.11978).
Every reward also carries ``batch_metrics = parse_metrics`` (the count of completions on which the parser raised),
which grpo.trainer logs as ``reward/parse_errors``.
``correct_entities`` and ``spurious_entities`` are the two counts behind blog_entity (0.5 · correct − 0.5 · spurious),
for other weights; ``_spurious_entities`` says which weight matches corpus micro-F1.
"""
from __future__ import annotations

from collections import Counter
from functools import lru_cache
from typing import Callable

from ner.metrics import entity_f1, match_key
from ner.parsing import Parsed, parse_completion

RewardFn = Callable[[list[str], list[dict]], list[float]]

PRESETS: dict[str, dict[str, float]] = {
    "blog": {"format": 0.5, "blog_entity": 1.0, "exact_match": 2.0},
    "reasoningner": {"f1": 10.0, "schema": 1.0},
}


@lru_cache(maxsize=8192)
def _parse_cached(text: str, fmt: str, types: tuple[str, ...]) -> Parsed:
    # Several rewards parse the same completion; the cache makes that one parse. Callers must not mutate.
    return parse_completion(text, fmt, list(types))


def _parsed(completion: str, sample: dict) -> Parsed:
    if not isinstance(completion, str):
        return Parsed(errors=[f"completion is {type(completion).__name__}, not str"])
    return _parse_cached(completion, sample["format"], tuple(sample["types"]))


def parse_metrics(completions: list[str], samples: list[dict]) -> dict[str, float]:
    """Batch diagnostics every NER reward reports (as its ``batch_metrics``; grpo.trainer logs them as
    ``reward/<name>``): ``parse_errors``, the number of completions on which the parser raised. Such a
    completion scores 0 (or the reward's penalty) like any unparseable answer; this count keeps the bug visible."""
    return {"parse_errors": float(sum(_parsed(c, s).parser_raised for c, s in zip(completions, samples)))}


def _per_completion(score: Callable[[Parsed, dict], float]) -> RewardFn:
    """Lift a per-completion score(parsed, sample) into a batched reward fn (with ``parse_metrics`` attached)."""
    def reward(completions: list[str], samples: list[dict]) -> list[float]:
        if len(completions) != len(samples):
            raise ValueError(f"{len(completions)} completions but {len(samples)} samples")
        return [float(score(_parsed(c, s), s)) for c, s in zip(completions, samples)]

    reward.__name__ = score.__name__
    reward.__doc__ = score.__doc__
    reward.batch_metrics = parse_metrics
    return reward


def _gold(sample: dict) -> dict[str, list[str]]:
    return {t: list(sample["gold"].get(t, [])) for t in sample["types"]}


def _keys(texts: list[str]) -> list[str]:
    # Same text identity as entity_f1's "exact" mode: whitespace runs are not content.
    return [match_key(x, "exact") for x in texts]


def _format(p: Parsed, sample: dict) -> float:
    """1 if one think block then one answer block and nothing else, else 0."""
    return 1.0 if p.format_ok else 0.0


def _schema(p: Parsed, sample: dict) -> float:
    """1 if the answer block has exactly the expected schema, else 0."""
    return 1.0 if p.schema_ok else 0.0


def _f1(p: Parsed, sample: dict) -> float:
    """Entity-level F1 (exact text and type) of the prediction; 1 when gold and prediction are both empty."""
    if p.entities is None:
        return 0.0
    return entity_f1(_gold(sample), p.entities, mode="exact")


def _entity_counts(p: Parsed, sample: dict) -> tuple[int, int]:
    """(correct, spurious) predicted entities: a multiset match of (type, text) against the gold.

    A multiset makes a repeated prediction of a once-mentioned entity count once as correct and then as
    spurious, so repeating cannot farm reward. (The blog's code matched by list membership.)
    """
    gold = _gold(sample)
    correct = spurious = 0
    for t, texts in p.entities.items():
        hits = sum((Counter(_keys(texts)) & Counter(_keys(gold.get(t, [])))).values())
        correct += hits
        spurious += len(texts) - hits
    return correct, spurious


def _blog_entity(p: Parsed, sample: dict) -> float:
    """+0.5 per correct entity, -0.5 per spurious one; missed gold costs 0."""
    if p.entities is None:
        return 0.0
    correct, spurious = _entity_counts(p, sample)
    return 0.5 * correct - 0.5 * spurious


def _correct_entities(p: Parsed, sample: dict) -> float:
    """The number of correct predicted entities (0 if unparseable)."""
    return 0.0 if p.entities is None else float(_entity_counts(p, sample)[0])


def _spurious_entities(p: Parsed, sample: dict) -> float:
    """The number of spurious predicted entities (0 if unparseable); give it a negative weight.

    With weights (+1 correct, -c spurious) a guess pays off when it is right with probability above c / (1 + c).
    Corpus micro-F1 gains from a prediction right with probability above F1 / 2 (adding one changes
    2·TP / (n_pred + n_gold) by (2·[right] - F1) / (n_pred + n_gold + 1)), so c = F1 / (2 - F1) aligns the two at the
    current F1; the blog's ±0.5 is c = 1, which aligns with F1 = 1 and, below that, pays for answering nothing.
    """
    return 0.0 if p.entities is None else float(_entity_counts(p, sample)[1])


def _exact_match(p: Parsed, sample: dict) -> float:
    """1 if the set of predicted (type, text) pairs equals the gold set (both empty counts), else 0."""
    if p.entities is None:
        return 0.0
    pred = {(t, x) for t, texts in p.entities.items() for x in _keys(texts)}
    gold = {(t, x) for t, texts in _gold(sample).items() for x in _keys(texts)}
    return 1.0 if pred == gold else 0.0


format_reward = _per_completion(_format)
schema_reward = _per_completion(_schema)
f1_reward = _per_completion(_f1)
blog_entity_reward = _per_completion(_blog_entity)
correct_entities_reward = _per_completion(_correct_entities)
spurious_entities_reward = _per_completion(_spurious_entities)
exact_match_reward = _per_completion(_exact_match)

REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "schema": schema_reward,
    "f1": f1_reward,
    "blog_entity": blog_entity_reward,
    "correct_entities": correct_entities_reward,
    "spurious_entities": spurious_entities_reward,
    "exact_match": exact_match_reward,
}


def build_reward_fns(weights: dict[str, float] | str) -> list[tuple[str, float, RewardFn]]:
    """[(name, weight, fn)] for a {name: weight} dict or a preset name ("blog", "reasoningner")."""
    if isinstance(weights, str):
        if weights not in PRESETS:
            raise ValueError(f"unknown reward preset {weights!r}; known presets: {sorted(PRESETS)}")
        weights = PRESETS[weights]
    unknown = [name for name in weights if name not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward name(s) {unknown}; known rewards: {sorted(REWARDS)}")
    if not weights:
        raise ValueError("no reward functions given")
    return [(name, float(w), REWARDS[name]) for name, w in weights.items()]


def compute_rewards(reward_fns: list[tuple[str, float, RewardFn]], completions: list[str],
                    samples: list[dict]) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted total per completion, {name: unweighted values}) — the breakdown is for logging."""
    per_name = {name: fn(completions, samples) for name, _, fn in reward_fns}
    totals = [sum(w * per_name[name][i] for name, w, _ in reward_fns) for i in range(len(completions))]
    return totals, per_name


def weighted_sum(reward_fns: list[tuple[str, float, RewardFn]], completions: list[str],
                 samples: list[dict]) -> list[float]:
    """sum_k weight_k * reward_k(completion) for each completion."""
    return compute_rewards(reward_fns, completions, samples)[0]
