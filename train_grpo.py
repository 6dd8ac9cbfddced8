"""GRPO for reasoning-NER: parse config → build parts → grpo.trainer.train.

    python train_grpo.py --config configs/grpo_smollm2_conll.yaml
    torchrun --nproc_per_node=2 train_grpo.py --config configs/grpo_smollm2_conll.yaml --total_steps 5
Every config field is also a command-line flag (``--help`` lists them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grpo.cli import run_cli
from grpo.config import check_paths, parse_config
from grpo.config import dict_option as _dict
from grpo.config import option as _f
from grpo.distributed import cleanup, init_distributed, shard_model, shard_trainable
from grpo.engine_factory import build_engine
from grpo.errors import UserError
from grpo.grpo_config import GRPOConfig
from grpo.host_memory import keep_freed_memory_for_training
from grpo.models import check_model_spec, load_model, load_model_and_tokenizer, parse_dtype
from grpo.rollout_io import tokenize_prompts
from grpo.run_dir import plan_run
from grpo.trainer import train
from ner.config_checks import dataset_problems, format_problems, reward_problems, reward_weights_help
from ner.evaluation import make_eval_fn
from ner.headroom import keep_disagreeing_prompts
from ner.mixture import load_mixture, mixture_prompts
from ner.prompts import limit_empty_answers
from ner.recipe import default_stop, recipe_files, recipe_for_training, set_stop_strings
from ner.rewards import PRESETS, build_reward_fns
from ner.user_data import is_single_file


@dataclass
class NERGRPOConfig(GRPOConfig):
    """GRPO for reasoning-NER: the trainer's fields (grpo/grpo_config.py) plus the task's data and prompt fields."""
    dataset: str = _f("conll2003", "training set: a registered name (conll2003, crossner_ai, …) or a data file; "
                                   "several joined by commas train on their mix, each sentence asked its own "
                                   "data set's types (ner/mixture.py)")
    split: str = _f("train", "training split")
    data_dir: str | None = _f(None, "data folder (default $NER_DATA_DIR or ../shared/data)")
    offset: int = _f(0, "skip the first N training sentences (e.g. the ones CoT tuning used)")
    limit: int = _f(0, "then use the next N training sentences (0 = all)")
    sentence_seed: int = _f(-1, "-1: offset/limit count sentences in file order; N ≥ 0: in one fixed shuffle of the "
                                "split by seed N (use the SFT stage's seed, so its sentences and these stay disjoint)")
    format: str = _f("tagged", "tagged (blog: one prompt per type) | json (ReasoningNER: all types at once)")
    k_shot: int = _f(2, "few-shot examples per prompt, drawn from the training split (see fewshot_data)")
    fewshot_data: str = _f("", "where few-shot examples come from: a registered name or folder (its train split) or "
                               "a data file; empty = the dataset's train split (for a single-file eval_dataset: "
                               "the training dataset's). Never the data being evaluated")
    label_map: dict[str, str] = _dict({}, "rename data files' types to the names the model knows, e.g. "
                                          "PER=person,LOC=location (registered data sets are never renamed)")
    prompt_seed: int = _f(0, "seed of the few-shot example choice")
    max_empty_ratio: float = _f(-1.0, "keep at most this many training prompts whose gold is empty per prompt "
                                      "with an entity (tagged CoNLL is ~2/3 empty); negative = keep all")
    ref_model: str | None = _f(None, "reference model (default: the initial policy, i.e. --model)")
    eval_dataset: str = _f("conll2003", "dev set for periodic evaluation")
    eval_split: str = _f("dev", "split of eval_dataset (empty for a single data file, which has no splits)")
    prompt_filter: str = _f("", "path of a ner.headroom JSONL: train only on the prompts it covers whose G sampled "
                                "rewards were not all equal (dropped: prompts it marks all_equal AND prompts it does "
                                "not cover); fails if its prompts are not this config's. Offline twin of "
                                "dynamic_sampling, which masks such groups online; empty = off")
    # Without a reward nothing trains, so plain `python train_grpo.py` gets ReasoningNER's (10·F1 + 1·schema):
    # it scores both formats, and unlike the blog's it does not pay for answering nothing (README).
    reward_weights: dict[str, float] = _dict(PRESETS["reasoningner"], reward_weights_help(), presets=PRESETS)

    def config_problems(self, world_size: int = 1) -> list[str]:
        problems = super().config_problems(world_size)  # it also rejects empty reward_weights
        problems += format_problems(self.format) + reward_problems(self.reward_weights)
        for name in ("offset", "limit", "k_shot"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be ≥ 0")
        return problems

    def path_problems(self) -> list[str]:
        problems = super().path_problems() + dataset_problems("dataset", self.dataset, self.split or "train",
                                                              self.data_dir)
        if self.k_shot > 0:  # the few-shot pool: a train split (of fewshot_data when given)
            problems += dataset_problems("fewshot_data" if self.fewshot_data else "dataset",
                                         self.fewshot_data or self.dataset, "train", self.data_dir)
        if self.eval_limit > 0:
            problems += dataset_problems("eval_dataset", self.eval_dataset, self.eval_split or "test", self.data_dir)
        if self.ref_model is not None:
            try:
                check_model_spec(self.ref_model, "ref_model")
            except UserError as exc:
                problems.append(str(exc))
        if self.prompt_filter and not Path(self.prompt_filter).is_file():
            problems.append(f"prompt_filter={self.prompt_filter}: no such file")
        return problems


def build_train_prompts(cfg: NERGRPOConfig, tokenizer) -> tuple[list[dict], int]:
    """The GRPO prompt list of ``cfg`` (before ``prompt_filter``): dataset, split, offset, limit, sentence_seed,
    format, k_shot, prompt_seed, max_empty_ratio, then the max_prompt_len cut. Returns (records, how many the cut
    dropped).

    train_grpo.main and ner.headroom both call this, so a headroom file's indices are this list's. Each record
    carries its ``prompt_ids`` (the trainer's tokenize_prompts uses them as they are instead of tokenizing again).
    """
    members = load_mixture(cfg.dataset, cfg.split, cfg.data_dir, cfg.label_map, cfg.offset, cfg.limit,
                           cfg.sentence_seed)
    prompts, _ = mixture_prompts(members, cfg.format, cfg.k_shot, cfg.prompt_seed, cfg.data_dir, cfg.label_map,
                                 cfg.fewshot_data)
    prompts = limit_empty_answers(prompts, cfg.max_empty_ratio, cfg.seed)
    ids, kept, n_dropped = tokenize_prompts(tokenizer, prompts, cfg.max_prompt_len)
    return [{**record, "prompt_ids": toks} for record, toks in zip(kept, ids)], n_dropped


def build_rollout_engine(cfg: NERGRPOConfig, policy: torch.nn.Module, tokenizer):
    """The rollout engine of ``cfg`` over ``policy`` (shared by train_grpo.main and ner.headroom)."""
    return build_engine(cfg.engine, policy, tokenizer, max_batch_tokens=cfg.max_batch_tokens,
                        max_model_len=cfg.max_prompt_len + cfg.max_completion_len,
                        kv_cache_gib=cfg.vllm_kv_cache_gib,
                        gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, seed=cfg.seed, dtype=cfg.dtype,
                        rollout_dtype=cfg.rollout_dtype)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(NERGRPOConfig, argv)
    check_paths(cfg)
    info = init_distributed()
    plan = plan_run(cfg, info)  # refuses a reused out_dir or a changed config before anything loads
    torch.manual_seed(cfg.seed)
    keep_freed_memory_for_training(info.device.type, info.rank)  # else CPU steps re-fault the pages they freed

    # fp32 master weights, compute in cfg.dtype (grpo.distributed.shard_trainable)
    policy, tokenizer = load_model_and_tokenizer(cfg.model, "float32", info.device)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy = shard_trainable(policy, info, parse_dtype(cfg.dtype))
    ref_model = None
    if cfg.beta > 0:  # β = 0: no reference model is ever built
        ref_model = shard_model(load_model(cfg.ref_model or cfg.model, cfg.dtype, info.device), info)
        ref_model.eval().requires_grad_(False)
    engine = build_rollout_engine(cfg, policy, tokenizer)

    prompts, n_long = build_train_prompts(cfg, tokenizer)
    if n_long and info.rank == 0:  # the trainer's own count sees the list after this cut, so report it here
        print(f"{n_long} prompts dropped: longer than max_prompt_len={cfg.max_prompt_len} tokens", flush=True)
    if cfg.prompt_filter:
        prompts, note = keep_disagreeing_prompts(prompts, cfg.prompt_filter)
        if info.rank == 0:
            print(note, flush=True)
    reward_fns = build_reward_fns(cfg.reward_weights)
    # A single eval file has no train split: its few-shot examples come from the training data.
    eval_fewshot = cfg.fewshot_data or (cfg.dataset if is_single_file(cfg.eval_dataset) else "")
    eval_fn = make_eval_fn(engine, tokenizer, cfg.eval_dataset, cfg.eval_split, cfg.eval_limit, cfg.format,
                           cfg.k_shot, cfg.prompt_seed, cfg.max_completion_len, cfg.data_dir,
                           stop=cfg.stop or None, fewshot_data=eval_fewshot,
                           label_map=cfg.label_map, max_prompt_len=cfg.max_prompt_len
                           ) if cfg.eval_limit > 0 else None

    # The prompt recipe goes into every checkpoint, the stop string into its generation_config.json (predict.py).
    recipe = recipe_for_training(cfg.format, cfg.dataset, cfg.split, cfg.data_dir, cfg.k_shot, cfg.prompt_seed,
                                 default_stop(cfg.format, cfg.stop), cfg.max_completion_len, "grpo", prompts)
    set_stop_strings(policy, recipe)
    train(cfg, policy, tokenizer, prompts, reward_fns, info, engine, ref_model=ref_model, eval_fn=eval_fn,
          run_plan=plan, extra_files=recipe_files(recipe))
    cleanup()


if __name__ == "__main__":
    run_cli(main)
