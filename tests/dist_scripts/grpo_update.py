"""One GRPO policy update (grpo.trainer.policy_update) on a fixed global batch of rollouts.

    python tests/dist_scripts/grpo_update.py OUT LOSS_AGG [shared]                           # 1 process, all rows
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_scripts/grpo_update.py OUT LOSS_AGG
    (either with a third argument: shared | mixed | masked)

`shared`: each prompt is repeated over 2 adjacent rows (as G completions of one prompt are).
`mixed`: only rank 0's half repeats prompts, and its first micro-batch has 1-token completions only (C = 1), while
rank 1's prompts are all distinct: a data-dependent choice of forward path would issue different FSDP2 collectives
on the two ranks (a hang) — the choice must depend on the config alone.
`masked`: rows 4–6 have an all-zero loss mask (as zero-variance groups do), so rank 1 has one live row to rank 0's
four: it must pad with masked forwards to run as many as rank 0 (else a hang), and the update must not change.

Each rank trains on its contiguous half of the rows (as the trainer's prompt split does); rank 0 writes
OUT/world{W}.pt with the full weights after the update and the update's metrics, for tests/test_trainer.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from grpo.batch import collate_rollouts  # noqa: E402
from grpo.distributed import cleanup, full_state_dict, init_distributed, shard_model  # noqa: E402
from grpo.grpo_config import GRPOConfig  # noqa: E402
from grpo.models import tiny_llama  # noqa: E402
from grpo.optim import build_optimizer, build_scheduler  # noqa: E402
from grpo.trainer import policy_update  # noqa: E402

ROWS, VOCAB = 8, 128


def global_rollouts(mode: str = ""):
    """8 rollouts with prompt lengths 3..6 and completion lengths 1..8, so normalisers differ between ranks."""
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, VOCAB, (3 + i % 4,), generator=gen).tolist() for i in range(ROWS)]
    if mode == "shared":
        prompts = [prompts[i - i % 2] for i in range(ROWS)]
    elif mode == "mixed":
        prompts = [prompts[i - i % 2] if i < ROWS // 2 else prompts[i] for i in range(ROWS)]
    completions = [torch.randint(1, VOCAB, (1 + (5 * i) % 8,), generator=gen).tolist() for i in range(ROWS)]
    if mode == "mixed":
        completions[0], completions[1] = completions[0][:1], completions[1][:1]
    old = [(-torch.rand(len(c), generator=gen) * 3).tolist() for c in completions]
    advantages = torch.randn(ROWS, generator=gen)
    return prompts, completions, old, advantages


def main(out: str, loss_agg: str, mode: str) -> None:
    torch.set_num_threads(1)
    info = init_distributed()
    cfg = GRPOConfig(reward_weights={"r": 1.0}, prompts_per_step=2, group_size=4, micro_batch_size=2,
                     loss_agg=loss_agg, beta=0.0, lr=1e-3, max_grad_norm=1e9, max_completion_len=8,
                     temperature=0.7, warmup_ratio=0.0)
    policy = shard_model(tiny_llama(vocab_size=VOCAB, hidden=32, layers=2, heads=2, seed=3), info)
    optimizer = build_optimizer(policy, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    scheduler = build_scheduler(optimizer, 1, 0.0, "constant")
    prompts, completions, old, advantages = global_rollouts(mode)
    rows = slice(info.rank * ROWS // info.world_size, (info.rank + 1) * ROWS // info.world_size)
    batch = collate_rollouts(prompts[rows], completions[rows], old[rows], pad_id=0)
    mask = batch.completion_mask.clone()
    if mode == "masked":
        dead = torch.arange(ROWS)[rows]
        mask[(dead >= 4) & (dead <= 6)] = 0
    metrics = policy_update(policy, optimizer, scheduler, batch, advantages[rows], mask,
                            None, None, cfg, info)
    state = full_state_dict(policy)
    if info.rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"state": state, "metrics": metrics}, Path(out) / f"world{info.world_size}.pt")
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
