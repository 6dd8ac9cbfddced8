"""What a run leaves in metrics.jsonl and on the console: SFT logs every log_every-th step like GRPO does, GRPO's
evaluations land in the same file, and GRPO's log_every sets how often a step line is printed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from grpo.distributed import DistInfo

sys.path.insert(0, str(Path(__file__).resolve().parent))
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sft_writes_every_log_every_step_to_metrics_jsonl(tmp_path, smollm2_tokenizer):
    from grpo.models import tiny_llama
    from grpo.sft import SFTConfig, tokenize_pairs, train_sft

    pairs = [(f"<|im_start|>user\nItem {i}?<|im_end|>\n<|im_start|>assistant\n", f"<think>{i}</think> x{i}")
             for i in range(4)]
    rows, _ = tokenize_pairs(smollm2_tokenizer, pairs, max_len=64)

    def run(name: str, log_every: int) -> tuple[dict, list[dict]]:
        cfg = SFTConfig(data="unused", out_dir=str(tmp_path / name), max_steps=4, batch_size=2, lr=1e-2,
                        warmup_ratio=0.0, lr_scheduler="linear", log_every=log_every)
        model = tiny_llama(vocab_size=49152, hidden=32, layers=2, heads=4, seed=0)
        return train_sft(cfg, model, smollm2_tokenizer, rows, CPU), _lines(tmp_path / name)

    state, every = run("every", 1)
    _, sparse = run("sparse", 3)
    assert [m["step"] for m in every] == [1, 2, 3, 4]
    assert [m["step"] for m in sparse] == [3, 4]  # every 3rd step, and the last
    # The same training logged less often: the logged steps hold the same numbers.
    for a, b in zip(every[2:], sparse):
        for key in ("sft/loss", "sft/grad_norm", "sft/lr"):
            assert b[key] == a[key], key
    assert every[-1]["sft/loss"] == state["loss"]
    # Linear decay from 1e-2 over 4 steps, no warmup: the lr used at step k (1-based) is 1e-2 · (1 − (k−1)/4).
    assert [m["sft/lr"] for m in every] == [1e-2 * (1 - k / 4) for k in range(4)]


def test_grpo_log_every_sets_the_console_cadence_and_eval_lines_reach_metrics_jsonl(tmp_path, capsys):
    from tiny_grpo_run import PROMPTS
    from tiny_task import char_tokenizer, lowercase_reward, tiny_policy

    from grpo.engine import TorchEngine
    from grpo.grpo_config import GRPOConfig
    from grpo.trainer import train

    torch.set_num_threads(1)
    cfg = GRPOConfig(reward_weights={"lowercase": 1.0}, beta=0.0, prompts_per_step=4, group_size=2,
                     max_completion_len=4, micro_batch_size=8, total_steps=5, log_every=2, eval_limit=1,
                     eval_every=2, save_every=100, sample_log_count=0, out_dir=str(tmp_path))
    tok, policy = char_tokenizer(), tiny_policy()
    train(cfg, policy, tok, PROMPTS, [("lowercase", 1.0, lowercase_reward)], CPU, TorchEngine(policy, tok),
          eval_fn=lambda step: {"score": step / 10})
    lines = _lines(tmp_path)
    train_steps = [m["step"] for m in lines if "reward/mean" in m]
    evals = {m["step"]: m["eval/score"] for m in lines if "eval/score" in m}
    assert train_steps == [1, 2, 3, 4, 5]  # metrics.jsonl keeps every step whatever log_every
    assert evals == {0: 0.0, 2: 0.2, 4: 0.4, 5: 0.5}  # at start, every eval_every steps, and at the end
    console = capsys.readouterr()
    printed = [int(line.split("|")[0].split()[1]) for line in (console.out + console.err).splitlines()
               if line.startswith("step ") and "|" in line]
    assert printed == [2, 4, 5]  # every log_every-th step, and the last
