"""One decode step of the lean model, with the engine's CPU kernels and without, side by side.

    .venv/bin/python bench/step.py [--rows 1,32] [--length 120] [--repeat 15]

No scheduler, no HTTP: the bundled model in the dtype `loraloop serve` picks, R rows each decoding one
token at `--length` cached positions, timed as the engine runs them (median of `--repeat` steps after
three untimed ones). Per row count, three cases: the base model, every row on one adapter that the
engine has merged into the weights (rows beyond the 4-bit small-step limit; at fewer rows the adapter is
added per token), and the rows spread over 8 adapters (rank 16 on all projections). Each case runs on a
lean model built with `cpu_kernels=False` (PyTorch ops: the baseline) and one with the C++ kernels
(`serving/engine/csrc`), in this process, and the table gives both and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.engine import make_adapters  # noqa: E402
from bench.serving import MODEL_CACHE  # noqa: E402
from serving import base_model  # noqa: E402
from serving.engine.cpu_threads import claim_cores  # noqa: E402
from serving.engine.model import LeanLlama, StepBatch  # noqa: E402

ADAPTERS = 8


def step_runner(lean: LeanLlama, adapters: list, rows: int, length: int) -> Callable[[list[int]], None]:
    """A function running one decode step of `rows` rows, each on the adapter slot given for it (0: base)."""
    cache = lean.new_cache(slots=rows, capacity=length + 8)
    slots = lean.new_adapter_slots(num_slots=ADAPTERS, max_rank=32)
    for slot, weights in enumerate(adapters, start=1):
        slots.fill(slot, weights)
    lean.use_merged(1, lean.build_merged(1, slots))
    for row in range(rows):  # the cached positions hold what a prefill would have left: finite values
        cache.set_length(row, length - 1)
        cache.mark_written(row, length - 1)
    for k, v in zip(cache.k, cache.v, strict=True):
        k[:rows].normal_()
        v[:rows].normal_()
    generator = torch.Generator().manual_seed(0)

    def run(token_slots: list[int]) -> None:
        batch = StepBatch(
            token_ids=torch.randint(0, 1000, (rows,), generator=generator),
            positions=torch.full((rows,), length - 1),
            decode_slots=list(range(rows)),
            decode_lengths=[length] * rows,
            prefills=[],
            logits_rows=torch.arange(rows),
            adapters=slots.plan(token_slots, decode_rows=rows),
        )
        lean.forward(batch, cache, slots)

    return run


def median_ms(run: Callable[[list[int]], None], token_slots: list[int], repeat: int) -> float:
    for _ in range(3):
        run(token_slots)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run(token_slots)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,32", help="decode rows per step, comma separated")
    parser.add_argument("--length", type=int, default=120, help="cached positions per row")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    claim_cores()
    device = torch.device("cpu")
    model_dir = base_model.prepare_bundled_model(MODEL_CACHE)
    model = base_model.load_model(model_dir, device, base_model.resolve_dtype("auto", device))
    with tempfile.TemporaryDirectory(prefix="loraloop-bench-step-") as tmp:
        adapters = make_adapters(model_dir, Path(tmp), ADAPTERS)
    leans = {kernels: LeanLlama(model, max_positions=args.length + 8, cpu_kernels=kernels) for kernels in (False, True)}
    if leans[True].kernels.lora is None:
        sys.exit("the CPU kernels did not build here (no g++?): nothing to compare")
    print(f"one decode step, {model.dtype}, {args.length} cached positions a row (median ms of {args.repeat})")
    print(f"{'rows':>4}  {'case':<16}{'PyTorch ops':>12}{'C++ kernels':>13}{'ratio':>8}")
    for rows in (int(r) for r in args.rows.split(",")):
        cases = {"base": [0] * rows, "one adapter": [1] * rows, "8 adapters": [1 + i % ADAPTERS for i in range(rows)]}
        runs = {kernels: step_runner(lean, adapters, rows, args.length) for kernels, lean in leans.items()}
        for name, token_slots in cases.items():
            plain, fast = (median_ms(runs[kernels], token_slots, args.repeat) for kernels in (False, True))
            print(f"{rows:>4}  {name:<16}{plain:>12.1f}{fast:>13.1f}{plain / fast:>7.2f}x")


if __name__ == "__main__":
    main()
