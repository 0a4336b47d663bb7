"""LoRA for the batched engine: adapters in fixed slots, applied per token in one forward pass.

The lean model fuses projections that read the same input (q/k/v, gate/up), so LoRA is stored per
fused group: A of the group's members stacked along the rank (`[slots, members * r, in]`) and B as
the matching block diagonal (`[out, slots, members * r]`, out-major so every slot range is a view).
Scaling is folded into B. Slot 0 is the base model and stays zero.

Per step, tokens fall in one of three cases (chosen once per step, see `plan`):
- no token uses an adapter: nothing to do;
- every token uses the same slot: two thin matmuls, `y += (x @ A.T) @ B.T`;
- mixed: all slots in the batch's slot range at once, `y += ((x @ A_range.T) * mask) @ B_range.T`,
  where the mask keeps, for each token, only the rank columns of its own slot. That is the
  BGMV/SGMV idea (Punica, S-LoRA) as three dense calls: no per-row gather of weights, no Python
  loop over adapters, so eight adapters cost little more than one.
The slot rank grows to the largest loaded adapter's rank (up to the configured maximum), so rank
16 adapters do not pay for a rank 32 limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from serving.adapters.store import LoRAWeights
from serving.engine.lora import BASE_SLOT, lora_pairs

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


@dataclass(frozen=True)
class GroupShape:
    in_features: int
    outs: tuple[int, ...]  # output features of each member, in GROUPS order

    @property
    def out_features(self) -> int:
        return sum(self.outs)


@dataclass
class AdapterPlan:
    """How this step applies LoRA: `single` slot for all tokens, or `mixed` with a slot range and masks."""

    single: int | None = None
    lo: int = 0
    hi: int = 0  # slot range [lo, hi) for the mixed case
    masks: dict[int, torch.Tensor] | None = None  # members -> [tokens, (hi - lo) * members * r]
    groups: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self.groups) and (self.single is not None or self.masks is not None)


class AdapterSlots:
    def __init__(
        self,
        *,
        layers: int,
        shapes: dict[str, GroupShape],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers = layers
        self.shapes = shapes
        self.num_slots = num_slots + 1  # plus the base slot
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.rank = 0  # current slot rank; buffers are allocated on the first load
        self.a: dict[str, list[torch.Tensor]] = {}
        self.b: dict[str, list[torch.Tensor]] = {}
        self._groups_of: dict[int, frozenset[str]] = {}  # slot -> groups its adapter touches
        self._module_shapes = {
            f"model.layers.{i}.{'self_attn' if g in ('qkv', 'o') else 'mlp'}.{name}": (shape.in_features, out)
            for i in range(layers)
            for g, shape in shapes.items()
            for name, out in zip(GROUPS[g], shape.outs, strict=True)
        }

    # -- loading --------------------------------------------------------------------------------
    def _allocate(self, rank: int) -> None:
        """(Re)allocate every buffer at `rank`, keeping what the loaded slots hold."""
        old_rank, old_a, old_b = self.rank, self.a, self.b
        self.a, self.b = {}, {}
        for g, shape in self.shapes.items():
            members = len(GROUPS[g])
            self.a[g] = []
            self.b[g] = []
            for layer in range(self.layers):
                a = torch.zeros(self.num_slots, members * rank, shape.in_features, dtype=self.dtype, device=self.device)
                b = torch.zeros(
                    shape.out_features, self.num_slots, members * rank, dtype=self.dtype, device=self.device
                )
                if old_rank:
                    for m in range(members):
                        a[:, m * rank : m * rank + old_rank] = old_a[g][layer][:, m * old_rank : (m + 1) * old_rank]
                        b[:, :, m * rank : m * rank + old_rank] = old_b[g][layer][
                            :, :, m * old_rank : (m + 1) * old_rank
                        ]
                self.a[g].append(a)
                self.b[g].append(b)
        self.rank = rank

    @torch.no_grad()
    def fill(self, slot: int, weights: LoRAWeights) -> None:
        """Copy a verified adapter into a slot; a bad adapter raises before the slot changes."""
        if not BASE_SLOT < slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range")
        pairs = lora_pairs(weights, self._module_shapes, self.max_rank)
        if weights.rank > self.rank:
            self._allocate(min(self.max_rank, -(-weights.rank // 8) * 8))  # round up: fewer re-allocations
        self.clear(slot)
        touched: set[str] = set()
        r = self.rank
        for module, (a, b) in pairs.items():
            match = _MODULE.match(module)
            if match is None:  # lora_pairs only accepts our own module names
                raise ValueError(f"unexpected module {module}")
            layer, name = int(match.group(1)), match.group(2)
            group = next(g for g, names in GROUPS.items() if name in names)
            m = GROUPS[group].index(name)
            out_start = sum(self.shapes[group].outs[:m])
            out_end = out_start + self.shapes[group].outs[m]
            self.a[group][layer][slot, m * r : m * r + weights.rank] = a
            self.b[group][layer][out_start:out_end, slot, m * r : m * r + weights.rank] = b * weights.scaling
            touched.add(group)
        self._groups_of[slot] = frozenset(touched)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self._groups_of.pop(slot, None)
        for g in self.a:
            for a, b in zip(self.a[g], self.b[g], strict=True):
                a[slot].zero_()
                b[:, slot].zero_()

    def factors(self, group: str, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The slot's LoRA of one group and layer in fp32: (B [out, r], A [r, in]); None when not targeted."""
        if group not in self._groups_of.get(slot, frozenset()):
            return None
        return self.b[group][layer][:, slot].float(), self.a[group][layer][slot].float()

    # -- per step -------------------------------------------------------------------------------
    def plan(self, token_slots: list[int]) -> AdapterPlan:
        """Decide once per step how LoRA is applied to these tokens (one slot id per token)."""
        used = {s for s in token_slots if s != BASE_SLOT}
        groups = frozenset().union(*(self._groups_of.get(s, frozenset()) for s in used)) if used else frozenset()
        if not groups:
            return AdapterPlan()
        if len(set(token_slots)) == 1:
            return AdapterPlan(single=token_slots[0], groups=groups)
        lo, hi = min(used), max(used) + 1
        ids = torch.tensor(token_slots, device=self.device)
        onehot = (ids[:, None] == torch.arange(lo, hi, device=self.device)[None, :]).to(self.dtype)  # [T, n]
        masks = {
            members: onehot.repeat_interleave(members * self.rank, dim=1)
            for members in {len(GROUPS[g]) for g in groups}
        }
        return AdapterPlan(lo=lo, hi=hi, masks=masks, groups=groups)

    def apply(self, plan: AdapterPlan, group: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += LoRA(x) for this group and layer, in place.  x: [T, in], y: [T, out]."""
        if group not in plan.groups:
            return
        a, b = self.a[group][layer], self.b[group][layer]
        if plan.single is not None:
            h = x @ a[plan.single].T  # [T, members * r]
            y.addmm_(h, b[:, plan.single].T)
            return
        if plan.masks is None:  # plan() always sets masks when no single slot is chosen
            return
        members = len(GROUPS[group])
        n = plan.hi - plan.lo
        a_range = a[plan.lo : plan.hi].reshape(n * members * self.rank, -1)  # [n*R, in], a view
        b_range = b[:, plan.lo : plan.hi].reshape(b.shape[0], n * members * self.rank)  # [out, n*R], a view
        h = x @ a_range.T  # [T, n*R]
        h.mul_(plan.masks[members])
        y.addmm_(h, b_range.T)
