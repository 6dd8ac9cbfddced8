"""Rollout throughput: HF `generate` vs TorchEngine vs vLLM (eager and compiled) on SmolLM2-135M fp32, CPU.

Every engine produces exactly `new` tokens per sequence (no stop strings; EOS suppressed: `ignore_eos=True` for
TorchEngine and vLLM, `min_new_tokens` for HF), sampling at T=1, top_p=1, on blog-style NER chat prompts (one entity
type per prompt, two few-shot examples) built from CoNLL-2003 dev sentences. Engines are interleaved within each
repeat and the median is reported; "x HF" is each engine's median tokens/s over HF's, "x TorchEngine" over
TorchEngine's (same run), "% peak" is 2 * params * tokens / time over a square fp32 torch.matmul timed in the same
process.

vLLM rows: vLLM lives in its own venv (scripts/setup_vllm_cpu.sh: ~/.cache/grpo-ner/venv-vllm or $GRPO_VLLM_VENV),
so each mode runs as a long-lived server in that venv's interpreter (bench/_vllm_side.py), started before the timed
loop and fed the same token-id prompts, new-token count and sampling settings over a pipe. It builds `vllm.LLM` on
the same model folder with grpo/vllm_engine.py's arguments (float32, prefix caching, processed log-probs, 1 GiB KV
cache, engine core in-process so its CPU time counts) and the bench's thread count, with `enforce_eager=True`
("vLLM eager", start-up ~15 s) or vLLM's default torch.compile ("vLLM compiled", start-up 1-1.5 min on 2 cores,
nearly all compiling; vLLM 0.32's AOT cache fails to load, so it compiles again every time). Start-up is printed
and excluded from the rates; wall and CPU time are measured in the server around `llm.generate`, after resetting
its prefix cache (as after every weight sync in training). `--vllm_python ""` or a bare `--vllm_modes` drops the
vLLM rows; they are also SKIPPED when the venv is missing and vllm does not import here.

Command:
    OMP_WAIT_POLICY=PASSIVE python bench/generation.py --repeats 3 [--vllm_modes eager compiled] [--profile 32]
On a GPU (scripts/gpu_check.sh): --device cuda --dtype bfloat16 [--model FOLDER]; "% peak" is then against a square
matmul in that dtype on that device.

Measured 2026-12-05 01:11-01:25 UTC (2-core AMD EPYC with AVX-512, torch 2.13 CPU, 2 threads,
OMP_WAIT_POLICY=PASSIVE, fp32 matmul peak 194 GFLOP/s, load average 1.1-1.9 with nothing else running; vllm-cpu
0.32.0, start-up 12.8 s eager and 55.8 s compiled, excluded). "no packing / prefix sharing" is
TorchEngine(pack_weights=False, share_prefixes=False) (transformers' forward, no lean decoder), in the same run.

| sequences x new tokens | engine | tokens/s (wall, median) | x HF (wall) | x HF (CPU time) | x TorchEngine (wall) | % fp32 matmul peak | wall times (s) |
|---|---|---|---|---|---|---|---|
| 32 x 128 (prompt 179-240 tok) | HF generate | 74.8 | 1.00 | 1.00 | 0.33 | 10.4 | 64.9 / 54.7 / 52.0 |
| 32 x 128 (prompt 179-240 tok) | TorchEngine | 229.3 | 3.06 | 3.05 | 1.00 | 31.8 | 17.9 / 17.9 / 17.7 |
| 32 x 128 (prompt 179-240 tok) | TorchEngine, no packing / prefix sharing | 127.4 | 1.70 | 1.66 | 0.56 | 17.7 | 36.0 / 32.2 / 32.0 |
| 32 x 128 (prompt 179-240 tok) | vLLM eager | 236.0 | 3.15 | 3.16 | 1.03 | 32.7 | 18.8 / 17.4 / 16.8 |
| 32 x 128 (prompt 179-240 tok) | vLLM compiled | 262.0 | 3.50 | 3.41 | 1.14 | 36.3 | 16.1 / 15.6 / 15.0 |
| 8 x 128 (prompt 205-228 tok) | HF generate | 49.2 | 1.00 | 1.00 | 0.39 | 6.8 | 20.8 / 21.1 / 20.1 |
| 8 x 128 (prompt 205-228 tok) | TorchEngine | 126.3 | 2.57 | 2.51 | 1.00 | 17.5 | 8.6 / 8.1 / 8.1 |
| 8 x 128 (prompt 205-228 tok) | TorchEngine, no packing / prefix sharing | 59.7 | 1.21 | 1.17 | 0.47 | 8.3 | 17.9 / 15.3 / 17.2 |
| 8 x 128 (prompt 205-228 tok) | vLLM eager | 124.0 | 2.52 | 2.53 | 0.98 | 17.2 | 8.5 / 8.1 / 8.3 |
| 8 x 128 (prompt 205-228 tok) | vLLM compiled | 134.6 | 2.74 | 2.73 | 1.07 | 18.7 | 7.6 / 7.5 / 7.7 |

TorchEngine is level with vLLM eager (3% behind at 32 rows, 2% ahead at 8) and behind vLLM compiled by 14% and 7%.
The step from the previous run (below) is grpo/fast_decode.py: SmolLM2 runs through the engine's own forward with
fused QKV and gate-up matmuls (121 per forward, as vLLM's `_C::onednn_mm` calls), rotary embeddings and the additive
mask once per forward, and a one-token step's elementwise ops on one thread (a wake-up of the second OpenMP thread
costs ~40 us per op under OMP_WAIT_POLICY=PASSIVE). What vLLM compiled still has: (1) inductor fuses its norms, SiLU
and residual adds into C++ loops; (2) its attention (`_C::cpu_attention_with_kv_cache` over paged K/V, prefix
caching) reads the 164-168 tokens that the prompts of an entity type share from one set of cached pages, where each
TorchEngine row at n = 1 holds its own copy. Sharing that prefix through cascade attention (one extra flash call per
layer) was tried: 1.7% faster at 32 rows, 6% slower at 8, no gain on 96 JSON evaluation sentences; dropped.
Previous run (2026-12-04 22:06-22:19, same machine and command, transformers' forward with packed linears):
TorchEngine 196.4 tok/s (27.6% of peak) and 101.3; vLLM eager 229.4 and 118.9, compiled 256.8 and 130.4.
Earlier (2026-12-03, load 1.2-1.8, before prefill length runs and cascade attention): TorchEngine 98.2 tok/s =
2.68x HF at 32 x 128, 61.3 = 2.07x at 8 x 128; 2026-11-23: 2.36x and 1.42x.

Where TorchEngine's time goes at 32 x 128 (torch.profiler, 2026-12-05, same machine, idle): 17.2-18.2 s per call =
prefill 3.1 s (the 4 type prefixes, 672 tokens, in 0.83 s at ~90% of the matmul peak; then the 32 suffixes in four
length runs, 1444 tokens fed for 1302 real, 1.9 s) + 127 decode steps of ~114 ms: linears 55 ms (121 oneDNN calls,
~80% of the matmul peak), flash attention over the cache 34 ms (30 calls; the kernel's per-(row, head) overhead plus
reading ~15 MB of K/V per layer from DRAM), sampling ~8 ms (4.6 of it drawing each row's 49k-entry noise from its own
generator), the rest elementwise ops and Python.

Where the time goes at 8 rows (torch.profiler over 20 decode steps, 2026-12-03): before, a decode step took
~145-165 ms, ~110 ms of it in aten::mm. The 540 MB of weights were streamed at only ~4-5 GB/s, far below the
~30 GB/s a plain `sum()` reads, because the default CPU GEMM repacks each weight panel on every call (costly at
M = 8). With oneDNN weights packed once per call (grpo/packed_linear.py, bench/packed_linear.py) the linears take
~60 ms and a step ~100 ms: linears 60, SDPA over the K/V cache 17, sampling 5, the rest elementwise ops and Python.
Prefill (~3.5-4 s for 8 prompts of ~215 tokens, compute-bound) is cut by prefix sharing: the bench's prompts cycle
through 4 entity types, and the prompts of a type share 164-168 tokens (system prompt, instructions, few-shot
examples), so 665 of 1727 prompt tokens are not re-run at 8 rows, and 4655 of 6622 at 32.

Re-measured 2026-12-05 04:02-04:15 UTC on a 2-core Intel Xeon with AVX-512 and AMX (same command; fp32 matmul peak
317 GFLOP/s; load average 1.3-1.9; vLLM start-up 17.8 s eager, 60.0 s compiled), after the two-stage sampler
(grpo/sampling.py): 32 x 128: HF 76.8, TorchEngine 198.6 (2.58x HF, 16.9% of peak), vLLM eager 188.6 (0.95x
TorchEngine), compiled 199.7 (1.01x); 8 x 128: HF 46.8, TorchEngine 89.4 (7.6%), eager 84.6 (0.95x), compiled 92.9
(1.04x). A decode step here is bound by streaming the 538 MB of fp32 weights at ~12 GB/s (timed around the calls at
32 rows: 124 ms per step = linears ~60, flash attention 38, the rest elementwise ops and Python; sampling 5.7 ms
besides); hence the low share of the matmul peak. Sharing the type prefix's K/V at n = 1 through cascade attention
was tried again: flash attention time fell 2.41 -> 1.98 s in a 32 x 64 call, but the merging ops (and the lost
length order of the prefill runs) gave it back: 11.4 vs 11.0 s; dropped again.

Re-measured 2026-12-05 on the same machine type, --repeats 2: 08:01-08:10 UTC as above (peak 317 GFLOP/s), 32 x 128:
HF 60.7, TorchEngine 200.7, vLLM eager 183.6 (0.91x), compiled 221.9 (1.11x); 8 x 128: 49.7, 97.0, 93.0 (0.96x),
103.4 (1.07x). 07:28-07:40 under GOMP_SPINCOUNT=30000 (OpenMP workers spin before sleeping; the vLLM servers
inherit it): 32 x 128: 79.2, 247.3, 249.0 (1.01x), 264.6 (1.07x); 8 x 128: 67.2, 124.8, 122.1 (0.98x), 148.9
(1.19x). With the other core busy (`python -c 'while True: pass'`, --batches 8 --repeats 1 --vllm_modes) spinning
halves the rate instead: TorchEngine 66.3 tok/s passive, 32.5 spinning. torch.compile (inductor) of the lean
forward's per-layer glue (two compiled regions a layer, the packed matmuls as an opaque custom op, flash attention
and the cache write eager between them) was tried at 8 x 128: 12.6 s against 10.2 s eager (same tokens), 11.0 s with
inductor's kernels on one thread; its per-call overhead exceeds the elementwise time it fuses. Dropped.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's OpenMP start-up

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo.engine import TorchEngine  # noqa: E402
from grpo.models import load_model_and_tokenizer, parse_dtype, resolve_model_path  # noqa: E402
from ner.data import default_data_dir  # noqa: E402
from bench.machine import cpu_flags  # noqa: E402
from bench._vllm_side import VLLMSide  # noqa: E402

# scripts/setup_vllm_cpu.sh builds this venv (vllm-cpu + the requirements); $GRPO_VLLM_VENV moves it there too.
VLLM_VENV_PYTHON = Path(os.environ.get("GRPO_VLLM_VENV", Path.home() / ".cache/grpo-ner/venv-vllm")) / "bin/python"

DATA = default_data_dir() / "conll2003" / "dev.txt"  # $NER_DATA_DIR, else ../shared/data beside the repo
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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_flops(size: int = 2048, repeats: int = 5, device: torch.device = torch.device("cpu"),
                      dtype: torch.dtype = torch.float32) -> float:
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def timed(fn, device: torch.device = torch.device("cpu")) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn(). CPU time is less sensitive to other tenants taking the cores."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_hf(model, tokenizer, prompts: list[list[int]], new: int) -> tuple[float, float]:
    batch = tokenizer.pad({"input_ids": [torch.tensor(p) for p in prompts]}, padding=True, return_tensors="pt")
    batch = {k: v.to(model.device) for k, v in batch.items()}

    def generate():
        with torch.inference_mode():
            out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                                 min_new_tokens=new, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] - batch["input_ids"].shape[1] == new

    return timed(generate, model.device)


def run_engine(engine, prompts: list[list[int]], new: int, seed: int, **kwargs) -> tuple[float, float]:
    def generate():
        rollouts = engine.generate(prompts, n=1, max_new_tokens=new, temperature=1.0, top_p=1.0, seed=seed, **kwargs)
        assert all(len(r.completion_ids) == new for r in rollouts)

    return timed(generate)


def default_vllm_python() -> str:
    """vLLM's own venv when it exists, else this interpreter when it has vllm, else "" (no vLLM rows)."""
    if VLLM_VENV_PYTHON.is_file():
        return str(VLLM_VENV_PYTHON)
    return sys.executable if importlib.util.find_spec("vllm") is not None else ""


