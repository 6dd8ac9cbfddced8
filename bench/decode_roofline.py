"""How fast a one-token decode step could be on this machine: the bytes it must read against the rates this CPU reads
them at, beside the fp32 matmul peak that "% of peak" in bench/generation.py is measured against.

A decode step of R rows multiplies R vectors by every weight matrix (2 · params · R FLOPs) and reads every row's K/V.
At small R the reads, not the arithmetic, set the time. This bench times:
  - one `sum()` over 1 GiB (the best sequential read rate one call gets here);
  - one `sum()` per decode matrix, as the lean forward calls them (grpo/fast_decode.py: fused q/k/v and gate/up per
    layer, o, down, the LM head), over buffers shaped from the model's config;
then prints the floor those reads put under a step at --rows x --context cached tokens, and the step time that a
given share of the matmul peak (--share, default the 40% of issue 16) would need.

    OMP_WAIT_POLICY=PASSIVE python bench/decode_roofline.py [--model FOLDER] [--rows 32] [--context 270]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.generation import matmul_peak_flops, timed  # noqa: E402
from bench.machine import cpu_flags  # noqa: E402
from grpo.models import resolve_model_path  # noqa: E402


def decode_matrices(config) -> list[tuple[int, int]]:
    """(out, in) of every matrix a lean decode step multiplies by, in call order."""
    e, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or e // heads
    layer = [((heads + 2 * kv_heads) * d, e), (e, heads * d), (2 * config.intermediate_size, e),
             (e, config.intermediate_size)]
    return layer * config.num_hidden_layers + [(config.vocab_size, e)]


def best_seconds(fn, repeats: int = 5) -> float:
    """Fastest wall time of fn() over `repeats` calls after one warm-up call."""
    fn()
    return min(timed(fn)[0] for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--context", type=int, default=270, help="cached tokens a row attends over (mean)")
    parser.add_argument("--share", type=float, default=0.4, help="share of the fp32 matmul peak to price")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    print(f"machine: {cpu_flags()}; {args.threads} threads")

    big = torch.ones(1 << 28)  # 1 GiB of fp32
    big_rate = big.numel() * 4 / best_seconds(big.sum)
    del big
    matrices = [torch.ones(shape) for shape in decode_matrices(config)]
    weight_bytes = sum(m.numel() for m in matrices) * 4
    weights_s = best_seconds(lambda: [m.sum() for m in matrices])
    per_call_rate = weight_bytes / weights_s
    with torch.device("meta"):  # the parameter count of bench/generation.py's "% peak", without loading weights
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    peak = matmul_peak_flops()

    d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_bytes = 2 * args.rows * config.num_key_value_heads * args.context * d * 4 * config.num_hidden_layers
    kv_s = kv_bytes / per_call_rate
    budget_s = args.rows / (args.share * peak / (2 * params))
    print(f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; one sum over 1 GiB reads {big_rate / 1e9:.1f} GB/s")
    print(f"{len(matrices)} decode matrices, {weight_bytes / 1e6:.0f} MB fp32: {weights_s * 1e3:.1f} ms in one sum() "
          f"each ({per_call_rate / 1e9:.1f} GB/s)")
    print(f"K/V of {args.rows} rows x {args.context} tokens: {kv_bytes / 1e6:.0f} MB, {kv_s * 1e3:.1f} ms at that rate")
    print(f"{args.share:.0%} of the peak = {args.rows / budget_s:.0f} tok/s = {budget_s * 1e3:.1f} ms a {args.rows}-row "
          f"step; the reads alone take {(weights_s + kv_s) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
