"""Evaluation throughput before and after continuous batching, through ner.evaluation.generate_answers.

Greedy answers to the first N CoNLL-2003 test sentences, zero-shot all-types JSON (the main job's evaluation) or
tagged (one prompt per sentence and type, `--k_shot` examples, stop at `</entity>`), with the stop strings and type
descriptions of the model's prompt recipe when it has one. Two modes:
  before  TorchEngine(continuous=False, prefill_run_overhead=10**9): fixed chunks, each prompt padded to the longest
          of its chunk, `--before_batch` prompts per engine call (evaluation's default was 32, the main job used 64);
  after   TorchEngine(): continuous batching (a waiting prompt takes a finished row's place) and prefill in length
          runs, `--batch` prompts per engine call (evaluation's default now, 256), more than fit at once.
The modes alternate within each repeat (before first in even repeats) and the median is reported; both must give the
same answers (the count of differing answers is printed; fp32 round-off can flip a greedy tie between batch shapes).

Command:
    OMP_WAIT_POLICY=PASSIVE python bench/eval_throughput.py --model runs/sft_smollm2_conll --format json \
        --limit 1000 --max_new 384 --before_batch 64 --batch 256 --repeats 1

Measured 2026-12-04 22:19-22:33 UTC, 2-core AMD EPYC with AVX-512, torch 2.13 CPU, 2 threads, idle (load 0.7-1.5);
the main job's CoT-SFT checkpoint runs/sft_smollm2_conll (step 150), JSON, 1,000 sentences, prompts 159-324 tokens,
max_new 384 (the main job's), max_batch_tokens 32768 (TorchEngine's default; evaluate.py's is 65536). Answers: 63,968
tokens, lengths 4 / 55 / 384 (min / median / max), 5 cut at 384; the two modes gave the same 1,000 answers.

| mode | prompts per call | wall s | answer tok/s | sentences/s | prefills / joins | decode steps | peak rows |
|---|---|---|---|---|---|---|---|
| before | 64 | 404.1 | 158.3 | 2.47 | 31 / 0 | 3342 | 59 |
| after | 256 | 341.2 | 187.5 | 2.93 | 62 / 58 | 1654 | 59 |

1.18x: half the decode steps, as finished rows no longer idle until the longest answer of their call ends (a chunk of
64 with one 384-token answer runs 384 steps). The KV budget caps the batch at 59 rows in both modes.
Tagged (`--format tagged --limit 1000 --max_new 48 --before_batch 64 --batch 256 --repeats 1`, base SmolLM2
2-shot, 4,000 prompts of 165-496 tokens, stop `</entity>`; 2026-12-04 22:55-23:56 UTC): before 1862.0 s (64 prefills,
3008 decode steps, 64 rows at most); the after run was stopped unfinished at 30 min (its first 8 shared the cores with
the test suite): no gain shown. Each before chunk ran ~47 of its 48 possible steps (3008 over 64 calls), so almost
every chunk held an answer that reached the cap; why the after run was no faster is not established.
Tagged again on 100 sentences (`--format tagged --limit 100 --max_new 48 --before_batch 64 --batch 256 --repeats
1`, 2026-12-05 01:33-01:40 UTC, idle, both modes with the engine's own Llama forward, grpo/fast_decode.py): 400
prompts of 186-496 tokens, 16,131 answer tokens, 230 answers cut at 48, the same 400 answers in both modes:

| mode | prompts per call | wall s | answer tok/s | sentences/s | prefills / joins | decode steps | peak rows |
|---|---|---|---|---|---|---|---|
| before | 64 | 213.5 | 75.6 | 0.47 | 8 / 0 | 376 | 64 |
| after | 256 | 171.3 | 94.1 | 0.58 | 9 / 7 | 269 | 107 |

1.25x: 269 decode steps instead of 376, with up to 107 rows at once (the budget fits more rows of the shorter
prompts once the longest have finished).
Tagged on 1,000 sentences again (the command above with --limit 1000; 2026-12-05 05:43-06:33 UTC, 2-core Intel Xeon
with AVX-512 and AMX, idle, load 1.1-1.3 at the start): 4,000 prompts of 165-496 tokens, 159,920 answer tokens,
2,334 answers cut at 48, the same 4,000 answers in both modes:

| mode | prompts per call | wall s | answer tok/s | sentences/s | prefills / joins | decode steps | peak rows |
|---|---|---|---|---|---|---|---|
| before | 64 | 1524.3 | 104.9 | 0.66 | 64 / 0 | 3008 | 64 |
| after | 256 | 1333.0 | 120.0 | 0.75 | 72 / 46 | 2302 | 126 |

1.14x: 2302 decode steps instead of 3008, up to 126 rows at once. More than half the answers run to the 48-token
cap, so most chunks of the fixed mode are full until their end and there is less idle room to reclaim than in JSON.

Earlier (2026-12-04 11:20, 64 sentences, 64 prompts per call in both modes, shared CPU): at the default budget a
call fitted one batch and nothing waited; at max_batch_tokens 8192 continuous batching saved 7% of the decode steps
and ran at 0.96x: each join re-ran the shared prompt prefix and widened the left-padded cache.
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
from ner.evaluation import STOP, build_eval_records, generate_answers, prompt_token_ids  # noqa: E402
from ner.recipe import evaluation_settings  # noqa: E402
from bench.machine import cpu_flags  # noqa: E402


def recording_stats(engine: TorchEngine, calls: list[dict]):
    """engine.generate, appending the engine's stats to `calls` after each call (they cover one call only)."""
    generate = type(engine).generate.__get__(engine)

    def wrapper(*args, **kwargs):
        rollouts = generate(*args, **kwargs)
        calls.append(dict(engine.stats))
        return rollouts
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--format", default="json", choices=["json", "tagged"])
    ap.add_argument("--k_shot", type=int, default=-1, help="-1: the model recipe's (else 2 for tagged, 0 for json)")
    ap.add_argument("--limit", type=int, default=64, help="first N test sentences")
    ap.add_argument("--max_new", type=int, default=128)
    ap.add_argument("--before_batch", type=int, default=32,
                    help="prompts per engine call before (evaluate.py's batch_size until this change)")
    ap.add_argument("--batch", type=int, default=256, help="prompts per engine call after")
    ap.add_argument("--max_batch_tokens", type=int, default=32768, help="TorchEngine's KV budget (its default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_flags())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")

    k_shot = args.k_shot if args.k_shot >= 0 or args.format == "tagged" else 0
    fmt, k_shot, stop, descriptions, note = evaluation_settings(args.model, args.format, k_shot)
    stop = stop if stop is not None else STOP[fmt]
    print(f"model {args.model}: {note}; stop {stop}")
    _, records = build_eval_records("conll2003", "test", args.limit, fmt, k_shot, prompt_seed=0,
                                    descriptions=descriptions)
    model, tok = load_model_and_tokenizer(args.model)
    model.eval()
    lengths = [len(p) for p in prompt_token_ids(tok, records)]
    print(f"{args.limit} sentences, {len(records)} prompts of {min(lengths)}-{max(lengths)} tokens, max_new "
          f"{args.max_new}, max_batch_tokens {args.max_batch_tokens}")

    # before: fixed chunks, whole prompts padded to the longest of the chunk, evaluate.py's 32 prompts per call;
    # after: continuous batching, prefill in length runs, bigger calls so that waiting rows can fill the batch.
    modes = {"before": (TorchEngine(model, tok, max_batch_tokens=args.max_batch_tokens, continuous=False,
                                    prefill_run_overhead=10**9), args.before_batch),
             "after": (TorchEngine(model, tok, max_batch_tokens=args.max_batch_tokens), args.batch)}
    for engine, _ in modes.values():  # warm-up: first-call costs (kernel selection, allocator) stay out of the timing
        generate_answers(engine, tok, records[:2], 4, stop=stop, batch_size=2, progress=False)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    answers: dict[str, list] = {}
    stats: dict[str, dict] = {mode: {} for mode in modes}
    for repeat in range(args.repeats):
        order = list(modes) if repeat % 2 == 0 else list(reversed(modes))
        for mode in order:
            engine, batch = modes[mode]
            calls: list[dict] = []  # the engine's stats after each of its calls
            engine.generate = recording_stats(engine, calls)
            start = time.perf_counter()
            answers[mode] = generate_answers(engine, tok, records, args.max_new, temperature=0.0, stop=stop,
                                             batch_size=batch, progress=False)
            times[mode].append(time.perf_counter() - start)
            del engine.generate
            stats[mode] = {key: sum(c[key] for c in calls) for key in ("prefills", "joins", "decode_steps")}
            stats[mode]["peak_rows"] = max(c["peak_rows"] for c in calls)
            print(f"repeat {repeat} {mode} ({batch} prompts per call): {times[mode][-1]:.1f} s, {stats[mode]}",
                  flush=True)

    tokens = sum(a.completion_tokens for a in answers["before"])
    differ = sum(a.text != b.text for a, b in zip(answers["before"], answers["after"]))
    cut = sum(a.finish_reason == "length" for a in answers["before"])
    answer_lengths = sorted(a.completion_tokens for a in answers["before"])
    print(f"answers: {tokens} tokens, lengths min/median/max {answer_lengths[0]}/"
          f"{answer_lengths[len(answer_lengths) // 2]}/{answer_lengths[-1]}, {cut} cut at max_new; "
          f"{differ} answers differ between the modes")
    print("| mode | prompts per call | wall s (median) | answer tok/s | sentences/s | prefills / joins | decode steps "
          "| peak rows | wall times (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    for mode, t in times.items():
        st = stats[mode]
        print(f"| {mode} | {modes[mode][1]} | {medians[mode]:.1f} | {tokens / medians[mode]:.1f} | "
              f"{args.limit / medians[mode]:.2f} | {st['prefills']} / {st['joins']} | {st['decode_steps']} | "
              f"{st['peak_rows']} | {' / '.join(f'{x:.1f}' for x in t)} |")
    print(f"after / before throughput: {medians['before'] / medians['after']:.2f}x")


if __name__ == "__main__":
    main()