def start_vllm(args, model_path: str) -> dict[str, VLLMSide]:
    """One server per mode, started one after the other (start-up times are not mixed), before any timing."""
    if not args.vllm_python or not args.vllm_modes:
        why = "--vllm_modes is empty" if args.vllm_python else \
            f"--vllm_python is empty; its default is {VLLM_VENV_PYTHON} when that exists, else this interpreter " \
            f"when it imports vllm"
        print(f"SKIPPED: vLLM rows ({why})")
        return {}
    sides: dict[str, VLLMSide] = {}
    try:
        for mode in args.vllm_modes:
            side = VLLMSide(args.vllm_python, model_path, mode, args.threads, args.device, args.dtype,
                            timeout=args.vllm_startup_timeout)
            sides[f"vLLM {mode}"] = side
            i = side.info
            print(f"vLLM {mode} (vllm {i['vllm']}, {args.vllm_python}): start-up {side.startup_s:.1f} s, excluded "
                  f"from the rates (import {i['import_s']:.1f} s, engine build{' + compile' * (mode != 'eager')} "
                  f"{i['build_s']:.1f} s, warm-up call {i['warmup_s']:.1f} s); torch threads {i['torch_threads']} "
                  f"(OMP_NUM_THREADS={i['omp_num_threads']}, CPU affinity {i['affinity']}), OS threads "
                  f"{i['os_threads']}, child processes {i['child_processes']}; log {side.log.name}", flush=True)
    except BaseException:
        for side in sides.values():
            side.close()
        raise
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--compute_dtypes", nargs="*", default=[],
                        help="extra TorchEngine rows decoding the same model in these dtypes (e.g. bfloat16: "
                             "TorchEngine(compute_dtype=...), as GRPO's rollout_dtype)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model folder or the embedded default")
    parser.add_argument("--vllm_python", default=default_vllm_python(),
                        help=f"interpreter with vllm for bench/_vllm_side.py (default {VLLM_VENV_PYTHON} if it "
                             f"exists, else this one if it imports vllm); empty: no vLLM rows")
    parser.add_argument("--vllm_modes", nargs="*", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="one vLLM server and row per mode: enforce_eager=True, or vLLM's torch.compile")
    parser.add_argument("--vllm_startup_timeout", type=float, default=1800.0, help="seconds per vLLM start-up")
    parser.add_argument("--profile", type=int, default=0, metavar="NEW",
                        help="after the timing, one call of NEW tokens per engine (TorchEngine and vLLM) at the "
                             "first batch size under torch.profiler; prints each op table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), parse_dtype(args.dtype)

    model, tokenizer = load_model_and_tokenizer(args.model, dtype, device)
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    engines = {"HF generate": None, "TorchEngine": TorchEngine(model, tokenizer),
               "TorchEngine, no packing / prefix sharing": TorchEngine(model, tokenizer, pack_weights=False,
                                                                       share_prefixes=False)}
    for name in args.compute_dtypes:  # what GRPOConfig.rollout_dtype gives: the same module, converted weights
        engines[f"TorchEngine, {name} compute"] = TorchEngine(model, tokenizer, compute_dtype=parse_dtype(name))
    vllm_sides = start_vllm(args, resolve_model_path(args.model))
    try:
        engines.update(vllm_sides)
        rows, peak_dtype = run_bench(args, model, tokenizer, params, engines)
        if args.profile:
            profile_engines(args, tokenizer, engines)
    finally:
        for side in vllm_sides.values():
            side.close()

    print(f"\nload average at the end: {os.getloadavg()}")
    print(f"\n| sequences x new tokens | engine | tokens/s (wall, median) | x HF (wall) | x HF (CPU time) "
          f"| x TorchEngine (wall) | % {str(peak_dtype).removeprefix('torch.')} matmul peak | wall times (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def profile_engines(args, tokenizer, engines: dict) -> None:
    """One call of --profile tokens per engine under torch.profiler (vLLM's inside its server): where time goes."""
    from torch.profiler import ProfilerActivity, profile

    prompts = ner_prompts(tokenizer, args.batches[0])
    for name, engine in engines.items():
        if isinstance(engine, VLLMSide):
            wall, _ = engine.generate(prompts, args.profile, seed=0, profile=True)
            table = engine.profile_table
        elif name == "TorchEngine":
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                wall, _ = run_engine(engine, prompts, args.profile, seed=0, ignore_eos=True)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
        else:
            continue
        print(f"\nprofile: {name}, {args.batches[0]} x {args.profile} tokens, {wall:.1f} s under the profiler\n{table}")


def run_bench(args, model, tokenizer, params: int, engines: dict) -> tuple[list[tuple[str, ...]], torch.dtype]:
    device = torch.device(args.device)
    # CPU bf16 matmuls without AMX take minutes at 2048^3 and say nothing about the CPU's peak: fp32 there.
    peak_dtype = parse_dtype(args.dtype) if device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(device=device, dtype=peak_dtype)
    print(f"machine: {cpu_flags()}; prompts from {DATA if DATA.is_file() else 'built-in sentences (no CoNLL dev file)'}")
    print(f"{str(peak_dtype).removeprefix('torch.')} matmul peak (2048^3, {args.device}, {args.threads} threads): {peak / 1e9:.0f} GFLOP/s; "
          f"params {params / 1e6:.1f}M; load average {os.getloadavg()}")

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
                elif isinstance(engine, VLLMSide):  # timed inside the server, around its llm.generate call
                    elapsed = engine.generate(prompts, args.new, seed=rep)
                else:
                    elapsed = run_engine(engine, prompts, args.new, seed=rep, ignore_eos=True)
                times[name].append(elapsed)
                print(f"  batch {batch} rep {rep} {name}: wall {elapsed[0]:.2f}s cpu {elapsed[1]:.2f}s", flush=True)
        tokens = batch * args.new
        hf_wall = statistics.median(w for w, _ in times["HF generate"])
        hf_cpu = statistics.median(c for _, c in times["HF generate"])
        torch_wall = statistics.median(w for w, _ in times["TorchEngine"])
        for name, ts in times.items():
            wall, cpu = statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts)
            rate = tokens / wall
            rows.append((f"{batch} x {args.new} (prompt {min(lens)}-{max(lens)} tok)", name,
                         f"{rate:.1f}", f"{hf_wall / wall:.2f}", f"{hf_cpu / cpu:.2f}", f"{torch_wall / wall:.2f}",
                         f"{100 * 2 * params * rate / peak:.1f}", " / ".join(f"{w:.1f}" for w, _ in ts)))
    return rows, peak_dtype


if __name__ == "__main__":
    main()
