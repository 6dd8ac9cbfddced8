"""CoT supervised fine-tuning for reasoning-NER: parse config → (generate CoT data) → build parts → grpo.sft.

    python train_sft.py --config configs/sft_smollm2_conll.yaml
    python train_sft.py --config configs/sft_smollm2_conll.yaml --max_steps 3 --out_dir runs/sft_smoke
    torchrun --nproc_per_node=2 train_sft.py --config configs/sft_smollm2_conll.yaml
Every config field is also a command-line flag (``--help`` lists them). The final checkpoint folder is a plain
Hugging Face model: pass it as ``--model`` to train_grpo.py.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from grpo.cli import run_cli
from grpo.config import check_paths, parse_config
from grpo.config import option as _f
from grpo.distributed import barrier, cleanup, init_distributed, shard_trainable
from grpo.errors import UserError
from grpo.host_memory import keep_freed_memory_for_training
from grpo.models import check_model_spec, load_model_and_tokenizer, parse_dtype
from grpo.run_dir import plan_run
from grpo.sft import SFTConfig, tokenize_pairs, train_sft
from ner.config_checks import dataset_problems, format_problems
from ner.prompts import limit_empty_answers
from ner.recipe import default_stop, recipe_files, recipe_for_training, set_stop_strings
from ner.sft_data import instruction_groups, read_cot_records, sft_pairs


@dataclass
class NERSFTConfig(SFTConfig):
    """CoT SFT for reasoning-NER: the SFT fields plus the CoT-generation fields (stage 1, ner.cot)."""
    dataset: str = _f("", "if set, first generate (or complete) the CoT file `data` from this data set with ner.cot "
                          "(several joined by commas: their mix, ner/mixture.py); empty = `data` must already exist")
    split: str = _f("train", "split for CoT generation")
    data_dir: str | None = _f(None, "data folder (default $NER_DATA_DIR or ../shared/data)")
    limit: int = _f(0, "CoT generation: first N sentences (0 = all)")
    sentence_seed: int = _f(-1, "-1: the first `limit` sentences in file order; N ≥ 0: the first `limit` of one fixed "
                                "shuffle of the split by seed N (the GRPO stage's sentence_seed)")
    format: str = _f("tagged", "tagged (blog) | json (ReasoningNER); use the GRPO stage's format so SFT → GRPO "
                               "composes")
    k_shot: int = _f(2, "few-shot examples per prompt (as in the GRPO stage)")
    prompt_seed: int = _f(0, "seed of the few-shot choice (as in the GRPO stage)")
    teacher: str = _f("template", "CoT teacher: template | model spec | http(s)://… (see ner.cot)")
    cot_mode: str = _f("rationalise", "rationalise (teacher sees gold) | free")
    max_empty_ratio: float = _f(-1.0, "keep at most this many empty-answer records per record with an entity "
                                      "(tagged CoNLL is ~2/3 empty; a small model then answers none to all); "
                                      "negative = keep all")

    def config_problems(self, world_size: int = 1) -> list[str]:
        from ner.cot import MODES

        problems = super().config_problems(world_size) + format_problems(self.format)
        if self.cot_mode not in MODES:
            problems.append(f"cot_mode={self.cot_mode!r}: expected one of {', '.join(MODES)}")
        for name in ("limit", "k_shot"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be ≥ 0")
        return problems

    def path_problems(self) -> list[str]:
        problems = super().path_problems()
        if self.dataset:
            problems += dataset_problems("dataset", self.dataset, self.split, self.data_dir)
            if self.k_shot > 0:
                problems += dataset_problems("dataset", self.dataset, "train", self.data_dir)
        elif not Path(self.data).is_file():
            problems.append(f"data={self.data}: no such file (set dataset to generate it)")
        if self.teacher != "template" and not self.teacher.startswith(("http://", "https://")):
            try:
                check_model_spec(self.teacher, "teacher")
            except UserError as exc:
                problems.append(str(exc))
        return problems


def ensure_cot_data(cfg: NERSFTConfig) -> None:
    """Generate the missing records of ``cfg.data`` (resumable: records already there are kept)."""
    from ner.cot import build_cot_records, generate_cot, make_teacher

    records, sentences = build_cot_records(cfg.dataset, cfg.split, cfg.format, cfg.limit, cfg.k_shot,
                                           cfg.prompt_seed, cfg.data_dir, cfg.sentence_seed)
    generate_cot(records, sentences, make_teacher(cfg.teacher, seed=cfg.seed), cfg.data, cfg.cot_mode,
                 log=lambda s: print(s, file=sys.stderr))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(NERSFTConfig, argv)
    check_paths(cfg)
    info = init_distributed()
    plan = plan_run(cfg, info)  # refuses a reused out_dir or a changed config before anything loads
    torch.manual_seed(cfg.seed)
    keep_freed_memory_for_training(info.device.type, info.rank)  # else CPU steps re-fault the pages they freed
    if cfg.dataset and info.rank == 0:
        ensure_cot_data(cfg)
    barrier()

    # Read (and validate) the CoT file before the model loads, so a bad line costs no load time.
    records = limit_empty_answers(read_cot_records(cfg.data), cfg.max_empty_ratio, cfg.seed)
    # fp32 master weights, compute in cfg.dtype (grpo.distributed.shard_trainable)
    model, tokenizer = load_model_and_tokenizer(cfg.model, "float32", info.device)
    rows, dropped = tokenize_pairs(tokenizer, sft_pairs(records, tokenizer), cfg.max_len, instruction_groups(records))
    # The prompt recipe goes into every checkpoint, the stop string into its generation_config.json (predict.py).
    recipe = recipe_for_training(cfg.format, cfg.dataset, cfg.split, cfg.data_dir, cfg.k_shot, cfg.prompt_seed,
                                 default_stop(cfg.format), 256, "sft", records)
    set_stop_strings(model, recipe)
    if info.rank == 0:
        print(f"sft data: {len(records)} accepted CoT records from {cfg.data}; {dropped} longer than "
              f"max_len={cfg.max_len} dropped", file=sys.stderr)
    model = shard_trainable(model, info, parse_dtype(cfg.dtype))
    state = train_sft(cfg, model, tokenizer, rows, info, run_plan=plan, extra_files=recipe_files(recipe))
    cleanup()
    return state


if __name__ == "__main__":
    run_cli(main)
