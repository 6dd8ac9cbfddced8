"""Rollout engines: the `Rollout` record, the engine protocol, and `TorchEngine`, a batched sampler in pure PyTorch.

TorchEngine runs the very `nn.Module` being trained (no weight copies, so `update_weights` is free). Per call it
  1. expands prompts x n into rows and sorts them by prompt length (longest first), a prompt's samples adjacent;
  2. admits rows to the batch in that order, as many as keep (width + max_new_tokens) * rows within
     `max_batch_tokens`, prefilling each distinct prompt once (left padded, explicit position_ids) and copying its
     KV cache to its n sample rows; distinct prompts that start alike (system prompt, instructions, few-shot
     examples) have that prefix run once per group and only their own suffixes on top (`prefix_groups`, `_prefill`),
     in runs of similar length so a few long prompts do not pad all the others (`length_buckets`);
  3. decodes one token per step for all live rows with a preallocated KV cache (no per-step torch.cat), computing
     logits for the last position only, and drops finished rows (and all-padding columns) from the batch every few
     finished rows, so short completions stop costing compute. Continuous batching (the default): each such drop
     also admits waiting rows, prefilled apart and stacked into the running cache (left padded to the wider of the
     two), so the batch stays full until no row waits. `continuous=False` admits only into an empty batch, i.e.
     runs fixed chunks (as many rows as `rows_that_fit` an empty batch) one after another.
Attention runs SDPA with native grouped-query support even when a padding mask is present (grpo/gqa_attention.py).
On CPU a prompt's n samples (n > 1) share one copy of its K/V, which decode attention reads once per step for all of
them and merges with each row's own K/V by log-sum-exp (cascade attention: `SharedKV`, `cascade_attention`):
less memory traffic per step, and each row costs the KV budget 1/n of its prompt, so more rows run at once.
Sampling (grpo/sampling.py) draws per-row seeded noise, so a row's output does not depend on batch composition.
On CPU the weights run through oneDNN copies packed at the start of the call (a decode step multiplies a few rows by
every matrix, where the default GEMM's per-call repacking costs more than the arithmetic); packs are rebuilt each
call, so they can never be stale. Llama-family models (Llama, Qwen2, Mistral) then run every forward through
grpo/fast_decode.py's LeanDecoder instead of transformers' modules (fused q/k/v and gate/up matmuls, fewer small
ops); other models keep transformers' forward with each nn.Linear packed (grpo/packed_linear.py). `compute_dtype`
(bf16 on CPUs with native bf16) has the lean forward pack converted weights and decode in that dtype while the
module stays fp32 for training; its log-probs are then the bf16 policy's (see GRPOConfig.rollout_dtype).

FSDP2: if the policy is wrapped with `fully_shard`, every FSDP module is all-gathered once before generation and
kept unsharded until the end (no collectives inside the decode loop, so ranks need no lockstep), then resharded.
Every rank must call `generate` (possibly with no prompts) because the unshard is a collective.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from transformers.cache_utils import DynamicCache

from grpo.batch_plan import left_pad, length_buckets, prefix_groups, rows_that_fit
from grpo.distributed import fsdp_unsharded
from grpo.fast_decode import LeanDecoder, unsupported_reason
from grpo.gqa_attention import GQA_SDPA, additive_mask, gqa_attention
from grpo.guide import Guide, GuidedRows
from grpo.kv_cache import (DecodeBatch, SharedKV, SharedPrompts, cache_copy_rows, cache_empty_rows, cache_select,
                            cache_stack, new_cache, padded_positions, plain_full_attention)
from grpo.packed_linear import packable_dtypes, packed_linears
from grpo.sampling import StopStrings, row_generators, sample_next_tokens


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the EOS token / the stop string's tokens when generation stopped on them
    logprobs: list[float]      # log softmax(logits / T) of each completion token, before top-p (T=1 when greedy)
    finish_reason: str         # "stop" (EOS or stop string) | "length"
    text: str                  # decoded completion, skip_special_tokens=True
    overridden: int = 0        # tokens a guide forced where the row would have sampled another (grpo/guide.py)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None, *,
                 guide: Guide | None = None) -> list[Rollout]:
        """Flat list of len(prompts) * n rollouts; prompt i's samples are [i*n : (i+1)*n]."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Called after each optimizer step."""
        ...


# ----------------------------------------------------------------------------------------------------------------
# Model state around generation

