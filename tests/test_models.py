"""Model specs: the embedded GGUF is converted once and cached; run folders resolve to their newest checkpoint."""
from __future__ import annotations

import time

import pytest
import torch

from grpo import models


def test_embedded_default_converts_once_then_loads_from_cache(tmp_path, monkeypatch, smollm2):
    monkeypatch.setenv("GRPO_NER_CACHE", str(tmp_path))
    folder = models.embedded_model_dir()
    weights = folder / "model.safetensors"
    assert (folder / "config.json").is_file() and weights.is_file()
    stamp = weights.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert models.embedded_model_dir() == folder
    assert time.perf_counter() - t0 < 1.0 and weights.stat().st_mtime_ns == stamp  # no second conversion
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    model = models.load_model(str(folder))
    reference, tok = smollm2
    ids = tok("Paris is the capital of", return_tensors="pt").input_ids
    with torch.no_grad():  # same weights as the session's copy (converted the same way, possibly earlier)
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    assert getattr(model.config, "quantization_config", None) is None  # a plain fp32 folder, no gguf needed


def test_run_folder_resolves_to_newest_complete_checkpoint(tmp_path):
    for step, complete in [(1, True), (2, True), (3, False)]:
        ckpt = tmp_path / f"checkpoint-{step:07d}"
        ckpt.mkdir()
        (ckpt / "config.json").write_text("{}")
        if complete:
            (ckpt / "COMPLETE").write_text("")
    assert models.resolve_model_path(str(tmp_path)) == str(tmp_path / "checkpoint-0000002")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="neither config.json nor a complete checkpoint"):
        models.resolve_model_path(str(empty))


def test_dtype_names():
    assert models.parse_dtype("bf16") is torch.bfloat16 and models.parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        models.parse_dtype("fp8")


def test_tokenizer_pads_left_with_eos(smollm2_tokenizer):
    assert smollm2_tokenizer.padding_side == "left"
    assert smollm2_tokenizer.pad_token == smollm2_tokenizer.eos_token == "<|im_end|>"
