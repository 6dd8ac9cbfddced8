"""Headroom before GRPO: how much better than its greedy answer can the policy do by sampling, and how many groups
would give GRPO no signal at all?

    python -m ner.headroom --config configs/grpo_smollm2_conll.yaml --headroom_prompts 64 --headroom_out h.jsonl
    python train_grpo.py --config configs/grpo_smollm2_conll.yaml --prompt_filter h.jsonl   # optional, see below

Any train_grpo.py flag may follow the config (``--model runs/sft_smollm2_conll``, ``--group_size 16``, …). The
prompt list is train_grpo's own (``train_grpo.build_train_prompts``: same dataset, split, limit, format, k_shot,
prompt_seed, max_empty_ratio and max_prompt_len cut), and the prompts are taken in the order the trainer draws
them (its epoch-0 permutation, ``grpo.trainer.step_prompt_indices``): the first N are the prompts of the first
N / prompts_per_step steps. ``--headroom_prompts 0`` measures every prompt.

For each prompt: one greedy completion, and ``group_size`` samples at the config's temperature / top_p, both with
its stop strings and max_completion_len. Each is scored with the configured reward callables (weighted sum, plus
the DAPO overlong penalty when ``overlong_buffer`` > 0, as in the trainer; kl_in_reward is not applied) and with
the prompt's entity F1 (the ``f1`` reward of ner.rewards; an unparseable answer scores 0). A group whose G rewards are
all equal has zero advantage everywhere: GRPO cannot learn from it. The samples are drawn from the same
distribution as the trainer's, not with its seeds.

Output: a summary on stdout and one JSONL line per prompt (written and flushed as it goes):
    {"index": position in train_grpo's prompt list, "sentence_id", "types", "greedy_f1", "greedy_reward",
     "sample_f1": [G], "rewards": [G], "all_equal": bool}

``keep_disagreeing_prompts`` turns such a file into train_grpo's ``prompt_filter``: an offline version of the
trainer's ``dynamic_sampling`` (DAPO), which masks the zero-variance groups of every step online instead.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from grpo import algos
from grpo.config import parse_config
from grpo.distributed import DistInfo
from grpo.models import load_model_and_tokenizer
from grpo.trainer import step_prompt_indices
from ner.rewards import RewardFn, build_reward_fns, f1_reward, weighted_sum


def prompt_key(record: dict) -> tuple[str, tuple[str, ...]]:
    """What identifies a prompt across runs: (sentence_id, asked types)."""
    return str(record["sentence_id"]), tuple(record["types"])


def trainer_order(cfg, n_prompts: int, count: int) -> list[int]:
    """The first ``count`` prompt indices (0 = all) in the order the trainer draws them for ``cfg``.

    Only epoch 0 is used (count is capped at n_prompts), so no prompt appears twice.
    """
    count = n_prompts if count <= 0 else min(count, n_prompts)
    one_rank = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    order: list[int] = []
    step = 0
    while len(order) < count:
        order += step_prompt_indices(step, cfg, n_prompts, one_rank)
        step += 1
    return order[:count]


def _rewards(reward_fns: list[tuple[str, float, RewardFn]], rollouts: list, records: list[dict],
             max_new_tokens: int, overlong_buffer: int, overlong_penalty: float) -> list[float]:
    """The trainer's reward of each rollout: weighted sum of the callables (+ the overlong penalty if on)."""
    total = torch.tensor(weighted_sum(reward_fns, [r.text for r in rollouts], records), dtype=torch.float32)
    if overlong_buffer > 0:
        lengths = torch.tensor([len(r.completion_ids) for r in rollouts], dtype=torch.float32)
        total = total + algos.overlong_penalty(lengths, max_new_tokens, overlong_buffer, overlong_penalty)
    return total.tolist()


