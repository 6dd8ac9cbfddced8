"""Peak memory of per-token log-probs, forward + backward: naive log_softmax().gather() vs token_logprobs.

    naive:   torch.log_softmax(logits / T, -1).gather(-1, tokens[..., None])
    chunked: grpo.logprobs.token_logprobs(logits, tokens, T, chunk_size)

"peak extra" is the memory above what was allocated before the call (the logits and tokens): on CUDA
torch.cuda.max_memory_allocated; on CPU the process's peak RSS (VmHWM in /proc/self/status, reset through
/proc/self/clear_refs) in a fresh subprocess per variant, so one variant's freed pages cannot hide the
other's. Both variants must also hold logits.grad ([B, T, V], the logits' dtype) at the end; that is the
floor no per-token log-prob function can go below without fusing the lm_head.

Command:  OMP_NUM_THREADS=1 python bench/logprob_memory.py            (B=8 T=512 V=49152 fp32, temperature 0.7)
          python bench/logprob_memory.py --device cuda --dtype bfloat16
(the naive variant runs in the logits' dtype, so for bf16 it is not upcast; real trainers usually upcast.)

Results (CPU, 2 shared cores, torch 2.13.0+cpu, OMP_NUM_THREADS=1, B=8 T=512 V=49152 float32, temperature 0.7;
logits = logits.grad = 768 MB; seconds are noisy on the shared machine):
    variant    chunk  peak extra MB  x logits  seconds
    naive          -           2310      3.01     10.6
    chunked     1024            968      1.26      3.9     ratio naive / chunked 2.39
    chunked      256            825      1.07      3.3     ratio 2.80  (--chunk-size 256)
chunked = logits.grad (768 MB) + one chunk of float32 scratch (1024 x 49152 x 4 B = 192 MB); naive adds
logits / T, the saved log-softmax and backward temporaries, all [B, T, V] float32. Not measured on a GPU
(none available to this session); run the second command there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from grpo.logprobs import DEFAULT_CHUNK_ROWS, token_logprobs  # noqa: E402

MB = 2**20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, float]:
    """One forward + backward of one variant in this process; returns peak extra bytes and seconds."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.B, args.T, args.V, generator=gen, device=device, dtype=dtype).requires_grad_()
    tokens = torch.randint(0, args.V, (args.B, args.T), generator=gen, device=device)

    def step() -> None:
        if variant == "naive":
            logp = torch.log_softmax(logits / args.temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
        else:
            logp = token_logprobs(logits, tokens, args.temperature, args.chunk_size)
        logp.sum().backward()

    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak_extra = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before_kb = _status_kb("VmRSS")
        start = time.perf_counter()
        step()
        seconds = time.perf_counter() - start
        peak_extra = (_status_kb("VmHWM") - before_kb) * 1024
    return {"peak_extra": float(peak_extra), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--B", type=int, default=8)
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--V", type=int, default=49152)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_ROWS)
    parser.add_argument("--child", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # CPU worker: print one JSON line for the parent
        print(json.dumps(run_variant(args.child, args)))
        return

    results = {}
    for variant in ("naive", "chunked"):
        if args.device == "cpu":
            cmd = [sys.executable, __file__, *sys.argv[1:], "--child", variant]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        else:
            results[variant] = run_variant(variant, args)

    element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    logits_mb = args.B * args.T * args.V * element / MB
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"B={args.B} T={args.T} V={args.V} {args.dtype} on {args.device}, temperature {args.temperature}, "
          f"chunk {args.chunk_size} rows; logits = logits.grad = {logits_mb:.0f} MB")
    print(f"{'variant':<10}{'peak extra MB':>15}{'x logits':>10}{'seconds':>10}")
    for variant, r in results.items():
        print(f"{variant:<10}{r['peak_extra'] / MB:>15.0f}{r['peak_extra'] / MB / logits_mb:>10.2f}"
              f"{r['seconds']:>10.2f}")
    print(f"ratio naive / chunked peak extra: {results['naive']['peak_extra'] / results['chunked']['peak_extra']:.2f}")


if __name__ == "__main__":
    main()
