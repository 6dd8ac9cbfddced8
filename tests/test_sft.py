"""grpo.sft: completion-only masking, packing, loss normalisation, the loop (overfit, exact resume)."""
from __future__ import annotations

import random
import shutil

import pytest
import torch

from grpo.distributed import DistInfo
from grpo.models import tiny_llama
from grpo.sft import (IGNORE, Row, SFTConfig, accumulate_gradients, build_example, collate, common_prefix_len,
                      completion_nll_sum, pack_rows, rows_for_step, tokenize_pairs, train_sft)

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _random_rows(n: int, seed: int, vocab: int = 256) -> list[Row]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 10))]
        completion = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))]
        rows.append(build_example(prompt, completion, eos_id=2))
    return rows


def _hf_nll_sum(model, row: Row) -> tuple[float, int]:
    """Reference: one example alone, Hugging Face's own shifted mean loss × its number of targets."""
    ids = torch.tensor([row.input_ids])
    labels = torch.tensor([row.labels])
    n = int((labels[:, 1:] != IGNORE).sum())
    return float(model(input_ids=ids, labels=labels).loss) * n, n


def test_build_example_masks_prompt_and_appends_eos():
    row = build_example([11, 12, 13], [21, 22], eos_id=2)
    assert row.input_ids == [11, 12, 13, 21, 22, 2]
    assert row.labels == [IGNORE, IGNORE, IGNORE, 21, 22, 2]
    assert row.position_ids == [0, 1, 2, 3, 4, 5]
    assert row.n_targets == 3                      # 21, 22 and the EOS
    # A completion that already ends with EOS does not get a second one.
    assert build_example([11], [21, 2], eos_id=2).input_ids == [11, 21, 2]


def test_tokenize_pairs_masks_the_rendered_chat_prompt(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "Sentence: Japan won."}],
                                     add_generation_prompt=True, tokenize=False)
    completion = "<think>Japan is a country.</think> <entity>Japan</entity>"
    (row,), dropped = tokenize_pairs(tok, [(prompt, completion)], max_len=1024)
    assert dropped == 0
    n_prompt = sum(1 for y in row.labels if y == IGNORE)
    # Every masked position is the prompt, and it decodes back to the prompt text exactly.
    assert row.labels[:n_prompt] == [IGNORE] * n_prompt
    assert tok.decode(row.input_ids[:n_prompt]) == prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    # The trained positions are the completion plus <|im_end|> (id 2), identical to the input ids there.
    assert row.labels[n_prompt:] == row.input_ids[n_prompt:]
    assert tok.decode(row.labels[n_prompt:]) == completion + "<|im_end|>"
    assert row.labels[-1] == tok.convert_tokens_to_ids("<|im_end|>") == 2
    # Over-long examples are dropped, never cut (a cut completion would lose its EOS).
    rows, dropped = tokenize_pairs(tok, [(prompt, completion)], max_len=len(row.input_ids) - 1)
    assert (rows, dropped) == ([], 1)


def test_pack_rows_by_hand():
    a = build_example([5, 6], [7], eos_id=2)          # 4 tokens
    b = build_example([], [8, 9], eos_id=2)           # 3 tokens, no prompt
    c = build_example([5, 6, 7], [8, 9], eos_id=2)    # 6 tokens: does not fit after a+b in 8
    packed = pack_rows([a, b, c], max_len=8)
    assert [r.input_ids for r in packed] == [[5, 6, 7, 2, 8, 9, 2], [5, 6, 7, 8, 9, 2]]
    assert packed[0].position_ids == [0, 1, 2, 3, 0, 1, 2]
    # b's first token (8) would be predicted from a's EOS: masked, as it is in b alone (nothing precedes it).
    assert packed[0].labels == [IGNORE, IGNORE, 7, 2, IGNORE, 9, 2]
    assert packed[0].n_targets == a.n_targets + b.n_targets == 4


def test_packed_loss_equals_unpacked_loss():
    model = tiny_llama(vocab_size=256, hidden=32, layers=2, heads=4).eval()
    rows = _random_rows(12, seed=1)
    with torch.no_grad():
        # Sharpen the near-uniform random init (×3 on every matrix) so attention leaks move the loss visibly.
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(3.0)
        ref = [_hf_nll_sum(model, r) for r in rows]
        ref_mean = sum(s for s, _ in ref) / sum(n for _, n in ref)
        padded_sum, padded_n = completion_nll_sum(model, collate(rows, pad_id=0))
        packed = pack_rows(rows, max_len=40)
        assert len(packed) < len(rows) and any(r.position_ids.count(0) > 1 for r in packed)
        packed_sum, packed_n = completion_nll_sum(model, collate(packed, pad_id=0))
        # Control: the same packed rows without position restarts let examples attend to each other.
        leaky = [Row(r.input_ids, r.labels, list(range(len(r.input_ids)))) for r in packed]
        leaky_sum, _ = completion_nll_sum(model, collate(leaky, pad_id=0))
    assert padded_n == packed_n == sum(n for _, n in ref)
    assert abs(float(padded_sum) / padded_n - ref_mean) < 1e-4
    assert abs(float(packed_sum) / packed_n - ref_mean) < 1e-4
    assert abs(float(leaky_sum) / packed_n - ref_mean) > 1e-2


