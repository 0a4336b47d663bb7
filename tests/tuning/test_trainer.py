"""TRL runs on the tiny model: LoRA weights move, base weights do not, and the saved adapter is servable."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from feedback.models import ComparisonOutcome
from feedback.training_data import ComparedAnswers, RatedAnswer
from serving.adapters.store import read_version, write_version
from serving.engine.lora import SERVABLE_MODULES
from tuning import scoring, trainer
from tuning.datasets import dpo_dataset, kto_dataset
from tuning.settings import TuningSettings

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _ratings(n: int) -> list[RatedAnswer]:
    return [
        RatedAnswer(
            f"f{i}", 1, PROMPT, "Paris." if i % 2 else "I like turtles and long walks.", 1 if i % 2 else -1, None, "x"
        )
        for i in range(n)
    ]


def _progress_log() -> tuple[list[tuple[str, int, int]], trainer.Progress]:
    seen: list[tuple[str, int, int]] = []
    return seen, lambda stage, step, total, logs: seen.append((stage, step, total))


def _snapshot(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    lora, base = {}, {}
    for name, param in model.named_parameters():
        (lora if "lora_" in name else base)[name] = param.detach().clone()
    return lora, base


def test_kto_then_dpo_train_the_adapter_only(tiny_model_dir: Path, tmp_path: Path) -> None:
    tuning = TuningSettings(max_steps=3, batch_size=4, learning_rate=1e-3, precision="fp32", max_length=128)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    policy = trainer.attach_adapter(model, tuning, None)
    lora_before, base_before = _snapshot(policy)
    assert lora_before and base_before

    seen, report = _progress_log()
    kto = kto_dataset(_ratings(8))
    pairs = dpo_dataset([], [ComparedAnswers("c1", PROMPT, "Paris.", "Rome.", ComparisonOutcome.A)] * 4)
    device = torch.device("cpu")
    kto_result = trainer.train_kto(policy, tokenizer, kto, tuning, device, tmp_path, report)
    dpo_result = trainer.train_dpo(policy, tokenizer, pairs, tuning, device, tmp_path, report)
    assert kto_result.steps == 3 and dpo_result.steps == 3
    assert {stage for stage, _, _ in seen} == {"kto", "dpo"}

    lora_after, base_after = _snapshot(policy)
    assert set(lora_after) == set(lora_before)  # no leftover "ref" copy
    assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before)
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)

    trainer.save_adapter(policy, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all("lora_" in key and ".ref." not in key for key in tensors)
    stored = write_version(tmp_path / "store", "default", 1, tmp_path / "out")
    weights = read_version(
        tmp_path / "store", stored.relative_path, stored.sha256, max_rank=32, allowed_modules=SERVABLE_MODULES
    )
    assert weights.rank == tuning.lora_rank


def _train_and_save(
    model_dir: Path,
    tuning: TuningSettings,
    out: Path,
    *,
    parent: Path | None = None,
    seed: int = 0,
    continued: bool = False,
) -> dict[str, torch.Tensor]:
    """A short KTO run on the tiny model (a fresh LoRA, or `parent` continued); the saved adapter's tensors."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = trainer.attach_adapter(AutoModelForCausalLM.from_pretrained(model_dir), tuning, parent)
    data = kto_dataset(_ratings(8), seed=seed)
    trainer.train_kto(
        policy, tokenizer, data, tuning, torch.device("cpu"), out.parent, lambda *a: None, continued=continued
    )
    trainer.save_adapter(policy, out)
    return load_file(out / "adapter_model.safetensors")


def test_continuing_a_parent_adapter_keeps_training_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    tuning = TuningSettings(max_steps=2, batch_size=4, learning_rate=1e-3, precision="fp32", max_length=128)
    parent = _train_and_save(tiny_model_dir, tuning, tmp_path / "parent")
    child = _train_and_save(tiny_model_dir, tuning, tmp_path / "child", parent=tmp_path / "parent", seed=1)
    assert set(child) == set(parent)
    assert any(not torch.equal(parent[k], child[k]) for k in parent)


def test_a_continued_round_steps_at_the_continued_learning_rate(tiny_model_dir: Path, tmp_path: Path) -> None:
    # learning_rate would visibly move the parent; continued_learning_rate is far too small to.
    tuning = TuningSettings(
        max_steps=2, batch_size=4, learning_rate=1e-3, continued_learning_rate=1e-9, precision="fp32", max_length=128
    )
    parent = _train_and_save(tiny_model_dir, tuning, tmp_path / "parent")

    def largest_change(*, continued: bool) -> float:
        child = _train_and_save(
            tiny_model_dir,
            tuning,
            tmp_path / f"child-{continued}",
            parent=tmp_path / "parent",
            seed=1,
            continued=continued,
        )
        return max(float((child[k] - parent[k]).abs().max()) for k in parent)

    assert largest_change(continued=True) < 1e-6
    assert largest_change(continued=False) > 1e-4


def _cut(ratings: list[RatedAnswer]) -> list[RatedAnswer]:
    """Every other answer as if cut at max_tokens."""
    return [dataclasses.replace(r, finished=bool(i % 2)) for i, r in enumerate(ratings)]


def test_both_kto_losses_train_on_cut_and_finished_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for loss in ("apo_zero_unpaired", "kto"):
        tuning = TuningSettings(
            epochs=2, batch_size=4, learning_rate=1e-3, precision="fp32", max_length=128, kto_loss=loss
        )
        policy = trainer.attach_adapter(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), tuning, None
        )
        lora_before, _ = _snapshot(policy)
        data = kto_dataset(_cut(_ratings(8)))
        result = trainer.train_kto(
            policy, tokenizer, data, tuning, torch.device("cpu"), tmp_path / loss, lambda *a: None
        )
        assert result.steps == 4, loss  # 8 rows, batch 4, 2 epochs
        lora_after, _ = _snapshot(policy)
        assert any(not torch.equal(lora_before[k], lora_after[k]) for k in lora_before), loss


def test_a_cut_answer_trains_and_scores_without_the_end_of_turn(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    _, finished = scoring._answer_ids(tokenizer, PROMPT, "Paris is the capital", finished=True)
    _, cut = scoring._answer_ids(tokenizer, PROMPT, "Paris is the capital", finished=False)
    assert end_of_turn in finished and end_of_turn not in cut
    assert finished[: len(cut)] == cut and tokenizer.decode(cut) == "Paris is the capital"

    # What TRL hands the collator: rows tokenized with the template's end-of-turn, KL pairs rotated per batch.
    rows = [{"prompt_ids": [1], "completion_ids": finished, "finished": flag} for flag in (True, False, True, False)]
    for batch in range(0, 4, 2):
        pair = rows[batch : batch + 2]
        for row, neighbour in zip(pair, pair[-1:] + pair[:-1], strict=True):
            row["KL_completion_ids"] = neighbour["completion_ids"]
    prepared = trainer._cut_answers_without_turn_end(Dataset.from_list(rows), tokenizer, batch_size=2)
    assert "finished" not in prepared.column_names
    assert prepared["completion_ids"] == [finished, cut, finished, cut]
    assert prepared["KL_completion_ids"] == [cut, finished, cut, finished]  # rebuilt from the cut ids
