"""How fast a tuning round trains on this machine: KTO steps in fp32 and bf16 autocast, side by side.

    .venv/bin/python bench/training_step.py [--steps 4] [--batch 8]

Runs the round's own KTO phase (`tuning.trainer.train_kto`, the shipped recipe) on the bundled model with
a fresh LoRA, on the same rows (everyday prompts with answers of ~130 tokens, a round's typical shape),
each configuration in a fresh process, and prints seconds per optimizer step (the first step, which pays
for allocation, left out) and each one's speed against the first:
- fp32 with glibc's default malloc (the baseline: what rounds did before `tuning/cpu_memory.py`);
- fp32 as a round trains on a CPU without hardware bf16 (freed memory kept for reuse);
- bf16 autocast, what `precision: auto` picks where the hardware multiplies bf16 (AVX512-BF16, AMX).
  Left out where bf16 is emulated: an AVX2-only EPYC multiplied 1024^2 bf16 matrices at 0.9 GFLOP/s
  against 130 in fp32, so a step would take tens of minutes to show what `auto` already avoids.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.adaptation import load_prompts  # noqa: E402
from bench.serving import MODEL_CACHE  # noqa: E402
from feedback.training_data import RatedAnswer  # noqa: E402
from serving import base_model  # noqa: E402
from tuning import trainer  # noqa: E402
from tuning.datasets import kto_dataset  # noqa: E402
from tuning.settings import TuningSettings  # noqa: E402

ANSWER = (
    "Start with the basics and keep it simple. Gather what you need first, then work through it one step "
    "at a time, checking as you go. If something looks wrong, stop and fix it before moving on, because small "
    "mistakes early tend to grow later. Most people find that a little planning saves a lot of time. "
)


def ratings(count: int) -> list[RatedAnswer]:
    prompts, _ = load_prompts()  # the adaptation benchmark's train split
    return [
        RatedAnswer(
            f"f{i}",
            1,
            [{"role": "user", "content": prompts[i % len(prompts)]}],
            ANSWER * 2,
            1 - 2 * (i % 3 == 0),
            None,
            "base",
        )
        for i in range(count)
    ]


def seconds_per_step(precision: str, steps: int, batch: int, *, keep_freed_memory: bool = True) -> float:
    if not keep_freed_memory:
        trainer.keep_freed_memory = lambda: False  # glibc's defaults: this process never called mallopt
    device = torch.device("cpu")
    model_dir = base_model.prepare_bundled_model(MODEL_CACHE)
    tokenizer = base_model.load_tokenizer(model_dir)
    tuning = TuningSettings(precision=precision, max_steps=steps, batch_size=batch)
    model = trainer.attach_adapter(base_model.load_model(model_dir, device, torch.float32), tuning, None)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        trainer.train_kto(
            model,
            tokenizer,
            kto_dataset(ratings(steps * batch)),
            tuning,
            device,
            Path(out),
            lambda stage, step, total, logs: stamps.append(time.perf_counter()),
        )
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return sum(gaps) / len(gaps)


CONFIGS = {  # name: (precision, keep freed memory)
    "fp32, default malloc": ("fp32", False),
    "fp32 (a round)": ("fp32", True),
    "bf16 autocast": ("bf16", True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--one", choices=sorted(CONFIGS), help=argparse.SUPPRESS)  # a child process's config
    args = parser.parse_args()
    if args.one:
        precision, keep = CONFIGS[args.one]
        print(json.dumps({"seconds": seconds_per_step(precision, args.steps, args.batch, keep_freed_memory=keep)}))
        return
    native_bf16 = trainer.use_bf16(TuningSettings(), torch.device("cpu"))
    print(f"precision auto picks bf16 here: {native_bf16}")
    baseline = None
    for name in CONFIGS:
        if CONFIGS[name][0] == "bf16" and not native_bf16:
            print(f"{name:22s} skipped: this CPU emulates bf16 (no AVX512-BF16 or AMX)")
            continue
        child = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--batch", str(args.batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        seconds = json.loads(child.stdout.strip().splitlines()[-1])["seconds"]
        baseline = baseline or seconds
        print(f"{name:22s} {seconds:6.2f} s/step   {baseline / seconds:.2f}x the first's speed")


if __name__ == "__main__":
    main()
