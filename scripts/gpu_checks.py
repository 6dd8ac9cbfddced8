"""The code half of scripts/gpu_check.sh: prepare its folder, build the model it checks, check the rollout engines.

    python scripts/gpu_checks.py prepare [--folder .gpu_check]            # on a CPU machine with the data and the model
    python scripts/gpu_checks.py materialize --out DIR [--reduced]        # random SmolLM2-shaped weights into DIR
    python scripts/gpu_checks.py engine --model DIR --device cuda [--json F]   # (a) TorchEngine vs teacher forcing
    python scripts/gpu_checks.py vllm --model DIR --device cuda [--json F]     # (b) VLLMEngine, weight sync

The device that runs the check cannot download anything and takes at most 64 MiB with it, so the SmolLM2 weights
(517 MB) never travel: `prepare` copies only the config and tokenizer files (~3.5 MB) and a small CoNLL-2003 subset
into the git-ignored ``.gpu_check/``, and `materialize` builds a randomly initialised model of that shape there.
Random weights give near-uniform next-token distributions, which is all a numerical check of log-probs needs.

Every check compares the log-probs an engine returned for its own samples with the trainer's teacher-forced
``grpo.batch.completion_logprobs`` of the same tokens (greedy rollouts: at T=1, the engine's convention), and fails
when the mean absolute gap exceeds the dtype's tolerance. Exit status: 0 all passed, 1 a check failed,
3 skipped (vLLM not importable).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo.batch import collate_rollouts, completion_logprobs  # noqa: E402
from grpo.models import load_tokenizer, parse_dtype  # noqa: E402

# Mean |engine − teacher forcing| over completion tokens. fp32: both sides are the same math up to summation order.
# bf16: the KV-cached decode and the full forward round differently (8-bit mantissa, logits of magnitude ~10).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "chat_template.jinja", "special_tokens_map.json")
SPLIT_SENTENCES = {"train": 400, "dev": 100, "test": 100}
SKIPPED = 3
# vLLM 0.32.0 for CUDA, as requirements-gpu.txt pins it, fetched for the device's Python 3.12 on x86-64.
PIP_DOWNLOAD_VLLM = ("python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp "
                     "--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform "
                     "manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "
                     "-d .gpu_check/wheels -r requirements-gpu.txt   # then, on the device: python3 -m pip install "
                     "--no-index --find-links .gpu_check/wheels vllm==0.32.0")
CHATS = ["Find every person entity in: West Indian all-rounder Phil Simmons took four for 38 on Friday.",
         "EU rejects German call to boycott British lamb .", "Hi",
         "List the locations: Peter Blackburn BRUSSELS 1996-08-22"]


# ------------------------------------------------------------------------------------------------ prepare
def first_sentences(path: Path, count: int) -> str:
    """The first ``count`` blank-line-separated sentences of a CoNLL column file (its -DOCSTART- lines kept)."""
    blocks, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
            if len(blocks) == count:
                break
    if current and len(blocks) < count:
        blocks.append("\n".join(current))
    return "\n\n".join(blocks) + "\n"


def prepare(folder: Path, data_dir: Path, model_dir: Path) -> None:
    """Fill ``folder`` with what the device needs and cannot fetch: model shape, tokenizer, a CoNLL subset."""
    missing = [str(p) for p in (data_dir / "conll2003" / "train.txt", model_dir / "config.json") if not p.is_file()]
    if missing:
        sys.exit(f"prepare: missing {', '.join(missing)} (set NER_DATA_DIR; the model is converted by "
                 f"grpo.models.embedded_model_dir on first use)")
    shape = folder / "smollm2"
    shape.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, shape / name)
    conll = folder / "data" / "conll2003"
    conll.mkdir(parents=True, exist_ok=True)
    for split, count in SPLIT_SENTENCES.items():
        (conll / f"{split}.txt").write_text(first_sentences(data_dir / "conll2003" / f"{split}.txt", count),
                                            encoding="utf-8")
    if (data_dir / "conll2003" / "queries.json").is_file():
        shutil.copy2(data_dir / "conll2003" / "queries.json", conll / "queries.json")
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"prepare: {folder} holds {size / 2**20:.1f} MiB (model shape + tokenizer, CoNLL-2003 subset "
          f"{SPLIT_SENTENCES})")
    print("prepare: vLLM for CUDA (~400 MB wheel plus its CUDA dependencies, over the device's 64 MiB transfer) is "
          f"not fetched. Where the transfer allows it, on a machine with PyPI run:\n  {PIP_DOWNLOAD_VLLM}")


# ------------------------------------------------------------------------------------------------ materialize
def materialize(shape: Path, out: Path, reduced: bool, seed: int = 0) -> None:
    """Save a randomly initialised model of ``shape``'s config (plus its tokenizer files) as a model folder.

    ``reduced`` (CPU mode) keeps the vocabulary, tokenizer, GQA ratio and tied head but shrinks depth and width, so
    the same commands finish on two CPU cores.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(shape)
    if reduced:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 96, 192
        config.num_attention_heads, config.num_key_value_heads = 3, 1   # SmolLM2-135M: 9 heads, 3 K/V heads
        config.head_dim = 32
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in MODEL_FILES:
        if (shape / name).is_file() and name != "config.json":
            shutil.copy2(shape / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"materialize: {out}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{params / 1e6:.1f} M parameters, random weights (seed {seed})")


