"""A lean Llama forward for batched serving: flattened tokens, fused projections, a slot KV cache.

Transformers' forward is written for padded `[batch, seq]` inputs and costs ~25 ms of Python and
dispatch per decode step here, more than the arithmetic. This module runs the same weights
(gpt-fast style) the way a continuous-batching step needs them:

- every token of the step (one per decoding sequence, plus chunks of prompts being prefilled) goes
  through the projections together as one `[tokens, hidden]` matrix;
- q/k/v and gate/up are fused into one matmul each; on CPU bf16 the weights are pre-packed;
- attention reads keys/values straight from the KV cache: all decode rows in one call (the C++ decode
  attention kernel on a CPU where it builds, see `cpu_kernels`; else one SDPA over the cache's slot
  span, masked to each row's length), each prefill chunk in its own SDPA;
- LoRA is added per token from adapter slots (see `adapter_slots`), so adapters mix freely; when
  every row of a step uses the same adapter and the engine has merged it (`merge_adapter`), the
  step runs on projections with the adapter folded in (W + B·A) and pays nothing for LoRA;
- a step of a few tokens, bound by reading the weights, runs on their 4-bit form where they are
  4-bit grids (the bundled Q4_1 model: see `q4`), with any adapter added per token.

It reproduces transformers' Llama numerics (RMSNorm in fp32, rotate-half RoPE from the model's own
inverse frequencies and scaling) so greedy output in fp32 matches `generate` token for token, and
rounds where transformers rounds in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from serving.engine.adapter_slots import GROUPS, AdapterPlan, AdapterSlots, GroupShape
from serving.engine.cpu_kernels import CpuKernels, DecodeAttention, load_cpu_kernels, rope
from serving.engine.kv_cache import KVCache
from serving.engine.linear import FrozenLinear
from serving.engine.q4 import Q4Weight, q4_kernel_works, rows_where_q4_pays

log = structlog.get_logger(__name__)

SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})


class UnsupportedModel(ValueError):
    """The lean forward does not know this architecture; the caller falls back to the simple engine."""


@dataclass(frozen=True)
class PrefillChunk:
    """Prompt tokens [start, start + length) of the sequence in `slot`, at `offset` in the step's tokens."""

    slot: int
    start: int
    length: int
    offset: int


