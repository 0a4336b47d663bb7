"""How long the gate's model work takes on this machine, at the batch sizes it used before and now.

    .venv/bin/python bench/gate.py

Every round ends with the gate (`tuning/gate.py`): greedy answers to the 86 shipped probes from the
incumbent and the candidate, then the KL between them along the incumbent's answers. This times each on
the bundled model with a random rank-16 candidate LoRA, in this process, side by side: greedy in batches
of 16 and KL one row at a time (until 2026-12-03) against the current defaults, and prints the ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # before bench/, whose serving.py would shadow

from bench.serving import MODEL_CACHE
from serving import base_model
from tuning import scoring, trainer
from tuning.gate import Contenders
from tuning.probes import everyday_probes, factual_probes
from tuning.settings import TuningSettings


def seconds(run: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = run()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    tuning = TuningSettings()
    device = torch.device("cpu")
    model_dir = base_model.prepare_bundled_model(MODEL_CACHE)
    tokenizer = base_model.load_tokenizer(model_dir)
    tokenizer.padding_side = "left"
    dtype = base_model.resolve_dtype("auto", device)
    policy = trainer.attach_adapter(base_model.load_model(model_dir, device, dtype), tuning, None)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)  # a candidate that answers a little differently
    contenders = Contenders(policy, None)
    probes = [p.messages for p in factual_probes()]
    prompts = probes + everyday_probes()
    tokens = tuning.gate_probe_tokens

    def phases(greedy_batch: int, kl_batch: int) -> dict[str, float]:
        def greedy(model: Any) -> Callable[[], list[list[int]]]:
            return lambda: scoring.greedy_answers(
                model, tokenizer, prompts, max_new_tokens=tokens, batch_size=greedy_batch
            )

        with contenders.incumbent() as model:
            incumbent_s, answers = seconds(greedy(model))
        with contenders.candidate() as model:
            candidate_s, _ = seconds(greedy(model))
        incumbent_answers = answers[: len(probes)]
        kl_s, _ = seconds(
            lambda: scoring.mean_kl(
                policy,
                tokenizer,
                probes,
                incumbent_answers,
                contenders.incumbent,
                contenders.candidate,
                batch_size=kl_batch,
            )
        )
        return {"greedy incumbent": incumbent_s, "greedy candidate": candidate_s, "KL": kl_s}

    print(f"{len(prompts)} probes, {tokens} tokens each, {dtype}, {torch.get_num_threads()} threads")
    before = phases(greedy_batch=16, kl_batch=1)
    now = phases(greedy_batch=32, kl_batch=16)
    before["total"], now["total"] = sum(before.values()), sum(now.values())
    print(f"{'phase':18s} {'before':>9s} {'now':>9s}  speed-up")
    for name in before:
        print(f"{name:18s} {before[name]:8.1f}s {now[name]:8.1f}s  {before[name] / now[name]:.2f}x")


if __name__ == "__main__":
    main()
