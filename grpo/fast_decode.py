"""LeanDecoder: TorchEngine's forward for Llama-family models on CPU, without transformers' modules.

Why: a decode step feeds one token per row, so each layer is a chain of small ops, and on 2 CPU cores the per-op
cost of transformers' modules (mask building, rotary per layer, separate q/k/v and gate/up projections, the
attention-interface dispatch) adds up to a fifth of the step. This forward computes the same function in fewer ops:
  - q, k and v come from one matmul of a packed [Wq; Wk; Wv], gate and up from one of [Wg; Wu]: 121 oneDNN calls
    per forward instead of 211, each streaming a wider panel (~10% less time in the linears at 8-32 rows);
  - rotary embeddings are computed once per forward (by the model's own `rotary_emb`, so any rope scaling it has)
    and applied to q and k together; the padding mask becomes additive once per forward, not once per layer;
  - K/V go straight into the PreallocatedLayer buffers; a one-token step folds each K/V head's query group into
    the query axis for the CPU flash kernel (as grpo/gqa_attention.py does) or runs cascade attention over shared
    prompt K/V (`SharedKV`), on one thread when a layer's K/V is small (`ONE_THREAD_ATTENTION_BYTES`); a prefill
    runs SDPA with a causal + padding mask.
It reads and writes the cache transformers' forward uses, so both paths interleave freely.

Supported (`unsupported_reason` says why not otherwise; the engine then keeps transformers' forward):
`LlamaForCausalLM`, `Qwen2ForCausalLM` and `MistralForCausalLM` without sliding window, q/k/v and o biases
included, SiLU MLP, weights of one dtype on CPU, computing in fp32 or, where oneDNN has bf16 kernels, in bf16 (as
weights or as converted copies: `LeanDecoder(model, dtype)`). Results equal transformers' forward up to summation
order in the compute dtype (tests/test_fast_decode.py). bf16 pays where the CPU does bf16 natively (AMX or
AVX512-BF16): on a 2-core Xeon with AMX it decodes SmolLM2-135M 1.5-1.6x faster than fp32 (weights and K/V are
half the bytes, and a decode step is bound by reading them; bench/generation.py --compute_dtypes bfloat16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from grpo import gqa_attention
from grpo.gqa_attention import additive_mask
from grpo.kv_cache import plain_full_attention
from grpo.packed_linear import pack_weight, packable_dtypes, packed_matmul, packing_available

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

# A one-token step's attention runs on one thread when it reads less K/V than this in a layer: waking the second
# OpenMP thread (~40 us under OMP_WAIT_POLICY=PASSIVE) then costs more than splitting the reads saves. On the 2-core
# Xeon (30 layers' K/V cycled, one elementwise op between calls) one and two threads break even at ~1.5 MB in bf16
# and fp32 alike (8-32 rows); below it one thread is up to 40% faster (8 rows x 64 tokens, bf16: 69 vs 113 us).
# A GRPO step's rollouts at the NER shape (2 prompts x G 8 in bf16) then generate in 5.20 s instead of 5.71.
ONE_THREAD_ATTENTION_BYTES = 3 << 19


def _cat_bias(*linears: nn.Linear) -> torch.Tensor | None:
    """The biases of linears whose outputs are concatenated: None when none has one (zeros stand in for a missing
    one otherwise)."""
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])


@dataclass
class _Layer:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor
    norm_in: torch.Tensor
    norm_post: torch.Tensor
    eps: float


def unsupported_reason(model: nn.Module, dtype: torch.dtype | None = None) -> str | None:
    """Why `LeanDecoder` cannot run this model computing in `dtype` (None: the weights' own), or None when it can."""
    config = getattr(model, "config", None)
    arch = type(model).__name__
    if not any(cls.__name__ in ARCHITECTURES for cls in type(model).__mro__):  # FSDP2 subclasses the model's class
        return f"architecture {arch} (supported: {', '.join(ARCHITECTURES)})"
    if not packing_available():
        return "this torch build has no oneDNN prepacked linear"
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params):
        return "weights are not all on CPU"
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        return f"weights of several dtypes ({', '.join(sorted(map(_name, dtypes)))})"
    compute = dtype or dtypes.pop()
    if compute not in packable_dtypes():
        return (f"no oneDNN {_name(compute)} matmul on this CPU (it packs "
                f"{', '.join(map(_name, packable_dtypes()))})")
    if not plain_full_attention(model):
        return "the model's cache is not plain full attention (sliding window?)"
    if getattr(config, "hidden_act", None) != "silu" or getattr(config, "mlp_bias", False):
        return f"MLP activation {getattr(config, 'hidden_act', None)!r} or MLP bias"
    for layer in model.model.layers:
        attn = layer.self_attn
        if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
            return "per-head q/k norms"
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj,
                   layer.mlp.down_proj)
        if any(type(lin) is not nn.Linear for lin in linears):
            return "a projection is not a plain nn.Linear (LoRA, quantised?)"
    if type(model.lm_head) is not nn.Linear or model.lm_head.bias is not None:
        return "lm_head is not a plain bias-free nn.Linear"
    return None


