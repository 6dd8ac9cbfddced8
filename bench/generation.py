"""Rollout throughput: HF `generate` vs TorchEngine (vs vLLM when `import vllm` works) on SmolLM2-135M fp32, CPU.

Every engine produces exactly `new` tokens per sequence (no stop strings; EOS suppressed: `ignore_eos=True` for
TorchEngine, `min_new_tokens` for HF), sampling at T=1, top_p=1, on blog-style NER chat prompts (one entity type per
prompt, two few-shot examples) built from CoNLL-2003 dev sentences. Engines are interleaved within each repeat and
the median is reported; "x HF" is each engine's median tokens/s over HF's, "% peak" is 2 * params * tokens / time
over a square fp32 torch.matmul timed in the same process.

Command:
    OMP_WAIT_POLICY=PASSIVE python bench/generation.py --repeats 3

Measured 2026-11-23 (2-core shared Xeon with AVX-512, torch 2.13 CPU, 2 threads, OMP_WAIT_POLICY=PASSIVE). Other
agents were using the machine (load average 3.3 -> 5.7 over the run: process CPU time ~= wall time, i.e. about one
core effectively ours, and the matmul peak measured at the start was 83 GFLOP/s against ~165-300 on a quieter
machine, so "% peak" is relative to that depressed figure). Earlier runs (under other loads, before the decode
attention fold and the faster noise draw) gave 1.6-2.5x (32 rows) and 1.2-1.4x (8 rows).

| sequences x new tokens | engine | tokens/s (wall, median) | x HF (wall) | x HF (CPU time) | % fp32 matmul peak | wall times (s) |
|---|---|---|---|---|---|---|
| 32 x 128 (prompt 179-240 tok) | HF generate | 36.4 | 1.00 | 1.00 | 11.8 | 127.1 / 112.6 / 103.7 |
| 32 x 128 (prompt 179-240 tok) | TorchEngine | 85.9 | 2.36 | 2.20 | 28.0 | 46.4 / 47.7 / 48.5 |
| 8 x 128 (prompt 205-228 tok) | HF generate | 33.8 | 1.00 | 1.00 | 11.0 | 29.2 / 30.3 / 30.9 |
| 8 x 128 (prompt 205-228 tok) | TorchEngine | 47.8 | 1.42 | 1.40 | 15.6 | 21.3 / 22.0 / 21.4 |

vLLM column: skipped (`import vllm` fails in the main interpreter; vLLM lives in its own venv).

Why 8 rows gains less: a decode step must stream all 540 MB of fp32 weights from DRAM whatever the batch size (the
tied 113 MB lm_head alone takes ~25 ms at the ~4.5 GB/s this process gets), so at 8 rows both engines sit near that
floor (~120 ms/step) and TorchEngine only removes HF's extra K/V traffic (repeat_kv for GQA under a padding mask,
torch.cat of the cache) and its sampling overhead. At 32 rows that extra traffic grows with batch x context and HF
pays it every layer and step, so the gap widens. The ~3.5 s (8 rows) / ~13 s (32 rows) prefill is common to both.
Preallocated KV cache vs transformers' DynamicCache inside TorchEngine (32 rows, context 240-300, interleaved
steps, median): 218 vs 287 ms per decode step.
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


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(). CPU time is less sensitive to other tenants taking the cores."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_hf(model, tokenizer, prompts: list[list[int]], new: int) -> tuple[float, float]:
    batch = tokenizer.pad({"input_ids": [torch.tensor(p) for p in prompts]}, padding=True, return_tensors="pt")

    def generate():
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] - batch["input_ids"].shape[1] == new

    return timed(generate)


def run_engine(engine, prompts: list[list[int]], new: int, seed: int, **kwargs) -> tuple[float, float]:
    def generate():
        rollouts = engine.generate(prompts, n=1, max_new_tokens=new, temperature=1.0, top_p=1.0, seed=seed, **kwargs)
        assert all(len(r.completion_ids) == new for r in rollouts)

    return timed(generate)


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
    engines = {"HF generate": None, "TorchEngine": TorchEngine(model, tokenizer),
               "TorchEngine, no packing / prefix sharing": TorchEngine(model, tokenizer, pack_weights=False,
                                                                       share_prefixes=False)}
    try:
        import vllm  # noqa: F401

        from grpo.vllm_engine import VLLMEngine

        engines["vLLM"] = VLLMEngine(model, tokenizer)
    except ImportError as err:
        print(f"note: vLLM column skipped ({err})")
    peak = matmul_peak_flops()
    print(f"fp32 matmul peak (2048^3, {args.threads} threads): {peak / 1e9:.0f} GFLOP/s; params {params / 1e6:.1f}M; "
          f"load average {os.getloadavg()}")

    rows = []
    for batch in args.batches:
        prompts = ner_prompts(tokenizer, batch)
        lens = [len(p) for p in prompts]
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
        run_engine(engines["TorchEngine"], prompts[:2], 4, seed=0, ignore_eos=True)  # warm-up
        for rep in range(args.repeats):
            for name, engine in engines.items():
                if engine is None:
                    elapsed = run_hf(model, tokenizer, prompts, args.new)
                elif name.startswith("TorchEngine"):
                    elapsed = run_engine(engine, prompts, args.new, seed=rep, ignore_eos=True)
                else:
                    elapsed = run_engine(engine, prompts, args.new, seed=rep)
                times[name].append(elapsed)
                print(f"  batch {batch} rep {rep} {name}: wall {elapsed[0]:.2f}s cpu {elapsed[1]:.2f}s", flush=True)
        tokens = batch * args.new
        hf_wall = statistics.median(w for w, _ in times["HF generate"])
        hf_cpu = statistics.median(c for _, c in times["HF generate"])
        for name, ts in times.items():
            wall, cpu = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
            rate = tokens / wall
            rows.append((f"{batch} x {args.new} (prompt {min(lens)}-{max(lens)} tok)", name,
                         f"{rate:.1f}", f"{hf_wall / wall:.2f}", f"{hf_cpu / cpu:.2f}",
                         f"{100 * 2 * params * rate / peak:.1f}", " / ".join(f"{w:.1f}" for w, _ in ts)))

    print(f"\nload average at the end: {os.getloadavg()}")
    print("\n| sequences x new tokens | engine | tokens/s (wall, median) | x HF (wall) | x HF (CPU time) "
          "| % fp32 matmul peak | wall times (s) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
