"""Measure reasoning-NER F1 of a causal LM: generate → parse → score → report.json + report.md.

    python evaluate.py --model smollm2-135m-instruct --dataset conll2003 --split test --limit 500 --format tagged
    python evaluate.py --model runs/grpo/checkpoint-0000020 --dataset crossner_ai,crossner_music --format json
    python evaluate.py --model runs/grpo_smollm2_conll --dataset crossner --format json --k_shot 0
    python evaluate.py --dataset crossner --format json --k_shot 0 --max_new_tokens 512 --fit_only
    python evaluate.py --compare outputs/sft/report.json outputs/grpo/report.json --out_dir outputs/sft_vs_grpo
Several datasets give one table with a row per dataset and their average, and ReasoningNER's Table 1 layout
(ner/crossner_table.py: a column per dataset, a row per protocol, the published rows). Every dataset's fit (answers
cut by --max_new_tokens, prompts over --max_prompt_len) is reported; --fit_only counts tokens without a model. report.json keeps every sentence's
gold, prediction and raw answers, and the micro scores under each protocol of ner/protocols.py (--protocol);
``--compare`` reads two such files (no model is loaded) and reports B − A with paired bootstrap intervals.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from grpo.cli import run_cli
from grpo.config import ConfigError, check_paths, list_option, parse_config
from grpo.config import dict_option as _dict
from grpo.errors import UserError
from grpo.config import option as _f
from ner.config_checks import dataset_problems, format_problems
from ner.metrics import MODES as MATCH_MODES
from ner.metrics import format_table
from ner.protocols import format_protocols, protocol_names, score_protocols


@dataclass
class EvalConfig:
    """Evaluate a model's reasoning-NER F1 on data sets (or: `--compare A/report.json B/report.json --help`)."""
    model: str = _f("smollm2-135m-instruct", "model: local folder / checkpoint, hub id, or smollm2-135m-instruct")
    dataset: list[str] = list_option(["conll2003"], "one or more registered names, groups (crossner: its five "
                                                    "domains in ReasoningNER's Table 1 order) or data files "
                                                    "(comma-separated)")
    split: str = _f("", "split to evaluate of a registered data set or a folder of train/dev/test files "
                        "(empty = test); a single data file is scored whole and takes no split")
    limit: int = _f(0, "first N sentences of each dataset (0 = all); the output says how many of how many")
    format: str = _f("", "tagged (one prompt per type) | json (all types at once); default: the checkpoint's "
                         "prompt_recipe.json, else tagged")
    k_shot: int = _f(-1, "few-shot examples per prompt (see --fewshot_data); -1: the checkpoint recipe's, else 2")
    fewshot_data: str = _f("", "where few-shot examples come from: a registered name or folder (its train split) "
                               "or a data file; empty = the evaluated data set's train split. A single data file "
                               "needs it (or --k_shot 0): examples never come from the scored file")
    label_map: dict[str, str] = _dict({}, "rename a data file's types to the names the model knows, e.g. "
                                          "PER=person,LOC=location,ORG=organisation,MISC=misc (they then get "
                                          "those names' descriptions); registered data sets are never renamed")
    schema: str = _f("", "a .yaml/.json file of `type: description` (ner/schema.py): the descriptions the prompt "
                         "shows for your data's types, over the data set's and the checkpoint recipe's")
    prompt_seed: int = _f(0, "seed of the few-shot example choice")
    max_new_tokens: int = _f(256, "generation budget per answer; answers it cuts are counted per dataset")
    guided_json: bool = _f(False, "json format, torch engine: write the answer's keys (every asked type, in order) "
                                  "and closing braces for the model, as a schema-guided decoder would; the model "
                                  "writes the lists (ner/json_guide.py). The fit table counts the answers it changed")
    max_prompt_len: int = _f(0, "sentences whose prompt is longer than this many tokens are left out and counted "
                                "(0 = keep every sentence)")
    fit_only: bool = _f(False, "count prompt and gold-answer tokens per dataset with the model's tokenizer alone "
                               "(ner/token_fit.py) against --max_new_tokens / --max_prompt_len; no model loads")
    temperature: float = _f(0.0, "0 = greedy")
    batch_size: int = _f(256, "prompts per engine call; more than run at once, so that waiting prompts take the "
                                "places of finished ones (continuous batching)")
    engine: str = _f("auto", "torch | vllm | auto (vllm on a CUDA machine with vLLM installed, else torch)")
    max_batch_tokens: int = _f(65536, "torch engine memory bound")
    match: str = _f("exact", "span matching: exact | normalized (UniversalNER-style)")
    dtype: str = _f("float32", "model dtype")
    data_dir: str | None = _f(None, "data folder (default $NER_DATA_DIR or ../shared/data)")
    out_dir: str = _f("outputs/eval", "where report.json and report.md go")
    samples: int = _f(10, "sample outputs shown in report.md")
    protocol: str = _f("all", "micro P/R/F1 protocols printed and saved: strict | blog | reasoningner | all "
                              "(ner/protocols.py); the per-type table is always --match scoring")

    def validate(self) -> None:
        from grpo.grpo_config import dtype_problems
        from ner.crossner_table import expand_dataset_groups

        self.dataset = expand_dataset_groups(self.dataset)

        problems = (format_problems(self.format) if self.format else []) + dtype_problems(self.dtype)  # "": recipe
        try:
            protocol_names(self.protocol)
        except ValueError as exc:
            problems.append(f"--protocol: {exc}")
        if self.match not in MATCH_MODES:
            problems.append(f"match={self.match!r}: expected one of {', '.join(MATCH_MODES)}")
        if self.engine not in ("torch", "vllm", "auto"):
            problems.append(f"engine={self.engine!r}: expected torch | vllm | auto")
        if self.guided_json and self.engine == "vllm":
            problems.append("guided_json needs the torch engine (its forced tokens have no vLLM counterpart here)")
        for name in ("limit", "samples", "max_prompt_len"):
            if getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)} must be ≥ 0")
        if self.k_shot < -1:
            problems.append(f"k_shot={self.k_shot} must be ≥ 0 (or -1: the checkpoint recipe's)")
        for name in ("max_new_tokens", "batch_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.temperature < 0:
            problems.append("temperature must be ≥ 0")
        if not self.dataset:
            problems.append("dataset is empty: name at least one data set")
        from ner.user_data import check_label_map, check_split
        try:
            check_label_map(self.label_map)
            for name in self.dataset:
                check_split(name, self.split)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("invalid evaluation config: " + "; ".join(problems))

    def path_problems(self) -> list[str]:
        """Data sets and the model that do not exist; the data's contents (splits of a folder, the few-shot pool,
        the label map) are checked by ner.evaluation.load_eval_data, still before the model loads."""
        from grpo.models import check_model_spec

        problems = []
        for name in self.dataset:
            problems += dataset_problems("dataset", name, self.split or "test", self.data_dir)
        if self.schema and not Path(self.schema).is_file():
            problems.append(f"schema={self.schema}: no such file")
        try:
            check_model_spec(self.model)
        except UserError as exc:
            problems.append(str(exc))
        return problems


def main(argv: list[str] | None = None) -> dict:
    """Evaluate (see EvalConfig), or with ``--compare A B`` compare two report.json files (ner/compare.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--compare" in argv:
        from ner.compare import main as compare_main  # numpy and JSON only: a comparison must not wait for torch
        return compare_main(argv)
    cfg = parse_config(EvalConfig, argv)
    check_paths(cfg)
    return evaluate(cfg)


def prompt_descriptions(name: str, recipe_descriptions: dict[str, str] | None, schema: str
                        ) -> dict[str, str] | None:
    """The type descriptions the prompts show for data set ``name``, over the data set's own.

    A registered data set defines its types itself: CrossNER politics' `person` excludes politicians, CoNLL's does
    not, so a model is scored zero-shot on a new domain by that domain's definitions, never by the ones its
    checkpoint recipe trained on. The recipe's descriptions apply to data files and folders, whose own are generic
    fallbacks; a ``--schema`` file's apply to every data set and win.
    """
    from ner.data import REGISTRY

    merged = {} if name in REGISTRY else dict(recipe_descriptions or {})
    if schema:
        from ner.schema import read_schema_file

        merged.update(read_schema_file(schema).descriptions)
    return merged or None


def evaluate(cfg: EvalConfig) -> dict:
    """Generate, score and write report.json / report.md for every dataset of ``cfg``."""
    import torch  # here, not at the top, so that --compare never imports torch or transformers

    from grpo.engine_factory import build_engine
    from grpo.errors import report_disk_full
    from grpo.models import load_model_and_tokenizer
    from ner.data import load_ner_dataset
    from ner.crossner_table import format_table1, table1
    from ner.evaluation import evaluate_dataset, load_eval_data
    from ner.recipe import evaluation_settings
    from ner.token_fit import format_generation_fit

    cfg.format, cfg.k_shot, stop, descriptions, note = evaluation_settings(cfg.model, cfg.format, cfg.k_shot)
    print(f"prompt: {note}", file=sys.stderr)
    shown = {name: prompt_descriptions(name, descriptions, cfg.schema) for name in cfg.dataset}
    for name in cfg.dataset:  # every data problem surfaces before the model loads
        load_eval_data(name, cfg.split, cfg.limit, cfg.k_shot, cfg.data_dir, cfg.fewshot_data, cfg.label_map)
    if cfg.fit_only:
        return fit_only(cfg, shown)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype, device)
    model.eval()
    engine = build_engine("torch" if cfg.guided_json else cfg.engine, model, tokenizer,
                          max_batch_tokens=cfg.max_batch_tokens)
    results, md = {}, [f"# Evaluation of `{cfg.model}`\n",
                       f"format `{cfg.format}`, k_shot {cfg.k_shot}, split `{cfg.split or 'test'}`, limit {cfg.limit}, "
                       f"match `{cfg.match}`, temperature {cfg.temperature}"
                       + (", --guided_json" if cfg.guided_json else "") + "\n"]
    for name in cfg.dataset:
        t0 = time.perf_counter()
        report, rows, sentences, fit = evaluate_dataset(
            engine, tokenizer, name, cfg.split, cfg.limit, cfg.format, cfg.k_shot, cfg.prompt_seed,
            cfg.max_new_tokens, cfg.data_dir, stop=stop, mode=cfg.match, batch_size=cfg.batch_size,
            temperature=cfg.temperature, fewshot_data=cfg.fewshot_data, label_map=cfg.label_map,
            descriptions=shown[name], max_prompt_len=cfg.max_prompt_len or None, guided_json=cfg.guided_json)
        seconds = time.perf_counter() - t0
        table = format_table(report)
        # report.per_type is keyed by the dataset's schema, in its order: the types the protocols score.
        protocols = score_protocols([s["gold"] for s in sentences], [s["pred"] for s in sentences],
                                    list(report.per_type), cfg.protocol)
        protocol_table = format_protocols(protocols)
        n_total = len(load_ner_dataset(name, cfg.split or "test", cfg.data_dir).sentences)  # a cached read
        scored = f"{len(sentences)} of {n_total} {cfg.split or 'test'} sentences" + (
            f" (the first {cfg.limit}: --limit; 0 = all)" if len(sentences) < n_total else "")
        print(f"\n== {name} ({seconds:.0f} s): scored {scored}\n{table}\n\nmicro scores by protocol\n{protocol_table}")
        results[name] = {"report": report.to_dict(), "seconds": seconds, "sentences_scored": len(sentences),
                         "sentences_total": n_total,
                         "format_ok": sum(r["format_ok"] for r in rows) / max(len(rows), 1),
                         "protocols": protocols, "fit": fit, "sentences": sentences}
        md += [f"\n## {name}\n", f"Scored {scored}.\n", table, "\n### Micro scores by protocol\n", protocol_table, "\n### Errors\n",
               "\n".join(f"- {k}: {v}" for k, v in report.to_dict().get("errors", {}).items()),
               "\n### Sample outputs\n"]
        for r in rows[:cfg.samples]:
            md.append(f"- **{r['sentence']}** (types {', '.join(r['types'])})\n  - gold: `{json.dumps(r['gold'])}`"
                      f"\n  - output: `{r['completion']!r}`\n  - parsed: `{json.dumps(r['pred'])}`")
    summary = ["| dataset | precision | recall | F1 | format ok |", "|---|---|---|---|---|"]
    for name, res in results.items():
        r = res["report"]
        summary.append(f"| {name} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {res['format_ok']:.3f} |")
    if len(results) > 1:
        avg = {k: sum(res["report"][k] for res in results.values()) / len(results) for k in ("precision", "recall", "f1")}
        fmt_ok = sum(res["format_ok"] for res in results.values()) / len(results)
        summary.append(f"| **average** | {avg['precision']:.4f} | {avg['recall']:.4f} | {avg['f1']:.4f} | {fmt_ok:.3f} |")
        results["average"] = avg
    fits = format_generation_fit({name: res["fit"] for name, res in results.items() if "fit" in res})
    overview = ["\n" + "\n".join(summary) + "\n", "\n## Fit: answers cut, prompts dropped\n", fits]
    saved = {"config": vars(cfg), "results": results}
    if len(cfg.dataset) > 1:
        saved["table1"] = table1(results)
        overview[1:1] = ["\n## Table 1 layout (ReasoningNER, zero-shot CrossNER): F1 %\n",
                         format_table1(saved["table1"])]
    print("\n".join(overview))
    out = Path(cfg.out_dir)
    with report_disk_full(out):
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(saved, indent=2))
        (out / "report.md").write_text("\n".join(md[:2] + overview + md[2:]) + "\n")
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}")
    return results


def fit_only(cfg: EvalConfig, descriptions: dict[str, dict[str, str] | None]) -> dict:
    """``--fit_only``: ner.token_fit's counts of every dataset's prompts and gold answers, with the tokenizer only."""
    from grpo.models import load_tokenizer
    from ner.evaluation import build_eval_records
    from ner.token_fit import format_tokenizer_fit, tokenizer_fit

    tokenizer = load_tokenizer(cfg.model)
    fits = {}
    for name in cfg.dataset:
        data, records = build_eval_records(name, cfg.split, cfg.limit, cfg.format, cfg.k_shot, cfg.prompt_seed,
                                           cfg.data_dir, cfg.fewshot_data, cfg.label_map,
                                           descriptions[name])
        fits[name] = tokenizer_fit(tokenizer, data, records, cfg.max_new_tokens, cfg.max_prompt_len or None)
    print(f"tokens of `{cfg.model}`'s tokenizer, format {cfg.format}, k_shot {cfg.k_shot}\n"
          + format_tokenizer_fit(fits))
    return fits


if __name__ == "__main__":
    run_cli(main)