@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """model.eval() for the block, then restore every submodule's own train/eval flag."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, was_training in modes:
            m.training = was_training


# ----------------------------------------------------------------------------------------------------------------
# Engine

def default_eos_token_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Union of the tokenizer's EOS and the model's (generation) config EOS ids (chat models often list several)."""
    ids: set[int] = set()
    sources = (getattr(tokenizer, "eos_token_id", None),
               getattr(getattr(model, "generation_config", None), "eos_token_id", None),
               getattr(getattr(model, "config", None), "eos_token_id", None))
    for source in sources:
        if source is not None:
            ids.update([source] if isinstance(source, int) else source)
    return sorted(ids)


def _check_args(prompts, n, max_new_tokens, temperature, top_p, stop) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if stop is not None and (isinstance(stop, str) or not all(isinstance(s, str) for s in stop)):
        raise ValueError(f"stop must be a list of strings, got {stop!r}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")


class TorchEngine:
    """Batched KV-cached sampling on the training module itself. See the module docstring."""

    def __init__(self, model: torch.nn.Module, tokenizer, max_batch_tokens: int = 32768,
                 eos_token_ids: list[int] | None = None, compact_fraction: float = 0.125, pack_weights: bool = True,
                 share_prefixes: bool = True, continuous: bool = True, join_fraction: float = 0.25,
                 prefill_run_overhead: int = 64, cascade_attention: bool = True, lean_decode: bool = True,
                 compute_dtype: torch.dtype | None = None):
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {max_batch_tokens}")
        if compute_dtype is not None and compute_dtype not in packable_dtypes():
            raise ValueError(f"compute_dtype={compute_dtype}: this CPU's oneDNN has no kernels for it (it has "
                             f"{', '.join(map(str, packable_dtypes()))})")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        if eos_token_ids is None:
            eos_token_ids = default_eos_token_ids(model, tokenizer)
        self.eos_token_ids = set(eos_token_ids)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids, default=0)
        # Finished rows leave the batch once they are at least this fraction of it (compaction copies the KV cache).
        self.compact_fraction = compact_fraction
        # CPU: run every nn.Linear through a oneDNN weight packed at the start of each generate call
        # (grpo/packed_linear.py; ~2x faster small-batch decode). Ignored on GPU.
        self.pack_weights = pack_weights
        # Prefill a prefix that several distinct prompts of a chunk share once (see _prefill).
        self.share_prefixes = share_prefixes
        # Continuous batching: waiting rows join the running batch whenever finished rows leave it (see _decode).
        # False runs fixed chunks one after another (the engine before continuous batching; for benches).
        self.continuous = continuous
        # A join costs a prefill (which re-runs the shared prompt prefix) and a cache copy, so waiting rows join only
        # in groups of at least this fraction of the batch they make (or all that still wait).
        self.join_fraction = join_fraction
        # Prefill runs prompts (or their suffixes) of similar length together; a run costs this many padded tokens
        # more (see length_buckets).
        self.prefill_run_overhead = prefill_run_overhead
        # A prompt's n samples read one copy of its K/V (cascade attention, grpo/gqa_attention.py; CPU, n > 1,
        # with share_prefixes) instead of n copies: less memory traffic per step and more rows per budget.
        self.cascade_attention = cascade_attention
        # CPU, Llama-family models: forwards skip transformers' modules (grpo/fast_decode.py; needs packing).
        self.lean_decode = lean_decode
        # CPU: decode with copies of the weights in this dtype (bf16 for an fp32 model: half the bytes a step reads;
        # pays on CPUs with native bf16) through the lean forward; None computes in the weights' own dtype.
        self.compute_dtype = compute_dtype
        self._lean: LeanDecoder | None = None
        # What the last generate call did: prefill passes, joins into a running batch, decode steps (and their rows
        # summed), peak rows.
        self.stats: dict[str, int] = {}
        params = inspect.signature(model.forward).parameters
        self._forward_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _device(self) -> torch.device:
        """Where the model's weights are: every tensor the engine feeds it is made there."""
        return next(self.model.parameters()).device

    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def update_weights(self, model: torch.nn.Module) -> None:
        if model is not self.model:
            raise ValueError("TorchEngine samples from the training module itself; update_weights got a different "
                             "module. Build a new TorchEngine for it instead.")

    def generate(self, prompts: list[list[int]], n: int = 1, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, stop: list[str] | None = None, seed: int | None = None, *,
                 guide: Guide | None = None, ignore_eos: bool = False) -> list[Rollout]:
        """len(prompts) * n rollouts, prompt i's samples at [i*n : (i+1)*n].

        seed None draws one from torch's global RNG. guide: forced tokens and stops per row (grpo/guide.py).
        ignore_eos (for benchmarks) never stops on EOS.
        """
        _check_args(prompts, n, max_new_tokens, temperature, top_p, stop)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())  # follows torch.manual_seed
        # (row id, prompt index); longest prompts first so chunks pad little, a prompt's samples adjacent so one
        # prefill serves them all.
        rows = [(i * n + j, i) for i in range(len(prompts)) for j in range(n)]
        rows.sort(key=lambda row: (-len(prompts[row[1]]), row[0]))
        stop_strings = StopStrings(self.tokenizer, stop)
        with fsdp_unsharded(self.model), _eval_mode(self.model), gqa_attention(self.model), \
                torch.inference_mode(), contextlib.ExitStack() as stack:
            lean_off = None if self.lean_decode and self.pack_weights else "lean_decode or pack_weights is off"
            lean_off = lean_off or unsupported_reason(self.model, self.compute_dtype)
            if lean_off is not None and self.compute_dtype not in (None, self._param_dtype()):
                raise ValueError(f"compute_dtype={self.compute_dtype} runs through grpo/fast_decode.py's "
                                 f"LeanDecoder, which cannot run here: {lean_off}")
            lean = lean_off is None
            self._lean = LeanDecoder(self.model, self.compute_dtype) if lean else None
            stack.enter_context(packed_linears(self.model, self.pack_weights and not lean))
            try:
                rollouts = self._decode([prompts[p] for _, p in rows], [r for r, _ in rows], max_new_tokens,
                                        temperature, top_p, stop_strings, seed, ignore_eos,
                                        [p for _, p in rows], guide, n)
            finally:
                self._lean = None  # its packed weights go with the call
        results: list[Rollout | None] = [None] * len(rows)
        for (row_id, _), rollout in zip(rows, rollouts):
            results[row_id] = rollout
        return results

    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                cache: DynamicCache, shared: SharedKV | None = None) -> torch.Tensor:
        """(B, V) fp32 next-token logits after feeding input_ids (B, q); `shared`: K/V the rows read besides
        `cache` (decode steps only; grpo/gqa_attention.py's cascade attention)."""
        if self._lean is not None:
            return self._lean.forward(input_ids, attention_mask, position_ids, cache, shared)
        extra = {"shared_kv": shared.plan(input_ids.device)} if shared is not None else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, **self._forward_kwargs, **extra)
        return out.logits[:, -1, :].float()

    def _prefill(self, prompts: list[list[int]], max_new: int) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Feed distinct prompts: (last-position logits (U, V), their KV cache, attention mask (U, width)).

        Prompts that start alike (`prefix_groups`: a shared system prompt, instructions, few-shot examples) have
        that prefix run once per group, and only their own suffixes run on top, as vLLM's prefix caching would.
        Row layout: [pad | group prefix | pad | own suffix]; position ids count real tokens only, so the holes change
        nothing but the work done. (The KV cache is then up to the longest prefix + longest suffix wide, at most
        twice the chunk's planned prompt width.) The suffixes (whole prompts when nothing is shared) run in runs of
        similar length (`length_buckets`), stacked afterwards, so a few long ones do not pad all the others.
        """
        pad, device = self.pad_token_id, self._device()
        plain = plain_full_attention(self.model)
        # A 1-token loner would leave an all-padding row in the prefix pass; such chunks take the plain path.
        shareable = self.share_prefixes and min(map(len, prompts)) > 1 and plain
        groups = prefix_groups(prompts) if shareable else []
        prefix_cache = None
        suffixes = prompts
        if any(len(members) > 1 for _, members in groups):
            group_of = [0] * len(prompts)
            prefixes, suffixes = [], [[] for _ in prompts]
            for g, (length, members) in enumerate(groups):
                length = length if len(members) > 1 else len(prompts[members[0]]) - 1  # a loner: all but its last
                prefixes.append(prompts[members[0]][:length])
                for i in members:
                    group_of[i], suffixes[i] = g, prompts[i][length:]
            prefix_ids, prefix_mask = left_pad(prefixes, pad, device)
            prefix_cache = new_cache(self.model, prefix_ids.shape[1])
            self._logits(prefix_ids, prefix_mask, padded_positions(prefix_mask), prefix_cache)
        runs = (length_buckets([len(s) for s in suffixes], self.prefill_run_overhead) if plain
                else [range(len(suffixes))])
        room = max_new if len(runs) == 1 else 0  # several runs are stacked into a new buffer with the room
        parts = []
        for run in runs:
            ids, mask = left_pad([suffixes[i] for i in run], pad, device)
            positions = padded_positions(mask)
            if prefix_cache is None:
                cache = new_cache(self.model, ids.shape[1] + room)
            else:
                fan = torch.tensor([group_of[i] for i in run], device=device)
                cache = cache_copy_rows(prefix_cache, fan, prefix_ids.shape[1] + ids.shape[1] + room)
                positions = prefix_mask[fan].sum(-1, keepdim=True) + positions
                mask = torch.cat([prefix_mask[fan], mask], dim=1)
            parts.append((self._logits(ids, mask, positions, cache), cache, mask))
        if len(parts) == 1:
            return parts[0]
        width = max(mask.shape[1] for _, _, mask in parts)
        cache = parts[0][1]
        cache_stack(cache, [c for _, c, _ in parts[1:]], width + max_new)
        mask = parts[0][2].new_zeros(len(prompts), width)
        row = 0
        for _, _, part_mask in parts:
            mask[row:row + len(part_mask), width - part_mask.shape[1]:] = part_mask
            row += len(part_mask)
        return torch.cat([logits for logits, _, _ in parts]), cache, mask

    def _start(self, prompts: list[list[int]], rows: list[int], max_new: int, cascade: bool) -> DecodeBatch:
        """Prefill rows' prompts (equal prompts adjacent: each distinct one is prefilled once) into a batch with room
        for `max_new` more tokens per row.

        When prompts repeat (n samples each) and `cascade` holds, the prompts' K/V stay in the prefill's cache,
        stored once, and the rows' own caches start empty: decode attention reads each prompt once per step for all
        of its samples (SharedKV, grpo/gqa_attention.py). Otherwise each row gets a copy of its prompt's cache.
        """
        distinct: list[list[int]] = []
        fan_out: list[int] = []
        for p in prompts:
            if not distinct or distinct[-1] is not p:
                distinct.append(p)
            fan_out.append(len(distinct) - 1)
        samples_share = cascade and len(distinct) < len(prompts)
        logits, cache, mask = self._prefill(distinct, 0 if samples_share else max_new)
        self.stats["prefills"] += 1
        device = mask.device
        fan = torch.tensor(fan_out, device=device)
        next_pos = torch.tensor([len(p) for p in prompts], device=device)  # positions count real tokens only
        if samples_share:
            shared_mask = None if bool(mask.all()) else additive_mask(mask[:, None, None, :].bool(),
                                                                      cache.layers[0].keys.dtype)
            shared = SharedPrompts([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers],
                                   shared_mask)
            return DecodeBatch(rows, cache_empty_rows(cache, len(prompts), max_new),
                               torch.zeros(len(prompts), max_new, dtype=torch.long, device=device), 0, next_pos,
                               logits[fan], SharedKV([shared], [(0, u) for u in fan_out]))
        width = mask.shape[1]
        cache_select(cache, fan)
        mask_buf = torch.zeros(len(prompts), width + max_new, dtype=torch.long, device=device)
        mask_buf[:, :width] = mask[fan]
        return DecodeBatch(rows, cache, mask_buf, width, next_pos, logits[fan])

    def _decode(self, prompts: list[list[int]], row_ids: list[int], max_new: int, temperature: float,
                top_p: float, stop_strings: StopStrings, seed: int, ignore_eos: bool,
                prompt_index: list[int] | None = None, guide: Guide | None = None, n: int = 1) -> list[Rollout]:
        """One completion per entry of `prompts` (longest first, equal prompts adjacent); row_ids seed each row's
        RNG; `guide` is asked with each row's entry of `prompt_index`. Rows enter the running batch in order: when
        it is empty, and with `continuous` also each time finished rows are compacted out of it, so the batch stays
        full while rows wait.

        Memory policy: a KV buffer (allocated at a prefill or a join) holds rows x (width + max_new) <=
        max_batch_tokens, width being the wider of the running cache and the first waiting prompt (the widest,
        as rows wait longest first), or 1/n of that prompt when its n samples share one copy of it (cascade). Into
        an empty batch that is a fixed chunk. Joining a running batch costs more per row than a fresh chunk, since
        the running rows' generated tokens widen the left-padded cache.
        """
        self.stats = {"prefills": 0, "joins": 0, "decode_steps": 0, "row_steps": 0, "peak_rows": 0}
        preallocated = plain_full_attention(self.model)
        refill = self.continuous and preallocated  # stacking needs preallocated layers
        # Cascade attention needs the preallocated cache, the CPU kernel that returns log-sum-exps, and our
        # attention function in place (gqa_attention).
        cascade = (self.cascade_attention and self.share_prefixes and preallocated and self._device().type == "cpu"
                   and getattr(self.model.config, "_attn_implementation", None) == GQA_SDPA)
        completions: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        guided = GuidedRows(guide, prompt_index) if guide is not None else None
        generators: dict[int, torch.Generator] = {}
        batch: DecodeBatch | None = None
        queued, compacted = 0, False  # rows [queued:] are waiting
        while batch is not None or queued < len(prompts):
            take = 0
            if queued < len(prompts) and (batch is None or (refill and compacted)):
                running, width = (len(batch.rows), batch.width) if batch else (0, 0)
                # A row's share of its prompt's K/V: all of it, or 1/n of it when its n samples share one copy.
                prompt_share = -(-len(prompts[queued]) // n) if cascade and n > 1 else len(prompts[queued])
                take = min(len(prompts) - queued, rows_that_fit(running, max(width, prompt_share), max_new,
                                                                 self.max_batch_tokens))
                if running and take < min(len(prompts) - queued, int((running + take) * self.join_fraction)):
                    take = 0  # too few to be worth a join: wait until more rows finish
            if take:
                joining = list(range(queued, queued + take))
                if temperature > 0:
                    generators.update(zip(joining, row_generators(seed, row_ids[queued:queued + take])))
                # Into a running batch the prefill cache needs no room of its own: `join` copies it into one that has.
                new = self._start(prompts[queued:queued + take], joining, max_new if batch is None else 0,
                                  cascade)
                if batch is None:
                    batch = new
                else:
                    batch.join(new, max_new)
                    self.stats["joins"] += 1
                queued += take
                self.stats["peak_rows"] = max(self.stats["peak_rows"], len(batch.rows))
            tokens, token_logprobs = sample_next_tokens(
                batch.logits, temperature, top_p, [generators[r] for r in batch.rows] if temperature > 0 else None)
            if guided is not None:
                guided.force(batch.rows, batch.logits, tokens, token_logprobs, temperature)
            token_list, logprob_list = tokens.tolist(), token_logprobs.tolist()
            unfinished = []
            for b, r in enumerate(batch.rows):
                if finish[r] is not None:  # finished earlier, waiting for compaction: its sample is discarded
                    continue
                completions[r].append(token_list[b])
                logprobs[r].append(logprob_list[b])
                if not ignore_eos and token_list[b] in self.eos_token_ids:
                    finish[r] = "stop"
                else:
                    unfinished.append(r)
            if stop_strings and unfinished:
                for r, hit in zip(unfinished, stop_strings.hits([completions[r] for r in unfinished])):
                    if hit:
                        finish[r] = "stop"
            if guided is not None:
                for b, r in enumerate(batch.rows):
                    if finish[r] is None and guided.after_token(  # rows that just stopped are not guided
                            r, b, completions[r], logprobs[r], tokens, batch.logits, temperature):
                        finish[r] = "stop"
            for r in unfinished:
                if finish[r] is None and len(completions[r]) == max_new:
                    finish[r] = "length"
            live = [b for b, r in enumerate(batch.rows) if finish[r] is None]
            dead = len(batch.rows) - len(live)
            # Compaction copies the KV cache, so finished rows leave once they are compact_fraction of the batch.
            compacted = dead > 0 and dead >= max(1, int(len(batch.rows) * self.compact_fraction))
            if not live:
                batch = None
                continue
            if compacted:
                batch.keep(live)
                tokens = tokens[torch.tensor(live, device=tokens.device)]
            batch.append(tokens, self._logits)
            self.stats["decode_steps"] += 1
            self.stats["row_steps"] += len(batch.rows)

        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return [Rollout(prompt_ids=list(prompts[r]), completion_ids=completions[r], logprobs=logprobs[r],
                        finish_reason=finish[r], text=texts[r],
                        overridden=guided.overridden[r] if guided else 0) for r in range(len(prompts))]