def measure_headroom(engine, prompts: list[dict], indices: list[int],
                     reward_fns: list[tuple[str, float, RewardFn]], *, group_size: int, temperature: float,
                     top_p: float, stop: list[str] | None, max_new_tokens: int, seed: int = 0,
                     overlong_buffer: int = 0, overlong_penalty: float = 1.0, out_path: str | Path | None = None,
                     batch_prompts: int = 16, progress: bool = True) -> list[dict]:
    """Greedy + ``group_size`` samples for ``prompts[i]`` for i in ``indices``; one row per prompt (see module doc).

    ``prompts`` are train_grpo records carrying ``prompt_ids``. Rows go to ``out_path`` (JSONL, overwritten) as
    each batch of ``batch_prompts`` prompts finishes, so a long run can be read while it works.
    """
    rows: list[dict] = []
    out = open(out_path, "w", encoding="utf-8") if out_path else None
    try:
        with tqdm(total=len(indices), desc="headroom", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(indices), batch_prompts):
                batch = indices[start:start + batch_prompts]
                records = [prompts[i] for i in batch]
                ids = [list(r["prompt_ids"]) for r in records]
                greedy = engine.generate(ids, n=1, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop,
                                         seed=seed)
                sampled = engine.generate(ids, n=group_size, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p, stop=stop,
                                          seed=seed * 1_000_003 + start)
                repeated = [r for r in records for _ in range(group_size)]
                greedy_rewards = _rewards(reward_fns, greedy, records, max_new_tokens, overlong_buffer,
                                          overlong_penalty)
                sample_rewards = _rewards(reward_fns, sampled, repeated, max_new_tokens, overlong_buffer,
                                          overlong_penalty)
                # The trainer's own test for "no signal" (exact equality), so the share matches its
                # frac_reward_zero_std on the same samples.
                all_equal = algos.zero_variance_groups(torch.tensor(sample_rewards), group_size).tolist()
                # Entity F1 whatever the configured reward: the f1 reward itself (0 when an answer does not parse).
                greedy_f1 = f1_reward([r.text for r in greedy], records)
                sample_f1 = f1_reward([r.text for r in sampled], repeated)
                for j, (index, record) in enumerate(zip(batch, records)):
                    group = slice(j * group_size, (j + 1) * group_size)
                    row = {"index": index, "sentence_id": record["sentence_id"], "types": list(record["types"]),
                           "greedy_f1": greedy_f1[j],
                           "greedy_reward": greedy_rewards[j],
                           "sample_f1": sample_f1[group],
                           "rewards": sample_rewards[group], "all_equal": bool(all_equal[j])}
                    rows.append(row)
                    if out:
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
                if out:
                    out.flush()
                bar.update(len(batch))
    finally:
        if out:
            out.close()
    return rows


def summarize(rows: list[dict]) -> dict[str, float]:
    """Means over prompts: greedy F1, F1 of one sample, best-of-G F1 (mean of each group's max), greedy and sample
    reward, and the share of groups whose rewards are all equal."""
    n = len(rows)
    if n == 0:
        return {"prompts": 0}

    def mean(values) -> float:
        values = list(values)
        return sum(values) / len(values)

    return {"prompts": n,
            "greedy_f1": mean(r["greedy_f1"] for r in rows),
            "sample_f1": mean(f for r in rows for f in r["sample_f1"]),
            "best_of_g_f1": mean(max(r["sample_f1"]) for r in rows),
            "greedy_reward": mean(r["greedy_reward"] for r in rows),
            "sample_reward": mean(x for r in rows for x in r["rewards"]),
            "all_equal_share": sum(r["all_equal"] for r in rows) / n}


def format_summary(summary: dict[str, float], group_size: int) -> str:
    """The console report of ``summarize``."""
    if not summary.get("prompts"):
        return "headroom: no prompts measured"
    n, share = summary["prompts"], summary["all_equal_share"]
    return "\n".join([
        f"headroom on {n} prompts, G = {group_size}",
        f"  entity F1  greedy {summary['greedy_f1']:.3f} | one sample {summary['sample_f1']:.3f} | "
        f"best of {group_size} {summary['best_of_g_f1']:.3f}",
        f"  reward     greedy {summary['greedy_reward']:.3f} | one sample {summary['sample_reward']:.3f}",
        f"  groups whose {group_size} rewards are all equal (no GRPO signal): {share:.3f} "
        f"({round(share * n)} of {n})"])


