"""TRL's side of bench/grpo_step.py: GRPOTrainer on the same model, prompts, G, length, β, μ (own process, own venv).

    ~/.cache/grpo-ner/venv-trl/bin/python bench/_trl_side.py --steps 2 --out result.json [--loss_batch batch.pt]

Completions are forced to exactly max_new tokens with generation_kwargs={"min_new_tokens": max_new} (TRL has no
ignore_eos; min_new_tokens masks EOS until then). Per-step wall time comes from a TrainerCallback
(on_step_begin → on_step_end), which brackets generation, scoring, the reference forward and the update.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import grpo_step as common  # noqa: E402
from grpo.models import embedded_model_dir  # noqa: E402


def bench_reward(completions, **kwargs) -> list[float]:
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return common.reward_values(texts)


class StepTimer(TrainerCallback):
    def __init__(self):
        self.t0 = 0.0
        self.walls: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.walls.append(time.perf_counter() - self.t0)


def trl_loss_on(trainer: GRPOTrainer, batch: dict) -> float:
    """TRL's GRPOTrainer._compute_loss on the fixed batch written by the project side (no padding anywhere)."""
    comp = batch["completion_ids"]
    inputs = {"prompt_ids": batch["prompt_ids"], "prompt_mask": torch.ones_like(batch["prompt_ids"]),
              "completion_ids": comp, "completion_mask": torch.ones_like(comp),
              "advantages": batch["advantages"], "ref_per_token_logps": batch["ref_logp"],
              "old_per_token_logps": None, "num_items_in_batch": torch.tensor(float(comp.numel()))}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs))


def main() -> None:
    args = common.side_args()
    torch.set_num_threads(common.THREADS)
    chats, group = common.step_prompts(args)
    n_rows = len(chats) * group
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = GRPOConfig(output_dir=out_dir, per_device_train_batch_size=n_rows, gradient_accumulation_steps=1,
                         num_generations=group, max_completion_length=args.new, num_iterations=1,
                         beta=common.BETA, loss_type="grpo", scale_rewards="group", epsilon=0.2,
                         learning_rate=common.LR, lr_scheduler_type="constant", warmup_steps=0,
                         temperature=1.0, top_p=1.0, generation_kwargs={"min_new_tokens": args.new},
                         max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
                         use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
                         model_init_kwargs={"dtype": torch.float32}, disable_tqdm=True)
        dataset = Dataset.from_list([{"prompt": m} for m in chats])
        timer = StepTimer()
        trainer = GRPOTrainer(model=str(embedded_model_dir()), reward_funcs=bench_reward, args=cfg,
                              train_dataset=dataset, callbacks=[timer])
        torch.set_num_threads(common.THREADS)
        result: dict = {"framework": "trl", "params": sum(p.numel() for p in trainer.model.parameters())}
        if args.loss_batch:
            result["loss_fixed_batch"] = trl_loss_on(trainer, torch.load(args.loss_batch))
            for values in trainer._metrics.values():  # keep the check's KL/entropy out of the training logs
                values.clear()
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        lens = [h.get("completions/mean_length") for h in trainer.state.log_history if "loss" in h]
    result["steps"] = [{"wall_s": w, "loss": l, "completion_tokens": int(round(m * n_rows)) if m else None}
                       for w, l, m in zip(timer.walls, losses, lens)]
    result["vmhwm_mib"] = common.vmhwm_mib()
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
