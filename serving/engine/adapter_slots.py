"""LoRA for the batched engine: adapters in fixed slots, applied per token in one forward pass.

The lean model fuses projections that read the same input (q/k/v, gate/up), so A is stored per fused
group, the members' A matrices side by side (`[slots, in, members * r]`), and B per member
(`[slots, r, out_m]`): a block-diagonal B for the whole group would be one matmul fewer but would
read and multiply the zeros too (2/3 of q/k/v's, 1/2 of gate/up's). Scaling is folded into B.
Slot 0 is the base model and stays zero.

Per step, tokens fall in one of three cases (chosen once per step, see `plan`):
- no token uses an adapter: nothing to do;
- every token uses the same slot: `y += (x @ A) @ B`, with the members' B as one block-diagonal matrix
  (kept for the last such slot);
- mixed: the tokens are grouped by slot (SGMV, as in Punica and S-LoRA). A prompt chunk is a run of
  tokens of one slot, so it takes one thin pair of matmuls on its slice of rows. The decode rows (one
  token per sequence) are grouped by slot and padded to one length, and all slots of their slot range
  run in one batched matmul per factor, `bmm(x_grouped, A_range)`, then `bmm(h_m, B_m,range)`, and
  the rows go back to token order with one gather. Each token multiplies only its own adapter, so
  eight adapters cost about one adapter's arithmetic plus reading their weights. (When one slot has
  nearly all decode rows, padding every other slot to its count would waste more than it saves;
  those steps run each slot's rows as a segment instead.)

On a CPU where the C++ kernel builds (`cpu_kernels`), no step takes these paths: one call per group
adds each token's own slot's LoRA (tokens grouped by slot, each slot's A and B read once per chunk of
16 of its tokens, fp32 sums; bf16 dot products where the CPU has AVX512-BF16), since the PyTorch ops
above cost ~20 us each here whatever their size (a mixed 8-adapter step at 32 rows: ~23 ms of them
against ~38 ms for the whole base step; the kernel ~6 ms). It also beat PyTorch's matmuls on prompt
chunks of one slot: 7.6 against 17.6 ms for 120 groups at 50 tokens, 16.5 against 27.7 at 128. Its
factors stay in the model's dtype.

Otherwise the factors live in `compute_dtype`, which need not be the model's: these are thin matmuls whose
speed on a CPU depends on the kernel more than on the bytes, and a CPU whose bf16 matmul is no faster
than fp32 (AVX512-BF16 without AMX) runs them faster in fp32. So on a CPU the engine times both once
at start-up and keeps the faster; on CUDA it is the model's dtype.
The slot rank grows to the largest loaded adapter's rank (up to the configured maximum), so rank
16 adapters do not pay for a rank 32 limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache

import structlog
import torch

from serving.adapters.store import LoRAWeights
from serving.engine.cpu_kernels import KernelGroup, LoraKernel
from serving.engine.linear import best_seconds
from serving.engine.lora import BASE_SLOT, lora_pairs

log = structlog.get_logger(__name__)

GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
_MODULE = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")
_PAD_SLACK = 64  # padding rows the batched (bmm) path may add to a step's decode rows before segments pay more


@dataclass(frozen=True)
class GroupShape:
    in_features: int
    outs: tuple[int, ...]  # output features of each member, in GROUPS order

    @property
    def out_features(self) -> int:
        return sum(self.outs)


@dataclass
class PaddedGroups:
    """Decode rows [0, tokens) grouped by slot for the batched path: slots [lo, hi) (the base slot 0
    too: it is zeros), each padded to `rows` rows."""

    lo: int
    hi: int
    rows: int
    tokens: int  # the decode rows this covers: tokens [0, tokens)
    gather: torch.Tensor  # [(hi - lo) * rows] token index of each padded row (0 for padding)
    back: torch.Tensor  # [tokens] padded row of each token


@dataclass
class AdapterPlan:
    """How this step applies LoRA: one `single` slot for all tokens, or the mixed case: decode rows
    `padded`, and `segments` of one slot each (a slice of rows, or a set of rows by index). With the
    kernel, `per_token` holds every token's slot and is the only path taken (`single` still says
    whether one slot serves the whole step: the engine may have that adapter merged)."""

    single: int | None = None
    padded: PaddedGroups | None = None
    per_token: torch.Tensor | None = None
    segments: list[tuple[int, slice | torch.Tensor]] = field(default_factory=list)
    groups: frozenset[str] = frozenset()

    @property
    def mixed(self) -> bool:
        per_token_mixed = self.per_token is not None and self.single is None
        return self.padded is not None or per_token_mixed or bool(self.segments)

    @property
    def active(self) -> bool:
        return bool(self.groups) and (self.single is not None or self.mixed)


def lora_compute_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the LoRA matmuls run in: the model's, unless fp32 is measurably faster on this CPU."""
    if device.type != "cpu" or model_dtype == torch.float32:
        return model_dtype
    return _faster_on_this_cpu(model_dtype)


