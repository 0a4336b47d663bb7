"""The gate reuses greedy probe answers kept from an earlier gate, and only where they are the same answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuning import scoring, trainer
from tuning.gate import Contenders, run_gate
from tuning.probe_answers import KEEP_ENTRIES, GreedyConditions, KnownAnswers, ProbeAnswerStore
from tuning.probes import everyday_probes, factual_probes
from tuning.settings import TuningSettings

CONDITIONS = GreedyConditions([[1, 2, 3], [4, 5]], 8, 32, torch.float32, torch.device("cpu"))


def test_an_entry_is_found_only_under_the_same_weights_and_conditions(tmp_path: Path) -> None:
    store = ProbeAnswerStore(tmp_path / "kept")
    assert store.load("base", CONDITIONS) is None
    store.save("base", CONDITIONS, [[7, 8], []])
    assert store.load("base", CONDITIONS) == [[7, 8], []]
    assert store.load("base+abc", CONDITIONS) is None
    for changed in (
        GreedyConditions([[1, 2, 3], [4, 6]], 8, 32, torch.float32, torch.device("cpu")),
        GreedyConditions([[1, 2, 3], [4, 5]], 16, 32, torch.float32, torch.device("cpu")),
        GreedyConditions([[1, 2, 3], [4, 5]], 8, 16, torch.float32, torch.device("cpu")),
        GreedyConditions([[1, 2, 3], [4, 5]], 8, 32, torch.bfloat16, torch.device("cpu")),
    ):
        assert store.load("base", changed) is None


def test_a_malformed_entry_is_a_miss_and_old_entries_are_pruned(tmp_path: Path) -> None:
    store = ProbeAnswerStore(tmp_path)
    store.save("base", CONDITIONS, [[1], [2]])
    (tmp_path / f"{CONDITIONS.key('base')}.json").write_text("[[1]")  # cut short
    assert store.load("base", CONDITIONS) is None
    (tmp_path / f"{CONDITIONS.key('base')}.json").write_text('[[1], ["x"]]')
    assert store.load("base", CONDITIONS) is None
    for i in range(KEEP_ENTRIES + 5):
        store.save(f"model-{i}", CONDITIONS, [[i], []])
    assert len(list(tmp_path.glob("*.json"))) == KEEP_ENTRIES
    assert store.load(f"model-{KEEP_ENTRIES + 4}", CONDITIONS) == [[KEEP_ENTRIES + 4], []]


@pytest.fixture
def counted_generation(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = scoring.greedy_answers

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "greedy_answers", counting)
    return calls


def _policy(tiny_model_dir: Path, tuning: TuningSettings, seed: int):  # type: ignore[no-untyped-def]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():  # sharper logits than the random init's, so the adapter changes greedy answers
        base.model.norm.weight.mul_(30)
    policy = trainer.attach_adapter(base, tuning, None)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return policy


def test_the_next_round_reuses_its_incumbents_answers_and_they_are_what_it_would_generate(
    tiny_model_dir: Path, tmp_path: Path, counted_generation: list[int]
) -> None:
    tuning = TuningSettings(gate_probe_tokens=6, gate_max_kl=100.0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    probes, everyday = factual_probes()[:5], everyday_probes()[:5]
    store = ProbeAnswerStore(tmp_path / "kept")

    # Round 1: base vs v1; nothing kept yet, both generated and kept.
    first = _policy(tiny_model_dir, tuning, seed=1)
    one = KnownAnswers(store, incumbent="base", candidate="base+v1")
    report = run_gate(Contenders(first, None), tokenizer, [], [], probes, tuning, everyday=everyday, known=one)
    assert len(counted_generation) == 2
    trainer.save_adapter(first, tmp_path / "v1")

    # Round 2: v1 (from the store) is the incumbent of a new candidate: only the candidate generates.
    second = _policy(tiny_model_dir, tuning, seed=2)
    two = KnownAnswers(store, incumbent="base+v1", candidate="base+v2")
    reused = run_gate(
        Contenders(second, tmp_path / "v1"), tokenizer, [], [], probes, tuning, everyday=everyday, known=two
    )
    assert len(counted_generation) == 3
    fresh = run_gate(Contenders(second, tmp_path / "v1"), tokenizer, [], [], probes, tuning, everyday=everyday)
    assert len(counted_generation) == 5
    assert reused.figures == fresh.figures  # kept answers = what v1 generates as the incumbent
    assert report.figures["probe_answers_changed"] > 0  # the adapters do change answers: the check could fail
