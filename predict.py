"""Tag entities in new text with any model: parse config → read text → build prompts → generate → JSONL / BIO.

    python predict.py --model runs/sft_smollm2_conll "Angela Merkel met Emmanuel Macron in Paris ."
    python predict.py --model runs/grpo_smollm2_conll --input sentences.txt --output entities.jsonl
    cat notes.txt | python predict.py --model runs/sft_x --labels crossner_music --format bio
    python predict.py --labels "drug=A medicine or active substance;dose" "Take 200 mg of ibuprofen ."
The prompt is rebuilt from the checkpoint's prompt_recipe.json (labels, format, few-shot examples, stop string);
``--labels`` (a data set name, a .yaml/.json file of ``type: description``, or ``person,location``),
``--prompt_format`` and ``--k_shot`` override it. Every config field is also a flag (``--help`` lists them).
Output, one JSON line per sentence: {"text", "entities": [{"text", "type", "start", "end"}], "ungrounded",
"format_ok", "errors"}; ``start``/``end`` are character offsets into "text" (end exclusive).
"""
from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from grpo.cli import run_cli
from grpo.config import ConfigError, parse_config
from grpo.config import option as _f


@dataclass
class PredictConfig:
    """Tag entities in text (a sentence argument, --input FILE, or stdin) with a model; JSONL or BIO out."""
    model: str = _f("smollm2-135m-instruct", "model: checkpoint or run folder, hub id, or smollm2-135m-instruct")
    text: str = _f("", "the sentence to tag (also accepted as a plain argument)")
    input: str = _f("", "file of sentences: .jsonl (a \"text\" field per line) or one sentence per line; - = stdin")
    labels: str = _f("", "label set: a data set name (conll2003, crossner_music, …), a .yaml/.json file of "
                          "type: description, or person,location / person=description;location (default: the "
                          "checkpoint's recipe, else conll2003)")
    prompt_format: str = _f("", "tagged | json (default: the checkpoint's recipe, else json)")
    k_shot: int = _f(-1, "few-shot examples per prompt (-1: the recipe's, else 0)")
    max_new_tokens: int = _f(0, "generation budget per answer (0: the recipe's, else 256)")
    engine: str = _f("auto", "torch | vllm | auto (vllm on a CUDA machine with vLLM installed, else torch)")
    guided_json: bool = _f(False, "json format, torch engine: write each answer's keys (every type, in order) and "
                                  "closing braces for the model (ner/json_guide.py), so a small model asked types it "
                                  "never trained on cannot loop on keys instead of closing its answer")
    batch_size: int = _f(16, "prompts per engine call")
    max_batch_tokens: int = _f(65536, "torch engine memory bound")
    dtype: str = _f("float32", "model dtype")
    data_dir: str | None = _f(None, "data folder for data set label sets (default $NER_DATA_DIR or ../shared/data)")
    occurrences: str = _f("first", "which occurrences a predicted text marks: first (each mention claims the next "
                                   "unclaimed one) | all")
    show_reasoning: bool = _f(False, "add each answer's <think> text and raw completion to the JSONL")
    format: str = _f("jsonl", "output: jsonl | bio (token<TAB>tag lines, a blank line between sentences)")
    output: str = _f("", "output file (default: stdout)")
    overwrite: bool = _f(False, "replace --output if it exists")

    def validate(self) -> None:
        from ner.grounding import OCCURRENCES

        if self.format not in ("jsonl", "bio"):
            raise ConfigError(f"--format {self.format!r}: expected jsonl or bio")
        if self.occurrences not in OCCURRENCES:
            raise ConfigError(f"--occurrences {self.occurrences!r}: expected one of {OCCURRENCES}")
        if self.text and self.input:
            raise ConfigError("give either a sentence or --input, not both")
        if self.output and Path(self.output).exists() and not self.overwrite:
            raise ConfigError(f"--output {self.output} exists; pass --overwrite to replace it")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size must be >= 1, got {self.batch_size}")
        if self.guided_json and self.engine == "vllm":
            raise ConfigError("--guided_json needs the torch engine (its forced tokens have no vLLM counterpart here)")


def split_sentence_argument(argv: list[str]) -> list[str]:
    """Turn plain arguments (``predict.py --model x "Some text ."``) into ``--text``; several are joined by a
    space. A value follows every option except a bool one, which takes only a true/false word."""
    bools = {f.name for f in dataclasses.fields(PredictConfig) if typing.get_type_hints(PredictConfig)[f.name] is bool}
    options, words, i = [], [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("-") and len(token) > 1:
            options.append(token)
            name = token.lstrip("-").split("=")[0].replace("-", "_")
            takes_value = "=" not in token and token not in ("-h", "--help") and (
                name not in bools or (i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false")))
            if takes_value and i + 1 < len(argv):
                options.append(argv[i + 1])
                i += 1
        else:
            words.append(token)
        i += 1
    return options + (["--text", " ".join(words)] if words else [])


def main(argv: list[str] | None = None) -> list[dict]:
    from ner.predict import PredictInputError, note, prompt_setup, read_inputs
    from ner.recipe import RecipeError
    from ner.schema import SchemaError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # every user error is found here, before the model loads
        cfg = parse_config(PredictConfig, split_sentence_argument(argv))
        recipe, notes = prompt_setup(cfg.model, cfg.labels, cfg.prompt_format, cfg.k_shot, cfg.max_new_tokens,
                                     cfg.data_dir)
        inputs = read_inputs(cfg.text, cfg.input, sys.stdin)
    except (ConfigError, PredictInputError, RecipeError, SchemaError, FileNotFoundError) as err:
        print(f"predict.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    for line in notes:
        note(line)
    return run(cfg, recipe, inputs)


def run(cfg: PredictConfig, recipe: dict, inputs: list[dict]) -> list[dict]:
    import torch

    from grpo.engine_factory import build_engine
    from grpo.models import load_model_and_tokenizer
    from ner.predict import predict_sentences, write_bio, write_jsonl

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.dtype, device)
    model.eval()
    engine = build_engine("torch" if cfg.guided_json else cfg.engine, model, tokenizer,
                          max_batch_tokens=cfg.max_batch_tokens,
                          max_model_len=getattr(model.config, "max_position_embeddings", 2048))
    rows = predict_sentences(engine, tokenizer, recipe, inputs, cfg.batch_size, cfg.occurrences,
                             cfg.show_reasoning, progress=bool(cfg.output), guided_json=cfg.guided_json)
    write = write_bio if cfg.format == "bio" else write_jsonl
    if cfg.output:
        tmp = Path(cfg.output).with_name(Path(cfg.output).name + ".partial")
        with open(tmp, "w", encoding="utf-8") as f:
            write(rows, f)
        tmp.replace(cfg.output)
    else:
        write(rows, sys.stdout)
    if hasattr(engine, "close"):
        engine.close()
    return rows


if __name__ == "__main__":
    run_cli(main)  # later user errors (a full disk, say) also end in one line, exit 2; --debug shows tracebacks
