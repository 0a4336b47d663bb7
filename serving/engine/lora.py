"""Per-row LoRA: rows of one forward pass may each use a different adapter (or none).

Every targeted `nn.Linear` of the base model is wrapped by `SlotLoRALinear`, which holds the A/B
matrices of all loaded adapters in fixed slots (`[slots, rank, in]`, `[slots, out, rank]`). A batch
carries one slot index per row; the wrapper gathers each row's matrices and applies them with two
batched matmuls — the BGMV idea of Punica/S-LoRA, in plain PyTorch. Slot 0 is all zeros: the base
model. Smaller ranks are zero-padded to the slot rank, which leaves the product unchanged.

Nothing here is global: the engine sets `RowAdapters.slots` before a forward pass on its own thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from serving.adapters.store import AdapterRejected, LoRAWeights

SERVABLE_MODULES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
BASE_SLOT = 0


@dataclass
class RowAdapters:
    """Which slot each row of the next forward pass uses: None = all base, an int = one slot for all."""

    slots: torch.Tensor | int | None = None


class SlotLoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, num_slots: int, max_rank: int, rows: RowAdapters) -> None:
        super().__init__()
        self.base = base
        self.rows = rows
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, base.in_features, **factory))
        self.register_buffer("lora_b", torch.zeros(num_slots, base.out_features, max_rank, **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, T, in]
        y = self.base(x)
        slots = self.rows.slots
        if slots is None or (isinstance(slots, int) and slots == BASE_SLOT):
            return y
        if isinstance(slots, int):
            return y + (x @ self.lora_a[slots].T) @ self.lora_b[slots].T
        a = self.lora_a[slots]  # [B, r, in]
        b = self.lora_b[slots]  # [B, out, r]
        return y + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class LoRASlots:
    """The slot table of one model: inject wrappers once, then fill and clear slots."""

    def __init__(self, model: nn.Module, *, num_slots: int, max_rank: int) -> None:
        self.rows = RowAdapters()
        self.max_rank = max_rank
        self.num_slots = num_slots + 1  # plus the base slot
        self.layers: dict[str, SlotLoRALinear] = {}
        for name, module in list(model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in SERVABLE_MODULES and isinstance(module, nn.Linear):
                wrapper = SlotLoRALinear(module, self.num_slots, max_rank, self.rows)
                parent = model.get_submodule(name.rsplit(".", 1)[0])
                setattr(parent, leaf, wrapper)
                self.layers[name] = wrapper
        if not self.layers:
            raise ValueError("the base model has no projection layers that LoRA can target")

    @torch.no_grad()
    def fill(self, slot: int, weights: LoRAWeights) -> None:
        """Copy an adapter into a slot (scaling folded into B); unknown keys reject the adapter."""
        if not BASE_SLOT < slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range")
        shapes = {name: (layer.base.in_features, layer.base.out_features) for name, layer in self.layers.items()}
        pairs = lora_pairs(weights, shapes, self.max_rank)
        self.clear(slot)
        for module, (a, b) in pairs.items():
            layer = self.layers[module]
            layer.lora_a[slot, : weights.rank].copy_(a)
            layer.lora_b[slot, :, : weights.rank].copy_(b * weights.scaling)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.lora_a[slot].zero_()
            layer.lora_b[slot].zero_()


def lora_pairs(
    weights: LoRAWeights, shapes: dict[str, tuple[int, int]], max_rank: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Check an adapter against a model's layers and pair its tensors: {module path: (A [r, in], B [out, r])}.

    `shapes` maps each servable module path (`model.layers.0.self_attn.q_proj`) to (in, out) features.
    Everything is checked before anything is copied, so a bad adapter never half-fills a slot.
    """
    if weights.rank > max_rank:
        raise AdapterRejected(f"rank {weights.rank} exceeds the serving limit {max_rank}")
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.tensors.items():
        # base_model.model.<module path>.lora_A.weight  (PEFT's saved layout)
        stem, _, kind = key.removesuffix(".weight").rpartition(".")
        module = stem.removeprefix("base_model.model.")
        if kind not in {"lora_A", "lora_B"} or module not in shapes:
            raise AdapterRejected(f"adapter tensor {key!r} matches no servable layer of this base model")
        found.setdefault(module, {})[kind] = tensor
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for module, pair in found.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise AdapterRejected(f"layer {module} has only {sorted(pair)}")
        a, b = pair["lora_A"], pair["lora_B"]
        in_features, out_features = shapes[module]
        if a.shape != (weights.rank, in_features) or b.shape != (out_features, weights.rank):
            raise AdapterRejected(f"layer {module}: shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit the model")
        pairs[module] = (a, b)
    return pairs
