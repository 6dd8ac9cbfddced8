"""The trainer's scoring pass on CPU, with and without its two CPU-side choices, interleaved in one process.

    OMP_WAIT_POLICY=PASSIVE python bench/trainer_passes.py [--repeats 5]

1. Attention: `completion_logprobs` forward + backward on a GRPO micro-batch of SmolLM2-135M (2 prompts of 170 and
   169 random tokens x G 8, 96 completion tokens, shared prompt prefix, fp32, 2 threads), with grouped-query attention
   run natively (SDPA's enable_gqa, what grpo/batch.py does on CPU) against transformers' K/V repeated per query head
   (what its sdpa attention does under a padding mask). Same log-probs either way (printed).
2. Entropy: `token_logprobs_and_entropy` (one walk over the logits) against `token_logprobs` then `token_entropy`
   (two walks) on [16, 95, 49152] float32 logits.
Medians of --repeats interleaved runs after one warm-up of each.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # must precede torch's OpenMP start-up

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo.batch  # noqa: E402
from bench.machine import cpu_flags  # noqa: E402
from grpo.batch import collate_rollouts, completion_logprobs  # noqa: E402
from grpo.host_memory import keep_freed_memory  # noqa: E402
from grpo.logprobs import token_entropy, token_logprobs, token_logprobs_and_entropy  # noqa: E402
from grpo.models import load_model_and_tokenizer  # noqa: E402


def micro_batch(pad_id: int):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 40000, (n,), generator=gen).tolist() for n in (170, 169)]  # 169: a padding mask
    completions = [torch.randint(100, 40000, (96,), generator=gen).tolist() for _ in range(16)]
    return collate_rollouts([prompts[i // 8] for i in range(16)], completions, [[0.0] * 96] * 16, pad_id)


def interleaved_times(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each callable over `repeats` rounds, the callables interleaved within a round, after one
    untimed warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(repeats + 1):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if rep:
                times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    keep_freed_memory()  # as train_grpo.py does on CPU
    print(f"machine: {cpu_flags()}; load average {os.getloadavg()}")

    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", "float32", torch.device("cpu"))
    model.train()
    batch = micro_batch(tok.pad_token_id)
    native_gqa = grpo.batch._native_gqa_on_cpu
    modes = {"native GQA": native_gqa, "repeated K/V": lambda model: contextlib.nullcontext()}
    first_logps = {}

    def step(name: str) -> None:
        grpo.batch._native_gqa_on_cpu = modes[name]
        logp, _ = completion_logprobs(model, batch, 1.0, with_entropy=True)
        logp.sum().backward()
        model.zero_grad(set_to_none=True)
        first_logps.setdefault(name, logp.detach())

    times = interleaved_times({name: functools.partial(step, name) for name in modes}, args.repeats)
    grpo.batch._native_gqa_on_cpu = native_gqa
    diff = (first_logps["native GQA"] - first_logps["repeated K/V"]).abs().max().item()
    for name, ts in times.items():
        print(f"completion_logprobs fwd+bwd, {name}: {statistics.median(ts):.2f} s "
              f"({' / '.join(f'{t:.2f}' for t in ts)})")
    print(f"  max |log-prob difference| {diff:.1e}")

    logits = torch.randn(16, 96, 49152, generator=torch.Generator().manual_seed(1))[:, :-1]
    tokens = torch.randint(0, 49152, (16, 95))
    walks = {"one walk (token_logprobs_and_entropy)": lambda: token_logprobs_and_entropy(logits, tokens),
             "two walks (token_logprobs, token_entropy)": lambda: (token_logprobs(logits, tokens),
                                                                   token_entropy(logits))}
    for name, ts in interleaved_times(walks, args.repeats).items():
        print(f"log-probs + entropy, {name}: {statistics.median(ts):.3f} s")


if __name__ == "__main__":
    main()
