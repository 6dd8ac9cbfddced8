"""The GRPO update's micro-batches with and without ``RolloutBatch.narrow``, on one step of the mixture preset.

A step's rollouts are collated to the longest prompt and the longest completion of the whole step. In the
leave-one-domain-out mixture (configs/grpo_smollm2_mix.yaml) prompts run from ~200 tokens (CoNLL-2003) to ~800
(CrossNER science), and one runaway answer reaches max_completion_len (512) while most end near 160, so without
narrowing every micro-batch runs ~800 + 512 columns. ``narrow`` drops the columns that are padding in all of a
micro-batch's rows.

The step: the first ``--prompts`` prompts of the preset in the trainer's order for step 0 (real, chat-rendered),
G = 8 completions each of random tokens with lengths drawn uniformly from 80-260, and one row of 512 (a runaway
answer). Timed: what ``grpo.trainer.policy_update`` runs per micro-batch of 8 rows (one group), forward with the
shared prompt prefix + backward of the summed log-probs, for every group, "full" and "narrowed" interleaved over
``--rounds`` rounds (median). The log-probs of the two are compared on every real completion token.

Command:  python bench/narrow_micro_batches.py          (SmolLM2-135M-Instruct, fp32, CPU)

Measured 2026-12-04 17:37-17:54 UTC, 2-core AMD EPYC (avx2, avx512f/bw/vl/vnni/bf16), torch 2.13.0+cpu, 2 threads,
nothing else running. 8 prompts (CoNLL-2003, AI, music, science) of 168-666 tokens × G 8, completions 80-512 tokens
(mean 179), collated [64, 1178]:

| micro-batches | s per step's update (median of 2) | ratio |
|---|---:|---:|
| full width | 344.6 (362.2 / 327.0) | 1.00 |
| narrowed | 159.5 (153.9 / 165.1) | 2.16x |

max |log-prob difference| on real completion tokens: 5.34e-05 (fp32 round-off of different matmul shapes).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_grpo  # noqa: E402
from bench.machine import cpu_flags  # noqa: E402
from grpo.batch import collate_rollouts, completion_logprobs  # noqa: E402
from grpo.config import parse_config  # noqa: E402
from grpo.distributed import DistInfo  # noqa: E402
from grpo.models import load_model_and_tokenizer  # noqa: E402
from grpo.trainer import step_prompt_indices  # noqa: E402


def time_update(model, batch, group: int, narrow: bool, temperature: float) -> tuple[float, list[torch.Tensor]]:
    """Seconds for forward + backward of every micro-batch of ``group`` rows; the log-probs of each."""
    t0, logps = time.perf_counter(), []
    for i in range(0, len(batch), group):
        mb = batch.select(slice(i, i + group))
        mb = mb.narrow() if narrow else mb
        logp, _ = completion_logprobs(model, mb, temperature)
        (logp * mb.completion_mask).sum().backward()
        logps.append(logp.detach())
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0, logps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/grpo_smollm2_mix.yaml")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = parse_config(train_grpo.NERGRPOConfig, ["--config", args.config, "--prompts_per_step", str(args.prompts)])
    model, tokenizer = load_model_and_tokenizer(args.model, "float32", "cpu")
    model.train()
    prompts, _ = train_grpo.build_train_prompts(cfg, tokenizer)
    chosen = [prompts[i] for i in step_prompt_indices(0, cfg, len(prompts), DistInfo(0, 1, 0, torch.device("cpu")))]
    rng = random.Random(0)
    lengths = [rng.randint(80, 260) for _ in range(len(chosen) * cfg.group_size)]
    lengths[rng.randrange(len(lengths))] = cfg.max_completion_len
    rows_p = [p["prompt_ids"] for p in chosen for _ in range(cfg.group_size)]
    rows_c = [[rng.randrange(100, 40000) for _ in range(n)] for n in lengths]
    batch = collate_rollouts(rows_p, rows_c, [[0.0] * n for n in lengths], tokenizer.pad_token_id)
    print(f"machine: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{len(chosen)} prompts x G {cfg.group_size}: prompt tokens {min(map(len, rows_p))}-{max(map(len, rows_p))}"
          f" (domains {sorted({p['sentence_id'].split('/')[0] for p in chosen})}), completion tokens "
          f"{min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.0f}); collated [N, P + C] = "
          f"{list(batch.input_ids.shape)}")
    times: dict[str, list[float]] = {"full": [], "narrowed": []}
    for r in range(args.rounds):
        for name in times:
            seconds, logps = time_update(model, batch, cfg.group_size, name == "narrowed", cfg.temperature)
            times[name].append(seconds)
            if name == "full":
                full = logps
            else:
                gap = max(float(((a[:, :b.shape[1]] - b).abs() * batch.completion_mask[i * cfg.group_size:(i + 1) *
                          cfg.group_size, :b.shape[1]]).max()) for i, (a, b) in enumerate(zip(full, logps)))
            print(f"  round {r} {name}: {seconds:.1f} s", flush=True)
    full_s, narrow_s = statistics.median(times["full"]), statistics.median(times["narrowed"])
    print(f"\n| micro-batches | s per step's update (median of {args.rounds}) | ratio |\n|---|---:|---:|\n"
          f"| full width | {full_s:.1f} | 1.00 |\n| narrowed | {narrow_s:.1f} | {full_s / narrow_s:.2f}x |")
    print(f"max |log-prob difference| on real completion tokens: {gap:.2e}")


if __name__ == "__main__":
    main()