def test_gradient_is_the_step_token_mean_however_split():
    rows = _random_rows(8, seed=2)

    def grads(split: list[int]) -> list[torch.Tensor]:
        model = tiny_llama(vocab_size=256, hidden=32, layers=1, heads=4)
        n = sum(r.n_targets for r in rows)
        micro, start = [], 0
        for k in split:
            micro.append(rows[start:start + k])
            start += k
        accumulate_gradients(model, micro, pad_id=0, global_targets=n)
        return [p.grad.clone() for p in model.parameters()]

    # Reference: Σ over examples of HF's per-example mean loss × its tokens, divided by all tokens.
    model = tiny_llama(vocab_size=256, hidden=32, layers=1, heads=4)
    total = sum(r.n_targets for r in rows)
    loss = sum(model(input_ids=torch.tensor([r.input_ids]), labels=torch.tensor([r.labels])).loss * r.n_targets
               for r in rows) / total
    loss.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    for split in ([8], [3, 5], [1, 1, 6]):
        for g, r in zip(grads(split), reference):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_common_prefix_len_by_hand():
    a = build_example([5, 6, 7, 8], [9], eos_id=2)
    b = build_example([5, 6, 7, 3, 4], [9, 9], eos_id=2)
    assert common_prefix_len([a, b]) == 3          # 5 6 7 shared
    assert common_prefix_len([a, a]) == 3          # identical rows: stop one before the first target (index 4)
    assert common_prefix_len([a, build_example([1], [9], eos_id=2)]) == 0


