"""nn.Linear vs the oneDNN prepacked linear (grpo/packed_linear.py) over all of SmolLM2-135M's weight matrices.

One "pass" multiplies an (M, in) input by each of the model's 211 linear weights in forward order (30 layers x
q k v o gate up down, then the 49152 x 576 tied head), the way one forward of M tokens touches them: the 540 MB of
weights do not fit in cache, so each pass streams them from memory, as a decode step does. The two paths alternate
within each round; the table gives the median pass time and the weight bytes streamed per second, next to a plain
`sum()` over the same tensors (a rough ceiling for reading them).

Command:
    OMP_WAIT_POLICY=PASSIVE python bench/packed_linear.py --rounds 7

Measured 2026-12-03 09:02 UTC (2-core AMD EPYC with AVX-512, torch 2.13 CPU, 2 threads, OMP_WAIT_POLICY=PASSIVE,
load average 0.9), 538 MB of weights:

| rows M | nn.Linear ms | packed ms | speed-up | nn.Linear GB/s | packed GB/s | sum() GB/s |
|---|---|---|---|---|---|---|
| 1 | 56.1 | 52.3 | 1.07x | 9.6 | 10.3 | 15.6 |
| 8 | 103.8 | 57.5 | 1.81x | 5.2 | 9.4 | 15.2 |
| 32 | 140.3 | 83.8 | 1.67x | 3.8 | 6.4 | 15.6 |
| 256 | 549.0 | 442.7 | 1.24x | 1.0 | 1.2 | 16.0 |

Packing all 211 weights (once per generate call): 237 ms. max |packed - F.linear| on one layer (fp32
accumulation order): 3.4e-05.
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
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo.models import load_model_and_tokenizer  # noqa: E402
from grpo.packed_linear import packed_linears  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 256])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = load_model_and_tokenizer("smollm2-135m-instruct")
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    print(f"{len(linears)} linear layers, {weight_bytes / 1e6:.0f} MB of weights; {args.threads} threads; "
          f"load average {os.getloadavg()}")

    def one_pass(rows: int, packed: bool) -> float:
        inputs = {k: torch.randn(rows, k) for k in {m.in_features for m in linears}}
        with torch.no_grad(), packed_linears(model, enabled=packed) as count:
            assert count == (len(linears) if packed else 0)
            start = time.perf_counter()
            for m in linears:
                m(inputs[m.in_features])
            return time.perf_counter() - start

    def read_pass() -> float:
        start = time.perf_counter()
        for m in linears:
            m.weight.sum()
        return time.perf_counter() - start

    print("\n| rows M | nn.Linear ms | packed ms | speed-up | nn.Linear GB/s | packed GB/s | sum() GB/s |")
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        one_pass(rows, True), one_pass(rows, False)  # warm-up: oneDNN builds its kernels on first use
        plain, packed, read = [], [], []
        for _ in range(args.rounds):
            plain.append(one_pass(rows, False))
            packed.append(one_pass(rows, True))
            read.append(read_pass())
        p, q, r = (statistics.median(x) for x in (plain, packed, read))
        print(f"| {rows} | {p * 1e3:.1f} | {q * 1e3:.1f} | {p / q:.2f}x | {weight_bytes / p / 1e9:.1f} | "
              f"{weight_bytes / q / 1e9:.1f} | {weight_bytes / r / 1e9:.1f} |", flush=True)

    pack = []
    for _ in range(3):
        start = time.perf_counter()
        with torch.no_grad(), packed_linears(model):
            pack.append(time.perf_counter() - start)
    print(f"\npacking all {len(linears)} weights (once per generate call): {statistics.median(pack) * 1e3:.0f} ms")

    # Same results up to fp32 accumulation order.
    x = torch.randn(8, linears[0].in_features)
    with torch.no_grad():
        expected = F.linear(x, linears[0].weight)
        with packed_linears(linears[0]):
            got = linears[0](x)
    print(f"max |packed - F.linear| on one layer: {(got - expected).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
