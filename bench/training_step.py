"""How fast a tuning round trains on this machine: KTO steps in fp32 against bf16 autocast, side by side.

    .venv/bin/python bench/training_step.py [--steps 4] [--batch 8]

`precision: auto` trains in bf16 autocast only where the hardware multiplies bf16 (AVX512-BF16, AMX,
CUDA). This runs the round's own KTO phase (`tuning.trainer.train_kto`, the shipped recipe) on the
bundled model with a fresh LoRA, once per precision, on the same rows (everyday prompts with answers of
~130 tokens, a round's typical shape), and prints seconds per optimizer step (the first step, which
pays for allocation, left out) and the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "bench" / "prompts" / "everyday.jsonl").open()]
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


def seconds_per_step(precision: str, steps: int, batch: int) -> float:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    print(f"auto picks bf16 here: {trainer.use_bf16(TuningSettings(), torch.device('cpu'))}")
    fp32 = seconds_per_step("fp32", args.steps, args.batch)
    print(f"fp32:            {fp32:6.2f} s/step")
    bf16 = seconds_per_step("bf16", args.steps, args.batch)
    print(f"bf16 autocast:   {bf16:6.2f} s/step   ({fp32 / bf16:.2f}x fp32's speed)")


if __name__ == "__main__":
    main()