def read_headroom(path: str | Path) -> list[dict]:
    """The rows of a headroom JSONL; a bad line raises ValueError naming the file and line."""
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
        missing = [k for k in ("index", "sentence_id", "types", "all_equal") if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: not a ner.headroom row (missing {missing})")
        rows.append({**row, "_line": lineno})
    return rows


def keep_disagreeing_prompts(prompts: list[dict], path: str | Path) -> tuple[list[dict], str]:
    """train_grpo's ``prompt_filter``: keep the prompts that the headroom file at ``path`` covers AND marks as not
    all_equal, in list order. Prompts the file does not cover are dropped (the file says nothing of their groups).

    ``prompts`` must be the list the file was measured on (``train_grpo.build_train_prompts`` of the same config):
    every row's index must name a prompt with the row's (sentence_id, types), else ValueError, because indices into
    a different list would silently train on the wrong prompts. Returns (kept prompts, a one-line note).
    """
    rows = read_headroom(path)
    seen: set[int] = set()
    keep: set[int] = set()
    for row in rows:
        i, where = row["index"], f"{path}:{row['_line']}"
        if not isinstance(i, int) or not 0 <= i < len(prompts):
            raise ValueError(f"{where}: prompt index {i!r} is outside this config's {len(prompts)} prompts: the file "
                             f"was measured on another prompt list; rerun ner.headroom with this config")
        if i in seen:
            raise ValueError(f"{where}: prompt index {i} appears twice")
        seen.add(i)
        found, expected = prompt_key(prompts[i]), (str(row["sentence_id"]), tuple(row["types"]))
        if found != expected:
            raise ValueError(f"{where}: prompt {i} is {expected} in the file but {found} in this config's prompt "
                             f"list: the file was measured with another dataset/split/limit/format/k_shot/"
                             f"prompt_seed/max_empty_ratio/max_prompt_len/seed; rerun ner.headroom with this config")
        if not row["all_equal"]:
            keep.add(i)
    if not keep:
        raise ValueError(f"{path}: every one of its {len(rows)} prompts had all-equal rewards: nothing to train on")
    kept = [p for i, p in enumerate(prompts) if i in keep]
    note = (f"prompt_filter {path}: training on {len(kept)} of {len(prompts)} prompts (the file covers "
            f"{len(rows)}, {len(rows) - len(keep)} of them with all-equal rewards)")
    return kept, note


def main(argv: list[str] | None = None) -> dict[str, float]:
    """CLI: the headroom flags below, then any train_grpo.py flags (``--config`` first)."""
    # train_grpo (a top-level script next to ner/) imports this module for prompt_filter, so it is imported here,
    # not at the top, to avoid a cycle; the path entry lets `python -m ner.headroom` run from any folder.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import train_grpo

    argv = list(sys.argv[1:] if argv is None else argv)
    # Its own flags are split off here; everything else is a train_grpo config flag for parse_config.
    own = argparse.ArgumentParser(prog="python -m ner.headroom", add_help=False, allow_abbrev=False)
    own.add_argument("--headroom_prompts", type=int, default=64, help="prompts to measure (0 = all)")
    own.add_argument("--headroom_out", default="", help="per-prompt JSONL (empty = none)")
    own.add_argument("--headroom_batch", type=int, default=16, help="prompts per engine call")
    args, rest = own.parse_known_args(argv)
    if "--help" in rest or "-h" in rest:
        print(__doc__ + "\n" + own.format_help() + "\nand every train_grpo.py flag:")
    cfg = parse_config(train_grpo.NERGRPOConfig, rest)
    if cfg.prompt_filter:
        print(f"note: prompt_filter={cfg.prompt_filter} is ignored: headroom measures the unfiltered prompt list")
    torch.manual_seed(cfg.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype, device)
    model.eval()
    engine = train_grpo.build_rollout_engine(cfg, model, tokenizer)
    prompts, n_long = train_grpo.build_train_prompts(cfg, tokenizer)
    indices = trainer_order(cfg, len(prompts), args.headroom_prompts)
    print(f"{len(prompts)} prompts ({n_long} longer than max_prompt_len dropped); measuring {len(indices)} in the "
          f"trainer's order with {cfg.model}", flush=True)
    rows = measure_headroom(engine, prompts, indices, build_reward_fns(cfg.reward_weights),
                            group_size=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                            stop=cfg.stop or None, max_new_tokens=cfg.max_completion_len, seed=cfg.seed,
                            overlong_buffer=cfg.overlong_buffer, overlong_penalty=cfg.overlong_penalty,
                            out_path=args.headroom_out or None, batch_prompts=args.headroom_batch)
    summary = summarize(rows)
    print(format_summary(summary, cfg.group_size))
    if args.headroom_out:
        print(f"wrote {args.headroom_out}")
    return summary


if __name__ == "__main__":
    main()