class LeanDecoder:
    """The model's forward (prefills and one-token steps) over TorchEngine's cache, with weights packed at
    construction (see the module docstring). Build it where the weights will not change while it lives: TorchEngine
    builds one per generate call.

    dtype: the compute dtype (None: the weights' own). Another dtype packs converted copies of the weights, so an
    fp32 model can decode in bf16 (half the bytes per step) while it trains in fp32; activations and the KV cache
    are then bf16 as well, exactly as if the model had been loaded in bf16.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        reason = unsupported_reason(model, dtype)
        if reason is not None:
            raise ValueError(f"LeanDecoder cannot run this model: {reason}")
        config = model.config
        self.dtype = dtype or model.lm_head.weight.dtype

        def own(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(self.dtype)

        def packed(*linears: nn.Linear) -> torch.Tensor:
            return pack_weight(torch.cat([own(lin.weight) for lin in linears]))

        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embed = model.model.embed_tokens  # looked up in its own dtype, then converted: no copy of the table
        self.rotary = model.model.rotary_emb
        self.final_norm = (own(model.model.norm.weight), model.model.norm.variance_epsilon)
        self.head = packed(model.lm_head)
        self.scaling = model.model.layers[0].self_attn.scaling
        self.one_thread_small_matmuls = self.dtype == torch.bfloat16 and _has_amx()
        self.layers = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(_Layer(
                qkv=packed(attn.q_proj, attn.k_proj, attn.v_proj),
                qkv_bias=own(_cat_bias(attn.q_proj, attn.k_proj, attn.v_proj)),
                o=packed(attn.o_proj),
                o_bias=own(attn.o_proj.bias),
                gate_up=packed(mlp.gate_proj, mlp.up_proj),
                down=packed(mlp.down_proj),
                norm_in=own(layer.input_layernorm.weight),
                norm_post=own(layer.post_attention_layernorm.weight),
                eps=layer.input_layernorm.variance_epsilon))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache,
                shared=None) -> torch.Tensor:
        """Feed q tokens per row and return the last position's (B, V) fp32 next-token logits.

        input_ids (B, q); attention_mask (B, W), 1 = real token, the q new tokens' columns last (W - q columns are
        in `cache` already: TorchEngine's DynamicCache of PreallocatedLayers, appended to here); position_ids (B, q);
        shared: SharedKV or None (one-token steps only: cascade attention over prompts stored once).
        """
        q = input_ids.shape[1]
        # A one-token step's elementwise ops (norms, rotary, SiLU, residuals) are too small to repay waking a second
        # thread (~40 us per op with OMP_WAIT_POLICY=PASSIVE: an RMSNorm over 64 rows takes 220 us on 2 threads and
        # 22 on one), so they run on one; matmuls and attention get every thread (`wide`).
        threads = torch.get_num_threads()
        torch.set_num_threads(1 if q == 1 else threads)
        try:
            return self._forward(input_ids, attention_mask, position_ids, cache, shared, threads)
        finally:
            torch.set_num_threads(threads)

    def _forward(self, input_ids, attention_mask, position_ids, cache, shared, threads: int) -> torch.Tensor:
        b, q = input_ids.shape
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        few = torch.get_num_threads()

        def wide(op, *args, **kwargs):
            torch.set_num_threads(threads)
            try:
                return op(*args, **kwargs)
            finally:
                torch.set_num_threads(few)

        # bf16 on AMX: a one-token step's q/k/v, o and down matmuls (0.7-1.8 MB of weights each) run faster on one
        # thread than split over two (8 rows: 54 -> 48 ms a step on a 2-core Xeon; in fp32 one thread is slower:
        # 72 -> 75 ms).
        small = _on_this_thread if q == 1 and self.one_thread_small_matmuls else wide
        attend = wide  # a one-token step's attention: see ONE_THREAD_ATTENTION_BYTES
        hidden = self.embed(input_ids).to(self.dtype)                             # (B, q, E)
        cos, sin = (t[:, :, None] for t in self.rotary(hidden, position_ids))   # (B, q, 1, D)
        mask = _additive_mask(attention_mask, q, hidden.dtype)
        plan = shared.plan(input_ids.device) if shared is not None else None
        for index, (layer, kv) in enumerate(zip(self.layers, cache.layers)):
            x = F.rms_norm(hidden, (hidden.shape[-1],), layer.norm_in, layer.eps)
            qkv = small(packed_matmul, x, layer.qkv, layer.qkv_bias)                    # (B, q, (H + 2 Hkv) D)
            qk = qkv[..., :(h + hkv) * d].view(b, q, h + hkv, d)
            qk = qk * cos + _rotate_half(qk) * sin                                # rotary on q and k at once
            keys, values = kv.update(qk[:, :, h:].transpose(1, 2),
                                     qkv[..., (h + hkv) * d:].view(b, q, hkv, d).transpose(1, 2))
            if q == 1:
                # Fold each K/V head's query group into the query axis (query head j * groups + g reads K/V head
                # j, as in transformers' repeat_kv): every K/V head is read once for its whole group.
                folded = qk[:, 0, :h].reshape(b, hkv, h // hkv, d)
                if index == 0 and _attention_bytes(keys, plan) < ONE_THREAD_ATTENTION_BYTES:
                    attend = _on_this_thread  # every layer reads as many K/V bytes as the first
                if plan is not None:
                    out = attend(gqa_attention.cascade_attention, index, folded, keys, values, mask, self.scaling,
                                 plan)
                else:
                    out = attend(_flash, folded, keys, values, attn_mask=mask, scale=self.scaling)[0]
            else:
                out = F.scaled_dot_product_attention(qk[:, :, :h].transpose(1, 2), keys, values, attn_mask=mask,
                                                     scale=self.scaling, enable_gqa=True).transpose(1, 2)
            hidden = hidden + small(packed_matmul, out.reshape(b, q, h * d), layer.o, layer.o_bias)
            x = F.rms_norm(hidden, (hidden.shape[-1],), layer.norm_post, layer.eps)
            gate_up = wide(packed_matmul, x, layer.gate_up, None)
            inner = gate_up.shape[-1] // 2
            hidden = hidden + small(packed_matmul, F.silu(gate_up[..., :inner]) * gate_up[..., inner:], layer.down,
                                   None)
        last = F.rms_norm(hidden[:, -1], (hidden.shape[-1],), *self.final_norm)
        return wide(packed_matmul, last, self.head, None).float()


def _on_this_thread(op, *args, **kwargs):
    return op(*args, **kwargs)


def _attention_bytes(keys: torch.Tensor, plan) -> int:
    """Bytes of K and V a one-token step's attention reads in one layer: the rows' own caches plus, under cascade
    attention, each shared prompt block's."""
    shared = sum(block.keys[0].numel() for block, *_ in plan) if plan else 0
    return 2 * (keys.numel() + shared) * keys.element_size()


def _has_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check is not None and check())


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _additive_mask(attention_mask: torch.Tensor, q: int, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, W) 1/0 padding mask, the q newest columns being the fed tokens -> (B, 1, q, W) additive mask (0 / -inf):
    fed token i sees the real columns up to its own (causal). A padding token sees itself too, so no softmax row is
    empty (its output is never read, and finite). None when nothing is masked."""
    b, width = attention_mask.shape
    real = attention_mask.bool()
    if q == 1:
        return None if bool(real.all()) else additive_mask(real[:, None, None, :], dtype)
    columns = torch.arange(width, device=real.device)
    own = (width - q) + torch.arange(q, device=real.device)
    allowed = (real[:, None, :] & (columns[None, None, :] <= own[None, :, None])) | \
        (columns[None, None, :] == own[None, :, None])
    return additive_mask(allowed[:, None], dtype)