@dataclass
class StepBatch:
    """One forward pass: decode tokens first (one per row, rows in ascending slot order), then prefill chunks."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    decode_slots: list[int]
    decode_lengths: list[int]  # each row's length including this token
    prefills: list[PrefillChunk]
    logits_rows: torch.Tensor  # [R] token indices whose next-token logits are wanted
    adapters: AdapterPlan = field(default_factory=AdapterPlan)


Projection = FrozenLinear | Q4Weight


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: Projection
    o: Projection
    post_norm: torch.Tensor
    gate_up: Projection
    down: Projection


def _check_supported(model: PreTrainedModel) -> None:
    config = model.config
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModel(f"model type {config.model_type!r} is not one of {sorted(SUPPORTED_MODEL_TYPES)}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedModel(f"activation {config.hidden_act!r} is not silu")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        raise UnsupportedModel("sliding-window attention is not supported by the batched engine")
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        raise UnsupportedModel("the model has no rotary embedding with inverse frequencies")
    if getattr(rotary, "rope_type", "default") not in {"default", "linear", "llama3", "yarn"}:
        raise UnsupportedModel(f"rope type {rotary.rope_type!r} changes with the length; not supported")


def _cat_bias(*modules: torch.nn.Linear) -> torch.Tensor | None:
    biases = [m.bias for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.cat(
        [
            b if b is not None else torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device)
            for b, m in zip(biases, modules, strict=True)
        ]
    ).detach()


class LeanLlama:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_positions: int,
        batch_hint: int = 32,
        q4_small_steps: bool = True,
        q4_max_rows: int | None = None,
        cpu_kernels: bool = True,
    ) -> None:
        """`q4_small_steps`: give projections that are 4-bit grids a 4-bit copy for steps of up to
        `q4_max_rows` tokens (None: the most rows for which it is faster on this CPU, timed here).
        `cpu_kernels`: on a CPU, decode attention, LoRA, the residual add + RMSNorm, and RoPE with the
        decode rows' KV writes by the engine's C++ kernels where they build and agree with PyTorch
        (`cpu_kernels`)."""
        _check_supported(model)
        config = model.config
        self.device = model.device
        self.dtype = model.dtype
        self.hidden = config.hidden_size
        self.q_heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.eps = config.rms_norm_eps
        self.intermediate = config.intermediate_size
        self.num_layers = config.num_hidden_layers
        self.scale = self.head_dim**-0.5
        self.kernels = load_cpu_kernels() if cpu_kernels and self.device.type == "cpu" else CpuKernels()
        attention = self.kernels.attention
        fits = attention is not None and attention.supports(self.q_heads, self.kv_heads, self.head_dim)
        self.attention_kernel = attention if fits else None
        rope_store = self.kernels.rope
        self.rope_kernel = rope_store if rope_store is not None and rope_store.supports(self.head_dim) else None
        self.merged_slot: int | None = None  # the adapter slot folded into `merged_layers`
        self.merged_layers: list[_Layer] = []
        self._batch_hint = batch_hint
        with torch.no_grad():
            self.embed = model.model.embed_tokens.weight.detach()
            self.layers = []
            # The unpacked fused weights stay with the model's own parameters (no copy): merging reads them.
            self._sources: list[dict[str, list[torch.Tensor]]] = []
            for layer in model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                qkv = (attn.q_proj, attn.k_proj, attn.v_proj)
                members = {"qkv": qkv, "o": (attn.o_proj,), "gate_up": (mlp.gate_proj, mlp.up_proj)}
                members["down"] = (mlp.down_proj,)
                self._sources.append({g: [m.weight.detach() for m in ms] for g, ms in members.items()})
                self.layers.append(
                    _Layer(
                        input_norm=layer.input_layernorm.weight.detach(),
                        qkv=FrozenLinear(torch.cat([m.weight for m in qkv]), _cat_bias(*qkv), batch_hint=batch_hint),
                        o=FrozenLinear(attn.o_proj.weight.detach(), attn.o_proj.bias, batch_hint=batch_hint),
                        post_norm=layer.post_attention_layernorm.weight.detach(),
                        gate_up=FrozenLinear(
                            torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                            _cat_bias(mlp.gate_proj, mlp.up_proj),
                            batch_hint=batch_hint,
                        ),
                        down=FrozenLinear(mlp.down_proj.weight.detach(), mlp.down_proj.bias, batch_hint=batch_hint),
                    )
                )
            self.norm = model.model.norm.weight.detach()
            # Steps of up to `q4_rows` tokens run on `q4_layers` (see `q4`): 0 when the weights are not 4-bit grids.
            self.q4_layers: list[_Layer] = []
            self.q4_rows = 0
            if q4_small_steps:
                self._build_q4_layers(q4_max_rows)
            self.lm_head = FrozenLinear(model.lm_head.weight.detach(), model.lm_head.bias, batch_hint=batch_hint)
            # cos/sin for every position, computed like transformers (fp32, then the model dtype).
            rotary = model.model.rotary_emb
            inv_freq = rotary.inv_freq.to(device=self.device, dtype=torch.float32)
            freqs = torch.outer(torch.arange(max_positions, device=self.device, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            scaling = float(getattr(rotary, "attention_scaling", 1.0))
            self.cos = (emb.cos() * scaling).to(self.dtype)  # [P, D]
            # rotate_half(x) * sin == flip-halves(x) * (sin with its first half negated)
            sin = (emb.sin() * scaling).to(self.dtype)
            half = self.head_dim // 2
            self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.max_positions = max_positions

    def _build_q4_layers(self, max_rows: int | None) -> None:
        if self.device.type != "cpu" or self.dtype != torch.bfloat16 or not q4_kernel_works():
            return
        layers, dense, q4, widths = [], [], [], []
        for layer, sources in zip(self.layers, self._sources, strict=True):
            projections = {}
            for group in GROUPS:
                base: FrozenLinear = getattr(layer, group)
                four_bit = Q4Weight.from_grid(torch.cat(sources[group]), base.bias)
                projections[group] = four_bit or base
                if four_bit is not None:
                    dense.append(base)
                    q4.append(four_bit)
                    widths.append(base.in_features)
            layers.append(_Layer(input_norm=layer.input_norm, post_norm=layer.post_norm, **projections))
        if not q4:
            return
        self.q4_rows = rows_where_q4_pays(dense, q4, widths) if max_rows is None else max_rows
        log.info(
            "4-bit projections for small steps",
            projections=f"{len(q4)} of {len(self.layers) * len(GROUPS)}",
            max_rows=self.q4_rows,
        )
        if self.q4_rows:
            self.q4_layers = layers

    def group_shapes(self) -> dict[str, GroupShape]:
        kv = self.kv_heads * self.head_dim
        return {
            "qkv": GroupShape(self.hidden, (self.q_heads * self.head_dim, kv, kv)),
            "o": GroupShape(self.q_heads * self.head_dim, (self.hidden,)),
            "gate_up": GroupShape(self.hidden, (self.intermediate, self.intermediate)),
            "down": GroupShape(self.intermediate, (self.hidden,)),
        }

    def new_cache(self, *, slots: int, capacity: int) -> KVCache:
        return KVCache(
            layers=self.num_layers,
            kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            slots=slots,
            capacity=capacity,
            dtype=self.dtype,
            device=self.device,
        )

    def new_adapter_slots(self, *, num_slots: int, max_rank: int) -> AdapterSlots:
        return AdapterSlots(
            layers=self.num_layers,
            shapes=self.group_shapes(),
            num_slots=num_slots,
            max_rank=max_rank,
            dtype=self.dtype,
            device=self.device,
            kernel=self.kernels.lora,
        )

    # -- a merged adapter ------------------------------------------------------------------------
    @torch.no_grad()
    def build_merged(self, slot: int, adapters: AdapterSlots) -> list[_Layer]:
        """Layers whose projections have the adapter in `slot` folded in (W + B·A, summed in fp32).

        Reads only the model's weights and the slot: safe on another thread while steps run.
        Costs one extra copy of the projections the adapter touches; untouched groups share the base's.
        """
        merged = []
        for i, (layer, sources) in enumerate(zip(self.layers, self._sources, strict=True)):
            projections = {}
            for group in GROUPS:
                base: FrozenLinear = getattr(layer, group)
                lora = adapters.factors(group, i, slot)  # B [out, r], A [r, in] in fp32; None: group untouched
                if lora is None:
                    projections[group] = base
                    continue
                weight = torch.cat(sources[group]).float().addmm_(*lora).to(self.dtype)
                projections[group] = FrozenLinear(weight, base.bias, batch_hint=self._batch_hint)
            merged.append(_Layer(input_norm=layer.input_norm, post_norm=layer.post_norm, **projections))
        return merged

    def use_merged(self, slot: int, layers: list[_Layer]) -> None:
        """From now on, steps whose rows all use `slot` run on `layers` (from `build_merged`)."""
        self.merged_layers, self.merged_slot = layers, slot

    def merge_adapter(self, slot: int, adapters: AdapterSlots) -> None:
        self.drop_merged()  # free the old copy before building the new one
        self.use_merged(slot, self.build_merged(slot, adapters))

    def drop_merged(self) -> None:
        self.merged_layers, self.merged_slot = [], None

    # -- the step -------------------------------------------------------------------------------
    def _add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
        """x += delta (the residual, in place), then `_rms_norm(x, weight)`: one kernel call where it builds."""
        if self.kernels.norm is not None:
            return self.kernels.norm(x, delta, weight, self.eps)
        if delta is not None:
            x.add_(delta)
        return self._rms_norm(x, weight)

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Exactly transformers' LlamaRMSNorm: normalise in fp32, round to the model dtype, then scale.
        # Scaling before the rounding (one rounding fewer) drifted enough on an AMX CPU in bf16 that the
        # bundled model answered "What is the capital of France?" with "L'Étoile, la Marseillaise, ...".
        return F.rms_norm(x, (self.hidden,), None, self.eps) * weight

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: KVCache, adapters: AdapterSlots) -> torch.Tensor:
        """Run one step; returns logits [R, vocab] for `batch.logits_rows`, in the model's dtype.

        Not widened to fp32 here: bf16 -> fp32 is exact, so greedy rows take their argmax on the bf16 values
        (the same token; 1.6 ms against 3.5 for widening and then the max at 32 rows of a 49,152-token
        vocabulary on a 2-core EPYC), and sampled rows are widened one at a time by `sample_token`."""
        tokens = batch.token_ids.shape[0]
        n_dec = len(batch.decode_slots)
        x = F.embedding(batch.token_ids, self.embed)  # [T, hidden]
        decode = _DecodeView.build(batch, cache, self.device, self.attention_kernel) if n_dec else None
        if self.rope_kernel is None:
            cos = self.cos[batch.positions].unsqueeze(1)  # [T, 1, D]
            sin = self.sin_signed[batch.positions].unsqueeze(1)
        else:  # which rows' keys and values the kernel stores, and where
            no_rows = torch.empty(0, dtype=torch.long)
            stores = (decode.slots, decode.write_positions) if decode is not None else (no_rows, no_rows)
        heads = (self.q_heads, self.kv_heads)
        prefill_masks = [_prefill_mask(chunk, self.device) for chunk in batch.prefills]
        plan = batch.adapters
        layers = self.layers
        if tokens <= self.q4_rows:
            # Fewer bytes beat folding the adapter in: a merged copy is no 4-bit grid, so LoRA goes per row.
            layers = self.q4_layers
        elif plan.single is not None and plan.single == self.merged_slot:
            layers, plan = self.merged_layers, AdapterPlan()  # the adapter is in the weights
        q_dim, kv_dim = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        h = self._add_rms_norm(x, None, layers[0].input_norm)
        for i, layer in enumerate(layers):
            qkv = layer.qkv(h)  # [T, q + 2 kv]
            adapters.apply(plan, "qkv", i, h, qkv)
            k_cache, v_cache = cache.k[i], cache.v[i]
            qk = qkv[:, : q_dim + kv_dim].view(tokens, self.q_heads + self.kv_heads, self.head_dim)
            if self.rope_kernel is not None:  # rotates q and k in place and stores the decode rows' k and v
                self.rope_kernel(qkv, batch.positions, self.cos, self.sin_signed, heads, k_cache, v_cache, *stores)
            else:
                qk = rope(qk, cos, sin)
            q, k = qk[:, : self.q_heads], qk[:, self.q_heads :]  # [T, Hq, D], [T, Hkv, D]
            v = qkv[:, q_dim + kv_dim :].view(tokens, self.kv_heads, self.head_dim)
            parts = []
            if decode is not None:
                if self.rope_kernel is None:
                    decode.write(k_cache, k[:n_dec])
                    decode.write(v_cache, v[:n_dec])
                parts.append(decode.attend(q[:n_dec], k_cache, v_cache, self.scale))
            for chunk, mask in zip(batch.prefills, prefill_masks, strict=True):
                rows = slice(chunk.offset, chunk.offset + chunk.length)
                end = chunk.start + chunk.length
                k_cache[chunk.slot, :, chunk.start : end] = k[rows].transpose(0, 1)
                v_cache[chunk.slot, :, chunk.start : end] = v[rows].transpose(0, 1)
                out = F.scaled_dot_product_attention(
                    q[rows].transpose(0, 1).unsqueeze(0),  # [1, Hq, t, D]
                    k_cache[chunk.slot : chunk.slot + 1, :, :end],
                    v_cache[chunk.slot : chunk.slot + 1, :, :end],
                    attn_mask=mask,
                    is_causal=mask is None,
                    scale=self.scale,
                    enable_gqa=True,
                )
                parts.append(out[0].transpose(0, 1).reshape(chunk.length, q_dim))
            attn = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, q_dim]
            o = layer.o(attn)
            adapters.apply(plan, "o", i, attn, o)
            h = self._add_rms_norm(x, o, layer.post_norm)  # x += o
            gate_up = layer.gate_up(h)  # [T, 2 * intermediate]
            adapters.apply(plan, "gate_up", i, h, gate_up)
            act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
            down = layer.down(act)
            adapters.apply(plan, "down", i, act, down)
            if i + 1 < len(layers):
                h = self._add_rms_norm(x, down, layers[i + 1].input_norm)  # x += down
            else:
                x.add_(down)
        x = self._add_rms_norm(x.index_select(0, batch.logits_rows), None, self.norm)
        return self.lm_head(x)


@dataclass
class _DecodeView:
    """Per-step tensors for the decode rows' attention over the cache.

    With the C++ kernel (`cpu_kernels`), each row reads its own slot's first `length` positions and
    nothing else: ~6 ms of a 32-row step here against ~15 ms for SDPA. Without it: with one query
    token per row, SDPA's CPU kernel (and its `enable_gqa` path) spends its time on per-head blocks of
    one query: ~2.5 ms per layer at 32 rows. Folding each KV head's group of query heads into the query
    length (`[S, Hkv, G, D]` against `[S, Hkv, L, D]`) gives the same attention as G-row blocks: ~0.5 ms
    at 32 rows, 40 us at one; that path reads the span of slots up to the longest row, masked.
    New keys/values go in with one `index_copy_` into the flattened cache instead of an advanced-index
    assignment (~10x cheaper).
    """

    slots: torch.Tensor  # [B]
    write_index: torch.Tensor  # [B * Hkv] rows of the flattened cache `[slots * Hkv * capacity, D]`
    span: int
    length: int
    dense: bool  # rows are exactly slots 0..span-1, so no scatter is needed
    mask: torch.Tensor | None  # [span, 1, 1, length] 0 where a row may attend, -inf elsewhere (SDPA only)
    lengths: torch.Tensor  # [B] each row's positions, this token's included
    write_positions: torch.Tensor  # [B] where each row's new key and value go: lengths - 1
    kernel: DecodeAttention | None

    @classmethod
    def build(
        cls, batch: StepBatch, cache: KVCache, device: torch.device, kernel: DecodeAttention | None = None
    ) -> _DecodeView:
        slots, lengths = batch.decode_slots, batch.decode_lengths
        span, length = max(slots) + 1, max(lengths)
        slot_t, length_t = torch.tensor(slots), torch.tensor(lengths)
        mask = None
        if kernel is None:  # SDPA reads the whole span up to the longest row: those positions must be finite
            cache.ensure_finite(span, length)
            allowed = torch.ones(span, dtype=torch.long)  # slots without a decode row attend to position 0 only
            allowed[slots] = length_t
            # Additive (0 / -inf) in the cache's dtype, built once a step: a boolean mask is converted by
            # every layer's attention call.
            mask = torch.zeros(span, length, dtype=cache.dtype)
            mask.masked_fill_(torch.arange(length)[None, :] >= allowed[:, None], float("-inf"))
            mask = mask.to(device)[:, None, None, :]
        heads = cache.kv_heads
        write = (slot_t[:, None] * heads + torch.arange(heads)[None, :]) * cache.capacity
        write += length_t[:, None] - 1
        return cls(
            slots=slot_t.to(device),
            write_index=write.reshape(-1).to(device),
            span=span,
            length=length,
            dense=span == len(slots),
            mask=mask,
            lengths=length_t,
            write_positions=length_t - 1,
            kernel=kernel,
        )

    def write(self, cache_layer: torch.Tensor, new: torch.Tensor) -> None:
        """cache_layer: [slots, Hkv, capacity, D]; new: [B, Hkv, D]."""
        cache_layer.view(-1, new.shape[-1]).index_copy_(0, self.write_index, new.reshape(-1, new.shape[-1]))

    def attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float) -> torch.Tensor:
        """q: [B, Hq, D] -> [B, Hq * D]."""
        if self.kernel is not None:
            return self.kernel(q, k_cache, v_cache, self.slots, self.lengths, scale)
        rows, heads, dim = q.shape
        kv_heads = k_cache.shape[1]
        q = q.view(rows, kv_heads, heads // kv_heads, dim)  # [B, Hkv, G, D]: query head h reads KV head h // G
        if not self.dense:
            full = q.new_zeros(self.span, kv_heads, heads // kv_heads, dim)
            full[self.slots] = q
            q = full
        out = F.scaled_dot_product_attention(
            q,
            k_cache[: self.span, :, : self.length],  # [S, Hkv, L, D]
            v_cache[: self.span, :, : self.length],
            attn_mask=self.mask,
            scale=scale,
        )  # [S, Hkv, G, D]
        if not self.dense:
            out = out[self.slots]
        return out.reshape(rows, heads * dim)


def _prefill_mask(chunk: PrefillChunk, device: torch.device) -> torch.Tensor | None:
    """Causal mask of a chunk that follows `start` cached positions; None when plain causal applies."""
    if chunk.start == 0:
        return None
    end = chunk.start + chunk.length
    rows = torch.arange(chunk.start, end)[:, None]
    return (torch.arange(end)[None, :] <= rows).to(device)
