"""Training forward+backward with and without the shared prompt prefix (grpo.batch.completion_logprobs).

One micro-batch of G completions of the same prompt, SmolLM2-135M-Instruct, fp32, CPU, 2 threads; the two modes are
timed alternately in one process (this machine is noisy, so only the ratio is meaningful). Shapes: the NER preset's
(a ~250-token few-shot prompt, G = 8, 96-token completions) and bench/grpo_step.py's (~37-token chat prompts, G = 4,
32 tokens). Token ids are random: speed does not depend on them.

    OMP_WAIT_POLICY=PASSIVE python bench/prefix_sharing.py --rounds 3

Results: see the README's Benchmarks section (with the date and load of the run).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from grpo.batch import collate_rollouts, completion_logprobs  # noqa: E402
from grpo.models import load_model_and_tokenizer  # noqa: E402


def fwd_bwd_seconds(model, batch, share: bool) -> float:
    model.zero_grad(set_to_none=True)
    t = time.perf_counter()
    logp, _ = completion_logprobs(model, batch, 1.0, share_prompts=share)
    (logp * batch.completion_mask).sum().backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model_and_tokenizer("smollm2-135m-instruct", "float32", "cpu")
    model.train()
    gen = torch.Generator().manual_seed(0)
    print("| shape | plain s | shared s | speed-up |\n|---|---|---|---|")
    for name, prompt_len, g, comp_len in (("NER preset: P 250, G 8, C 96", 250, 8, 96),
                                          ("grpo_step: P 37, G 4, C 32", 37, 4, 32)):
        prompt = torch.randint(100, 40000, (prompt_len,), generator=gen).tolist()
        comps = [torch.randint(100, 40000, (comp_len,), generator=gen).tolist() for _ in range(g)]
        batch = collate_rollouts([prompt] * g, comps, [[0.0] * comp_len] * g, tok.pad_token_id)
        fwd_bwd_seconds(model, batch, True)  # warm-up
        times = {False: [], True: []}
        for _ in range(args.rounds):
            for share in (False, True):
                times[share].append(fwd_bwd_seconds(model, batch, share))
        plain, shared = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {name} | {plain:.2f} | {shared:.2f} | {plain / shared:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
