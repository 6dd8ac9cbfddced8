"""One framework's side of bench/grpo_step.py: this project's GRPO step (run in its own process for a clean VmHWM).

    python bench/_project_side.py --steps 2 --out result.json [--loss_batch batch.pt]

Each step is the body of grpo.trainer.train (generate → score → π_ref log-probs → advantages → policy_update),
without the logging/checkpoint tail; the engine samples with ignore_eos=True so every completion has exactly
max_new tokens. With --loss_batch it first writes a fixed batch (for TRL's _compute_loss) and this project's loss on it.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import grpo_step as common  # noqa: E402
from grpo import algos  # noqa: E402
from grpo.batch import collate_rollouts, completion_logprobs  # noqa: E402
from grpo.distributed import DistInfo  # noqa: E402
from grpo.engine import TorchEngine  # noqa: E402
from grpo.grpo_config import GRPOConfig  # noqa: E402
from grpo.distributed import shard_trainable  # noqa: E402
from grpo.host_memory import keep_freed_memory  # noqa: E402
from grpo.models import load_model_and_tokenizer, parse_dtype  # noqa: E402
from grpo.optim import build_optimizer, build_scheduler  # noqa: E402
from grpo.rollout_io import tokenize_prompts  # noqa: E402
from grpo.trainer import frozen_logprobs, policy_update, score_completions  # noqa: E402


def project_loss_on(policy, batch: dict, cfg: GRPOConfig) -> float:
    """This project's loss on a fixed batch: policy_loss (on-policy, old = logp.detach()) + β·k3 KL, seq_mean."""
    prompt_ids, completion_ids = batch["prompt_ids"].tolist(), batch["completion_ids"].tolist()
    rb = collate_rollouts(prompt_ids, completion_ids, [[0.0] * len(c) for c in completion_ids], 0)
    with torch.no_grad():
        logp, _ = completion_logprobs(policy, rb, cfg.temperature)
        mask = rb.completion_mask.to(logp.device)
        per_token, _ = algos.policy_loss(logp, logp, batch["advantages"].to(logp.device), mask, cfg.eps_low,
                                         cfg.eps_high)
        per_token = per_token + cfg.beta * algos.kl_penalty(logp, batch["ref_logp"].to(logp.device), "k3")
        n_tok, n_seq = algos.normaliser_counts(mask)
        return float(algos.aggregate_loss(per_token, mask, "seq_mean", num_tokens=n_tok, num_seqs=n_seq))


def make_loss_batch(policy, tok, prompt_ids: list[list[int]], engine: TorchEngine, cfg: GRPOConfig) -> dict:
    """Fixed inputs for the loss comparison: G sampled completions per prompt, prompts cut to one common length
    (TRL's training forward passes no position_ids, so left padding would shift its RoPE positions and the two
    losses would differ for that reason alone), reward-derived advantages, and π_ref log-probs = the policy's
    own plus seeded noise (an identical reference would make the KL term exactly 0 and test nothing)."""
    width = min(len(p) for p in prompt_ids)
    cut = [p[-width:] for p in prompt_ids]
    rollouts = engine.generate(cut, n=cfg.group_size, max_new_tokens=cfg.max_completion_len, seed=123, ignore_eos=True)
    texts = [r.text for r in rollouts]
    rewards = torch.tensor(common.reward_values(texts))
    adv = algos.group_advantages(rewards, cfg.group_size, "group")
    prompts = torch.tensor([r.prompt_ids for r in rollouts])
    comps = torch.tensor([r.completion_ids for r in rollouts])
    rb = collate_rollouts(prompts.tolist(), comps.tolist(), [r.logprobs for r in rollouts], tok.pad_token_id)
    with torch.no_grad():
        logp, _ = completion_logprobs(policy, rb, cfg.temperature)
    logp = logp.float().cpu()
    noise = torch.randn(logp.shape, generator=torch.Generator().manual_seed(7)) * 0.3
    return {"prompt_ids": prompts, "completion_ids": comps, "advantages": adv, "ref_logp": logp + noise}


def main() -> None:
    args = common.side_args()
    torch.set_num_threads(common.THREADS)
    if args.device == "cpu":  # as train_grpo.py does on CPU
        keep_freed_memory()
    torch.manual_seed(0)
    chats, group = common.step_prompts(args)
    cfg = GRPOConfig(prompts_per_step=len(chats), group_size=group, max_completion_len=args.new,
                     micro_batch_size=len(chats) * group, max_prompt_len=2048, mu=1, beta=common.BETA, lr=common.LR,
                     warmup_ratio=0.0, lr_scheduler="constant", reward_weights={"bench": 1.0})
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:  # "cuda" alone: set_device needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    if info.device.type == "cuda":
        torch.cuda.set_device(info.device)
    policy, tok = load_model_and_tokenizer(args.model, "float32", info.device)
    ref, _ = load_model_and_tokenizer(args.model, args.dtype, info.device)
    ref.eval().requires_grad_(False)
    if args.dtype != "float32":  # as train_grpo.py: fp32 masters, FSDP2 computes in dtype (one-rank group)
        policy = shard_trainable(policy, info, parse_dtype(args.dtype))
    engine = TorchEngine(policy, tok, compute_dtype=parse_dtype(args.rollout_dtype) if args.rollout_dtype else None)
    prompt_ids, prompts, _ = tokenize_prompts(tok, [{"messages": m} for m in chats], cfg.max_prompt_len)
    result: dict = {"framework": "project", "params": sum(p.numel() for p in policy.parameters())}
    if args.loss_batch:
        batch = make_loss_batch(policy, tok, prompt_ids, engine, cfg)
        torch.save(batch, args.loss_batch)
        result["loss_fixed_batch"] = project_loss_on(policy, batch, cfg)
    optimizer = build_optimizer(policy, cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
    scheduler = build_scheduler(optimizer, cfg.total_steps, cfg.warmup_ratio, cfg.lr_scheduler)
    reward_fns = [("bench", 1.0, lambda texts, samples: common.reward_values(texts))]
    steps = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        policy.eval()
        rollouts = engine.generate(prompt_ids, n=cfg.group_size, max_new_tokens=cfg.max_completion_len,
                                   temperature=cfg.temperature, top_p=cfg.top_p, seed=1000 + step, ignore_eos=True)
        policy.train()
        t_gen = time.perf_counter() - t0
        samples = [prompts[i] for i in range(len(prompts)) for _ in range(cfg.group_size)]
        rewards, _ = score_completions([r.text for r in rollouts], samples, reward_fns)
        batch = collate_rollouts([r.prompt_ids for r in rollouts], [r.completion_ids for r in rollouts],
                                 [r.logprobs for r in rollouts], tok.pad_token_id)
        ref_logp = frozen_logprobs(ref, batch, cfg)
        advantages = algos.group_advantages(rewards, cfg.group_size, cfg.adv_scale)
        metrics = policy_update(policy, optimizer, scheduler, batch, advantages, batch.completion_mask, None,
                                ref_logp, cfg, info)
        wall = time.perf_counter() - t0
        steps.append({"wall_s": wall, "generate_s": t_gen, "loss": metrics["loss"],
                      "completion_tokens": int(batch.completion_mask.sum()),
                      "prompt_tokens": sum(len(r.prompt_ids) for r in rollouts)})
    result["steps"] = steps
    result["vmhwm_mib"] = common.vmhwm_mib()
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
