"""How long the gate takes on this machine, with and without the incumbent's kept probe answers.

    .venv/bin/python bench/gate.py

Every round ends with the gate (`tuning/gate.py`): greedy answers to the 86 shipped probes from the
incumbent and the candidate, then the KL between them along the incumbent's answers. Since 2026-12-04 a
gate keeps the greedy answers it generates (`tuning/probe_answers.py`), so the next round finds its
incumbent's there and generates only the candidate's. This runs the whole gate on the bundled model
(fp32, as a round's policy is) with a random rank-16 candidate LoRA, in this process, side by side:
nothing kept (the first round, or until 2026-12-03) against the incumbent's answers kept, and prints the
ratio. Both must reach the same verdict on the same figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # before bench/, whose serving.py would shadow

from bench.serving import MODEL_CACHE
from serving import base_model
from tuning import trainer
from tuning.gate import Contenders, run_gate
from tuning.probe_answers import KnownAnswers, ProbeAnswerStore
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
    policy = trainer.attach_adapter(base_model.load_model(model_dir, device, torch.float32), tuning, None)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)  # a candidate that answers a little differently
    contenders = Contenders(policy, None)
    probes = factual_probes()
    print(
        f"{len(probes) + len(everyday_probes())} probes, {tuning.gate_probe_tokens} tokens each, fp32, "
        f"{torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as kept:
        known = KnownAnswers(ProbeAnswerStore(Path(kept)), incumbent="base", candidate="base+random")
        # Untimed, and a warm-up for both: a gate with an empty store generates both and keeps both.
        run_gate(contenders, tokenizer, [], [], probes, tuning, known=replace(known, candidate="base+other"))
        nothing_s, nothing = seconds(lambda: run_gate(contenders, tokenizer, [], [], probes, tuning))
        kept_s, reused = seconds(lambda: run_gate(contenders, tokenizer, [], [], probes, tuning, known=known))
    same = nothing.figures == reused.figures and nothing.passed == reused.passed
    print(f"{'gate':28s} {'seconds':>8s}")
    print(f"{'nothing kept':28s} {nothing_s:8.1f}")
    print(f"{'incumbent answers kept':28s} {kept_s:8.1f}   {nothing_s / kept_s:.2f}x faster")
    print(f"same verdict and figures: {same}")


if __name__ == "__main__":
    main()