# ------------------------------------------------------------------------------------------------ log-prob checks
def chat_prompts(tokenizer) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                           add_generation_prompt=True) for c in CHATS]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def logprob_gap(model, rollouts, temperature: float, pad_id: int) -> dict:
    """Mean and max |engine log-prob − teacher-forced log-prob| over all completion tokens of ``rollouts``."""
    batch = collate_rollouts([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                             [r.logprobs for r in rollouts], pad_id)
    with torch.no_grad():
        teacher, _ = completion_logprobs(model, batch, temperature if temperature > 0 else 1.0)
    device = next(model.parameters()).device
    if teacher.device != device:
        raise AssertionError(f"teacher-forced log-probs on {teacher.device}, the model on {device}")
    mask = batch.completion_mask.to(device)
    gap = (teacher.float() - batch.rollout_logprobs.to(device)).abs() * mask
    return {"mean_abs": float(gap.sum() / mask.sum()), "max_abs": float(gap.max()), "tokens": int(mask.sum())}


def verdict(name: str, gap: dict, dtype: torch.dtype, results: list[dict], **extra) -> bool:
    tol = TOLERANCE[dtype]
    required = extra.pop("require", {})
    ok = gap["mean_abs"] <= tol and all(required.values())
    extra.update({k: v for k, v in required.items() if not v})  # a failed requirement is named on the line
    results.append({"check": name, "dtype": str(dtype).removeprefix("torch."), "ok": ok, "tolerance": tol,
                    **gap, **extra})
    print(f"{'PASS' if ok else 'FAIL'} {name} [{str(dtype).removeprefix('torch.')}]: mean |Δ logp| "
          f"{gap['mean_abs']:.2e} (tol {tol:g}), max {gap['max_abs']:.2e}, {gap['tokens']} tokens "
          f"{' '.join(f'{k}={v}' for k, v in extra.items())}", flush=True)
    return ok


def load_on(model_dir: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    return model, load_tokenizer(model_dir)


def check_torch_engine(model_dir: str, device: str, dtypes: list[str], new: int, results: list[dict]) -> None:
    """(a) Greedy and sampled TorchEngine rollouts on ``device``, each dtype, log-probs vs teacher forcing."""
    from grpo.engine import TorchEngine

    for dtype in map(parse_dtype, dtypes):
        model, tok = load_on(model_dir, dtype, device)
        engine, prompts = TorchEngine(model, tok), chat_prompts(tok)
        for mode, temperature, n in (("greedy", 0.0, 1), ("sampled T=0.7", 0.7, 4)):
            start = time.perf_counter()
            rollouts = engine.generate(prompts, n=n, max_new_tokens=new, temperature=temperature, seed=1)
            seconds = time.perf_counter() - start
            weights_on = next(model.parameters()).device
            verdict(f"TorchEngine {mode} {Path(model_dir).name}", logprob_gap(model, rollouts, temperature,
                                                                              tok.pad_token_id),
                    dtype, results, rows=len(rollouts), generate_s=round(seconds, 2), weights_on=str(weights_on),
                    require={"on device": weights_on.type == torch.device(device).type,
                             "all rows": len(rollouts) == len(prompts) * n})
        del engine, model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def check_vllm_engine(model_dir: str, device: str, dtype_name: str, new: int, results: list[dict]) -> int:
    """(b) VLLMEngine: built, sampled, then weights perturbed and synced; log-probs vs teacher forcing before and
    after, and the synced samples must NOT match the old weights (proving update_weights reached vLLM)."""
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        print(f"SKIPPED: vllm not importable ({err}); on a machine with PyPI run:\n  {PIP_DOWNLOAD_VLLM}", flush=True)
        results.append({"check": "VLLMEngine", "ok": None, "skipped": f"vllm not importable: {err}"})
        return SKIPPED
    from grpo.vllm_engine import VLLMEngine

    dtype = parse_dtype(dtype_name)
    model, tok = load_on(model_dir, dtype, device)
    prompts = chat_prompts(tok)
    start = time.perf_counter()
    engine = VLLMEngine(model, tok, max_model_len=512, gpu_memory_utilization=0.25, kv_cache_gib=0.5,
                        enforce_eager=True, dtype=dtype_name)
    built_s = time.perf_counter() - start
    rollouts = engine.generate(prompts, n=4, max_new_tokens=new, temperature=1.0, seed=3)
    verdict("VLLMEngine sampled T=1", logprob_gap(model, rollouts, 1.0, tok.pad_token_id), dtype, results,
            build_s=round(built_s, 1))
    old = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=generator) * 0.02).to(p.device, p.dtype))
    start = time.perf_counter()
    engine.update_weights(model)
    sync_s = time.perf_counter() - start
    synced = engine.generate(prompts, n=4, max_new_tokens=new, temperature=1.0, seed=3)
    fresh = logprob_gap(model, synced, 1.0, tok.pad_token_id)
    model.load_state_dict(old)
    stale = logprob_gap(model, synced, 1.0, tok.pad_token_id)["mean_abs"]
    verdict("VLLMEngine after update_weights", fresh, dtype, results, sync_s=round(sync_s, 2),
            gap_vs_old_weights=f"{stale:.2e}", require={"old weights differ": stale > 5 * TOLERANCE[dtype]})
    engine.close()
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--folder", default=str(ROOT / ".gpu_check"))
    p.add_argument("--data_dir", default="", help="default $NER_DATA_DIR or ../shared/data")
    p.add_argument("--model_dir", default="", help="default the embedded SmolLM2-135M-Instruct conversion")
    p = sub.add_parser("materialize")
    p.add_argument("--shape", default=str(ROOT / ".gpu_check" / "smollm2"))
    p.add_argument("--out", required=True)
    p.add_argument("--reduced", action="store_true", help="2 layers, hidden 96 (CPU mode)")
    for name in ("engine", "vllm"):
        p = sub.add_parser(name)
        p.add_argument("--model", action="append", required=True, help="model folder (repeatable)")
        p.add_argument("--device", default="cuda")
        p.add_argument("--dtype", action="append", help="repeatable; default bfloat16 (engine: float32 too)")
        p.add_argument("--new", type=int, default=48, help="new tokens per rollout")
        p.add_argument("--json", default="", help="append the results to this JSON list file")
    args = ap.parse_args()

    if args.command == "prepare":
        from grpo.models import embedded_model_dir
        from ner.data import default_data_dir

        prepare(Path(args.folder), Path(args.data_dir) if args.data_dir else default_data_dir(),
                Path(args.model_dir) if args.model_dir else embedded_model_dir())
        return
    if args.command == "materialize":
        materialize(Path(args.shape), Path(args.out), args.reduced)
        return
    results: list[dict] = []
    status = 0
    for model_dir in args.model:
        if args.command == "engine":
            check_torch_engine(model_dir, args.device, args.dtype or ["float32", "bfloat16"], args.new, results)
        else:
            status = check_vllm_engine(model_dir, args.device, (args.dtype or ["bfloat16"])[0], args.new, results)
    if args.json:
        path = Path(args.json)
        previous = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(previous + results, indent=1))
    if any(r["ok"] is False for r in results):
        sys.exit(1)
    sys.exit(status)


if __name__ == "__main__":
    main()
