"""Rollout throughput: HF `generate` vs TorchEngine (vs vLLM when `import vllm` works) on SmolLM2-135M fp32, CPU.

Every engine produces exactly `new` tokens per sequence (no stop strings; EOS suppressed: `ignore_eos=True` for
TorchEngine, `min_new_tokens` for HF), sampling at T=1, top_p=1, on blog-style NER chat prompts (one entity type per
prompt, two few-shot examples) built from CoNLL-2003 dev sentences. Engines are interleaved within each repeat and
the median is reported; "x HF" is each engine's median tokens/s over HF's, "% peak" is 2 * params * tokens / time
over a square fp32 torch.matmul timed in the same process.

Command:
    OMP_WAIT_POLICY=PASSIVE python bench/generation.py --repeats 3

Measured (2-core shared Xeon, AVX-512, torch 2.13 CPU, 2 threads; other agents were using the CPU, so absolute
numbers move by ~±30 % between runs; the ratio is the quantity to read):

(filled in below after a run)
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's OpenMP start-up

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo.engine import TorchEngine  # noqa: E402
from grpo.models import load_model_and_tokenizer  # noqa: E402

DATA = Path("/work/shared/data/conll2003/dev.txt")
FALLBACK_SENTENCES = [
    "West Indian all-rounder Phil Simmons took four for 38 on Friday as Leicestershire beat Somerset .",
    "EU rejects German call to boycott British lamb .",
    "Peter Blackburn BRUSSELS 1996-08-22",
    "The European Commission said on Thursday it disagreed with German advice to consumers .",
]
TYPES = {"person": "names of people", "organization": "companies, institutions and teams",
         "location": "countries, cities and places", "misc": "nationalities, events and other names"}


def conll_sentences(limit: int) -> list[str]:
    if not DATA.is_file():
        return (FALLBACK_SENTENCES * limit)[:limit]
    sentences, words = [], []
    for line in DATA.read_text(encoding="utf-8").splitlines() + [""]:
        if line.strip():
            words.append(line.split("\t")[0])
        elif words:
            if len(words) >= 8:
                sentences.append(" ".join(words))
            words = []
        if len(sentences) == limit:
            break
    return sentences


def ner_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` chat prompts: one entity type each, two few-shot examples, then a CoNLL sentence."""
    sentences = conll_sentences(count + 2)
    shots, targets = sentences[:2], sentences[2:]
    prompts = []
    for i in range(count):
        kind = list(TYPES)[i % len(TYPES)]
        content = (f"Find every {kind} entity ({TYPES[kind]}) in the sentence. Think inside <think></think>, then "
                   f"answer as <entity>A, B</entity>.\n\nExample: {shots[0]}\n<think>...</think> <entity></entity>\n"
                   f"Example: {shots[1]}\n<think>...</think> <entity></entity>\n\nSentence: {targets[i]}")
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def matmul_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def run_hf(model, tokenizer, prompts: list[list[int]], new: int) -> float:
    ids = [torch.tensor(p) for p in prompts]
    batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - batch["input_ids"].shape[1] == new
    return elapsed


def run_engine(engine, prompts: list[list[int]], new: int, seed: int, **kwargs) -> float:
    start = time.perf_counter()
    rollouts = engine.generate(prompts, n=1, max_new_tokens=new, temperature=1.0, top_p=1.0, seed=seed, **kwargs)
    elapsed = time.perf_counter() - start
    assert all(len(r.completion_ids) == new for r in rollouts)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 8])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    engines = {"HF generate": None, "TorchEngine": TorchEngine(model, tokenizer)}
    try:
        import vllm  # noqa: F401

        from grpo.vllm_engine import VLLMEngine

        engines["vLLM"] = VLLMEngine(model, tokenizer)
    except ImportError as err:
        print(f"note: vLLM column skipped ({err})")
    peak = matmul_peak_flops()
    print(f"fp32 matmul peak (2048^3, {args.threads} threads): {peak / 1e9:.0f} GFLOP/s; params {params / 1e6:.1f}M")

    rows = []
    for batch in args.batches:
        prompts = ner_prompts(tokenizer, batch)
        lens = [len(p) for p in prompts]
        times: dict[str, list[float]] = {name: [] for name in engines}
        run_engine(engines["TorchEngine"], prompts[:2], 4, seed=0, ignore_eos=True)  # warm-up
        for rep in range(args.repeats):
            for name, engine in engines.items():
                if engine is None:
                    elapsed = run_hf(model, tokenizer, prompts, args.new)
                elif name == "TorchEngine":
                    elapsed = run_engine(engine, prompts, args.new, seed=rep, ignore_eos=True)
                else:
                    elapsed = run_engine(engine, prompts, args.new, seed=rep)
                times[name].append(elapsed)
                print(f"  batch {batch} rep {rep} {name}: {elapsed:.2f}s", flush=True)
        tokens = batch * args.new
        hf_rate = tokens / statistics.median(times["HF generate"])
        for name, ts in times.items():
            rate = tokens / statistics.median(ts)
            rows.append((f"{batch} x {args.new} (prompt {min(lens)}-{max(lens)} tok)", name,
                         f"{rate:.1f}", f"{rate / hf_rate:.2f}", f"{100 * 2 * params * rate / peak:.1f}",
                         " / ".join(f"{t:.1f}" for t in ts)))

    print("\n| sequences x new tokens | engine | tokens/s (median) | x HF | % fp32 matmul peak | times (s) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
