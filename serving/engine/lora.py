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
        if weights.rank > self.max_rank:
            raise AdapterRejected(f"rank {weights.rank} exceeds the serving limit {self.max_rank}")
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.tensors.items():
            # base_model.model.<module path>.lora_A.weight  (PEFT's saved layout)
            stem, _, kind = key.removesuffix(".weight").rpartition(".")
            module = stem.removeprefix("base_model.model.")
            if kind not in {"lora_A", "lora_B"} or module not in self.layers:
                raise AdapterRejected(f"adapter tensor {key!r} matches no servable layer of this base model")
            pairs.setdefault(module, {})[kind] = tensor
        for module, pair in pairs.items():  # check everything before touching the slot
            if set(pair) != {"lora_A", "lora_B"}:
                raise AdapterRejected(f"layer {module} has only {sorted(pair)}")
            layer = self.layers[module]
            a, b = pair["lora_A"], pair["lora_B"]  # [r, in], [out, r]
            if a.shape != (weights.rank, layer.base.in_features) or b.shape != (layer.base.out_features, weights.rank):
                raise AdapterRejected(f"layer {module}: shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit the model")
        self.clear(slot)
        for module, pair in pairs.items():
            layer = self.layers[module]
            a, b = pair["lora_A"], pair["lora_B"]
            layer.lora_a[slot, : weights.rank].copy_(a)
            layer.lora_b[slot, :, : weights.rank].copy_(b * weights.scaling)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.lora_a[slot].zero_()
            layer.lora_b[slot].zero_()