def test_shared_prefix_gradient_equals_hf_per_example_loss():
    """Rows under one 12-token instruction prefix, scored with the prefix run once, give HF's own loss and
    gradients (each example alone, mean loss × its targets, summed, over all targets)."""
    rng = random.Random(3)
    prefix = [rng.randrange(3, 256) for _ in range(12)]
    rows = [build_example(prefix + [rng.randrange(3, 256) for _ in range(rng.randint(1, 6))],
                          [rng.randrange(3, 256) for _ in range(rng.randint(1, 5))], eos_id=2) for _ in range(5)]
    total = sum(r.n_targets for r in rows)

    def grads(share: bool) -> tuple[float, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = tiny_llama(vocab_size=256, hidden=32, layers=2, heads=4)
        nll = accumulate_gradients(model, [rows[:2], rows[2:]], pad_id=0, global_targets=total, share_prefix=share)
        return float(nll), [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(0)
    model = tiny_llama(vocab_size=256, hidden=32, layers=2, heads=4)
    loss = sum(model(input_ids=torch.tensor([r.input_ids]), labels=torch.tensor([r.labels])).loss * r.n_targets
               for r in rows)
    (loss / total).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    assert common_prefix_len(rows[:2]) >= 12
    shared_nll, shared = grads(True)
    assert abs(shared_nll - float(loss.detach())) < 1e-3 * float(loss.detach())
    for g, r in zip(shared, reference):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_rows_for_step_covers_each_epoch_once():
    # 10 rows, 4 per step: 3 steps per epoch, the last wraps around to the epoch's start.
    seen = [i for s in range(3) for i in rows_for_step(10, s, 4, seed=0)]
    assert sorted(seen[:10]) == list(range(10)) and seen[10:] == seen[:2]
    assert rows_for_step(10, 3, 4, seed=0) != rows_for_step(10, 0, 4, seed=0)   # a new permutation per epoch
    assert rows_for_step(10, 4, 4, seed=0) == rows_for_step(10, 4, 4, seed=0)   # pure function of the step


def test_rows_for_step_by_length_groups_neighbours_and_covers_each_epoch_once():
    from grpo.sft import GROUP_STEPS
    # One group of 4 * GROUP_STEPS rows with distinct lengths: every step holds 4 rows adjacent in length order.
    n, per_step = 4 * GROUP_STEPS, 4
    lengths = [(i * 37) % 101 + 1 for i in range(n)]
    by_length = sorted(range(n), key=lambda i: -lengths[i])
    runs = {frozenset(by_length[k:k + per_step]) for k in range(0, n, per_step)}
    steps = [rows_for_step(n, s, per_step, seed=3, lengths=lengths) for s in range(GROUP_STEPS)]
    assert all(frozenset(step) in runs for step in steps)
    assert sorted(i for step in steps for i in step) == list(range(n))
    assert [max(lengths[i] for i in step) for step in steps] != sorted(  # steps not visited short to long
        (max(lengths[i] for i in step) for step in steps), reverse=True)
    # A short last step (10 rows, 4 per step) still covers the epoch once and wraps to its start.
    seen = [i for s in range(3) for i in rows_for_step(10, s, 4, seed=0, lengths=list(range(10)))]
    assert sorted(seen[:10]) == list(range(10)) and seen[10:] == seen[:2]


def _pairs() -> list[tuple[str, str]]:
    names = ["Japan", "Paris", "Obama", "Reuters", "Nile", "Sony", "Oslo", "Messi"]
    return [(f"<|im_start|>user\nItem {i}?<|im_end|>\n<|im_start|>assistant\n",
             f"<think>{i}</think> <entity>{n}</entity>") for i, n in enumerate(names)]


def _tiny_smol():
    return tiny_llama(vocab_size=49152, hidden=32, layers=2, heads=4, seed=0)


def _cfg(tmp_path, **kw) -> SFTConfig:
    base = dict(data="unused", out_dir=str(tmp_path / "run"), max_steps=120, batch_size=8, lr=1e-2,
                warmup_ratio=0.0, lr_scheduler="constant", max_grad_norm=1.0, weight_decay=0.0, keep_last=2)
    base.update(kw)
    return SFTConfig(**base)


def test_tiny_model_overfits_eight_examples(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows, _ = tokenize_pairs(tok, _pairs(), max_len=64)
    model = _tiny_smol()
    state = train_sft(_cfg(tmp_path), model, tok, rows, CPU)
    assert state["step"] == 120 and state["loss"] < 0.05
    model.eval()
    for (prompt, completion), row in zip(_pairs(), rows):
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            for _ in range(len(row.input_ids) - len(ids)):        # greedy decoding, as long as the target
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert tok.decode(ids[len(tok(prompt, add_special_tokens=False)["input_ids"]):]) == completion + "<|im_end|>"


def test_resume_from_checkpoint_continues_exactly(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    rows, _ = tokenize_pairs(tok, _pairs(), max_len=64)
    cfg = _cfg(tmp_path, max_steps=6, save_every=3, batch_size=1, grad_accum=2, lr=3e-3, packing=True,
               max_len=64, lr_scheduler="cosine", warmup_ratio=0.2)
    straight = _tiny_smol()
    train_sft(cfg, straight, tok, rows, CPU)
    # Throw away the final checkpoint, so resume=auto restarts from step 3 with a fresh model object.
    from grpo.checkpoint import latest_checkpoint

    final = latest_checkpoint(cfg.out_dir)
    assert final is not None and "6" in final.name
    shutil.rmtree(final)
    resumed = _tiny_smol()
    cfg.resume = "auto"
    state = train_sft(cfg, resumed, tok, rows, CPU)
    assert state["step"] == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_config_rejects_bad_values():
    from grpo.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size"):
        SFTConfig(data="x", batch_size=0).validate()
    with pytest.raises(ConfigError, match="data is empty"):
        SFTConfig().validate()


@pytest.mark.slow
def test_train_sft_script_two_fsdp_ranks_match_one_process(tmp_path, smollm2_tokenizer):
    """train_sft.py end to end (template CoT → SFT): 2 FSDP2 ranks × (2 rows × 2 micro-batches) must take the
    same steps as one process with 8-row batches, because the loss is normalised by the global token count."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    import train_sft

    root = Path(__file__).resolve().parents[1]
    model_dir = tmp_path / "tiny"
    _tiny_smol().save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    common = ["--model", str(model_dir), "--data", str(tmp_path / "cot.jsonl"), "--dataset", "conll2003",
              "--limit", "4", "--k_shot", "0", "--max_steps", "3", "--lr", "1e-3", "--warmup_ratio", "0",
              "--max_len", "256"]
    one = train_sft.main(common + ["--batch_size", "8", "--out_dir", str(tmp_path / "one")])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train_sft.py", *common, "--batch_size", "2", "--grad_accum", "2",
                           "--out_dir", str(tmp_path / "two")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "checkpoint-0000003" / "trainer_state.json").read_text())
    assert two["world_size"] == 2 and abs(two["loss"] - one["loss"]) < 1e-5
    a = load_file(tmp_path / "one" / "checkpoint-0000003" / "model.safetensors")
    b = load_file(tmp_path / "two" / "checkpoint-0000003" / "model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