@cache
def _faster_on_this_cpu(model_dtype: torch.dtype) -> torch.dtype:
    # A mixed decode step's shapes: 32 tokens over 8 rank-16 slots, q/k/v's A and gate's B.
    x = torch.randn(8, 4, 576)
    a = torch.randn(8, 576, 48)
    b = torch.randn(8, 16, 1536)

    def seconds(dtype: torch.dtype) -> float:
        xs, as_, bs = x.to(dtype), a.to(dtype), b.to(dtype)
        return best_seconds(lambda: [torch.bmm(torch.bmm(xs, as_)[:, :, :16], bs) for _ in range(4)], repeat=5)

    seconds(model_dtype), seconds(torch.float32)  # warm both kernels up
    own, fp32 = seconds(model_dtype), seconds(torch.float32)
    chosen = torch.float32 if fp32 < own else model_dtype
    log.info("lora compute dtype", chosen=str(chosen), us_model_dtype=round(own * 250e3), us_fp32=round(fp32 * 250e3))
    return chosen


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
        kernel: LoraKernel | None = None,
    ) -> None:
        self.layers = layers
        self.shapes = shapes
        self.num_slots = num_slots + 1  # plus the base slot
        self.max_rank = max_rank
        self.kernel = kernel if device.type == "cpu" else None
        self.dtype = dtype if self.kernel is not None else lora_compute_dtype(dtype, device)
        self.device = device
        self.rank = 0  # current slot rank; buffers are allocated on the first load
        self.a: dict[str, list[torch.Tensor]] = {}  # group -> per layer [slots, in, members * r]
        self.b: dict[str, list[list[torch.Tensor]]] = {}  # group -> per layer, per member [slots, r, out_m]
        self._groups_of: dict[int, frozenset[str]] = {}  # slot -> groups its adapter touches
        # The last single-adapter slot's B per fused group as one block-diagonal matrix: (group, layer) -> B.
        self._joint_b: dict[int, dict[tuple[str, int], torch.Tensor]] = {}
        self._kernel_groups: dict[tuple[str, int], KernelGroup] = {}  # (group, layer) -> the kernel's view of a/b
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
        factory = {"dtype": self.dtype, "device": self.device}
        for g, shape in self.shapes.items():
            members = len(GROUPS[g])
            self.a[g], self.b[g] = [], []
            for layer in range(self.layers):
                a = torch.zeros(self.num_slots, shape.in_features, members * rank, **factory)
                bs = [torch.zeros(self.num_slots, rank, out, **factory) for out in shape.outs]
                if old_rank:
                    for m in range(members):
                        old_member = old_a[g][layer][:, :, m * old_rank : (m + 1) * old_rank]
                        a[:, :, m * rank : m * rank + old_rank] = old_member
                        bs[m][:, :old_rank] = old_b[g][layer][m]
                self.a[g].append(a)
                self.b[g].append(bs)
                if self.kernel is not None:
                    self._kernel_groups[(g, layer)] = self.kernel.group(a, bs)
        self.rank = rank
        self._joint_b = {}

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
            self.a[group][layer][slot, :, m * r : m * r + weights.rank] = a.T
            self.b[group][layer][m][slot, : weights.rank] = (b * weights.scaling).T
            touched.add(group)
        self._groups_of[slot] = frozenset(touched)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self._groups_of.pop(slot, None)
        self._joint_b = {}
        for g in self.a:
            for a, bs in zip(self.a[g], self.b[g], strict=True):
                a[slot].zero_()
                for b in bs:
                    b[slot].zero_()

    def factors(self, group: str, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The slot's LoRA of one group and layer in fp32: (B [out, r], A [r, in]); None when not targeted.

        B comes back block-diagonal over the group's members (their outputs are concatenated)."""
        if group not in self._groups_of.get(slot, frozenset()):
            return None
        b = torch.block_diag(*(b[slot].T.float() for b in self.b[group][layer]))
        return b, self.a[group][layer][slot].T.float()

    # -- per step -------------------------------------------------------------------------------
    def plan(self, token_slots: list[int], decode_rows: int | None = None) -> AdapterPlan:
        """Decide once per step how LoRA is applied to these tokens (one slot id per token).

        The first `decode_rows` tokens (default: all) are decode rows, one per sequence; the rest are
        prompt chunks, each a run of one sequence's tokens."""
        used = {s for s in token_slots if s != BASE_SLOT}
        groups = frozenset().union(*(self._groups_of.get(s, frozenset()) for s in used)) if used else frozenset()
        if not groups:
            return AdapterPlan()
        single = token_slots[0] if len(set(token_slots)) == 1 else None
        if self.kernel is not None:
            return AdapterPlan(single=single, per_token=torch.tensor(token_slots), groups=groups)
        if single is not None:
            return AdapterPlan(single=single, groups=groups)
        n_dec = len(token_slots) if decode_rows is None else decode_rows
        plan = AdapterPlan(groups=groups, segments=_runs(token_slots, n_dec))
        decode = token_slots[:n_dec]
        if len(set(decode)) <= 1:  # no decode rows, or all of one slot (or the base): a run like a prompt chunk
            if decode and decode[0] != BASE_SLOT:
                plan.segments.append((decode[0], slice(0, n_dec)))
            return plan
        rows_of: dict[int, list[int]] = {}  # slot -> its rows; base rows too (slot 0 is zeros)
        for token, slot in enumerate(decode):
            rows_of.setdefault(slot, []).append(token)
        lo, hi = min(rows_of), max(rows_of) + 1
        rows = max(len(tokens) for tokens in rows_of.values())
        if (hi - lo) * rows > n_dec + _PAD_SLACK:
            plan.segments += [
                (slot, torch.tensor(tokens, device=self.device))
                for slot, tokens in sorted(rows_of.items())
                if slot != BASE_SLOT
            ]
            return plan
        gather = [0] * ((hi - lo) * rows)  # padding rows read token 0; nothing reads their results
        back = [0] * n_dec
        for slot, tokens in rows_of.items():
            first = (slot - lo) * rows
            for i, token in enumerate(tokens):
                gather[first + i], back[token] = token, first + i
        plan.padded = PaddedGroups(
            lo=lo,
            hi=hi,
            rows=rows,
            tokens=n_dec,
            gather=torch.tensor(gather, device=self.device),
            back=torch.tensor(back, device=self.device),
        )
        return plan

    def apply(self, plan: AdapterPlan, group: str, layer: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += LoRA(x) for this group and layer, in place.  x: [T, in], y: [T, out]."""
        if group not in plan.groups:
            return
        if plan.per_token is not None:
            assert self.kernel is not None  # plan() sets per_token only then
            self.kernel.apply(self._kernel_groups[(group, layer)], plan.per_token, x, y)
            return
        a, bs = self.a[group][layer], self.b[group][layer]
        r = self.rank
        if plan.single is not None:
            y.add_((x.to(self.dtype) @ a[plan.single]) @ self._joint(plan.single, group, layer, bs))
            return
        if plan.padded is not None:
            p = plan.padded
            n = p.hi - p.lo
            xs = x[: p.tokens].index_select(0, p.gather).to(self.dtype).view(n, p.rows, -1)
            h = torch.bmm(xs, a[p.lo : p.hi])  # [n, rows, members * r]: each row times its own slot's A
            if len(bs) == 1:
                z = torch.bmm(h, bs[0][p.lo : p.hi])
            else:
                z = torch.cat([torch.bmm(h[:, :, m * r : (m + 1) * r], b[p.lo : p.hi]) for m, b in enumerate(bs)], 2)
            y[: p.tokens].add_(z.view(n * p.rows, -1).index_select(0, p.back))  # back to token order
        for slot, rows in plan.segments:
            if isinstance(rows, slice):
                y[rows].add_(self._one_slot(slot, a, bs, x[rows]))
            else:
                y.index_add_(0, rows, self._one_slot(slot, a, bs, x.index_select(0, rows)).to(y.dtype))

    def _joint(self, slot: int, group: str, layer: int, bs: list[torch.Tensor]) -> torch.Tensor:
        """The slot's B for a whole fused group, block-diagonal `[members * r, out]`.

        When one adapter serves a whole step, one matmul against this replaces a matmul per member and
        the concatenation: at the few rows of a 4-bit step that is most of LoRA's cost (kernel count,
        not arithmetic). Kept for one slot at a time (a block-diagonal B is 2-3x its members' bytes)."""
        if len(bs) == 1:
            return bs[0][slot]
        if slot not in self._joint_b:
            self._joint_b = {slot: {}}  # replaces the previous slot's
        joint = self._joint_b[slot]
        key = (group, layer)
        if key not in joint:
            joint[key] = torch.block_diag(*(b[slot] for b in bs))
        return joint[key]

    def _one_slot(self, slot: int, a: torch.Tensor, bs: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """LoRA_slot(x) for rows that all use `slot`: [rows, out], in the compute dtype."""
        r = self.rank
        h = x.to(self.dtype) @ a[slot]  # [rows, members * r]
        if len(bs) == 1:
            return h @ bs[0][slot]
        return torch.cat([h[:, m * r : (m + 1) * r] @ b[slot] for m, b in enumerate(bs)], 1)


def _runs(token_slots: list[int], start: int) -> list[tuple[int, slice | torch.Tensor]]:
    """Runs of one adapter slot among tokens[start:] (prompt chunks): (slot, slice of rows); base runs skipped."""
    runs: list[tuple[int, slice | torch.Tensor]] = []
    i = start
    while i < len(token_slots):
        j = i
        while j < len(token_slots) and token_slots[j] == token_slots[i]:
            j += 1
        if token_slots[i] != BASE_SLOT:
            runs.append((token_slots[i], slice(i, j)))
        i = j
    return runs
