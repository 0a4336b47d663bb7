"""The TRL runs: KTO on thumbs, DPO on pairs, both training one LoRA adapter.

A round continues the alias's active adapter when there is one (TRL then freezes a copy of it
as the reference, so the KL anchor is what users are served today) or starts a fresh LoRA on
the base model (the reference is the base with adapters disabled).

TRL's defaults assume a GPU (bf16 everywhere, gradient checkpointing). Here: no gradient
checkpointing (it only costs time on a 135M model), bf16 autocast where the hardware multiplies
bf16 (~1.6× faster than fp32 on an AMX CPU; emulated bf16 on an AVX-512 CPU without it took 2.4× longer,
`bench/training_step.py`), fp32 master weights either way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PrinterCallback, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from serving.base_model import cpu_has_native_bf16
from tuning.cpu_memory import keep_freed_memory
from tuning.datasets import KTOData
from tuning.scoring import without_turn_end
from tuning.settings import TuningSettings

log = structlog.get_logger(__name__)

Progress = Callable[[str, int, int, dict[str, float]], None]  # stage, step, total, last logs


@dataclass
class PhaseResult:
    method: str
    steps: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


class _ProgressCallback(TrainerCallback):
    """Reports each optimizer step (the run record's progress and heartbeat) and keeps the last logs."""

    def __init__(self, stage: str, report: Progress) -> None:
        self.stage = stage
        self.report = report
        self.last_logs: dict[str, float] = {}

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **_: Any) -> None:
        if logs:
            self.last_logs.update({k: float(v) for k, v in logs.items() if isinstance(v, int | float)})

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        self.report(self.stage, state.global_step, state.max_steps, self.last_logs)


def training_device(tuning: TuningSettings) -> torch.device:
    wanted = tuning.device
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted == "cuda":
        # Under `accelerate launch` each process owns one GPU: LOCAL_RANK says which.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(wanted)


def use_bf16(tuning: TuningSettings, device: torch.device) -> bool:
    if tuning.precision != "auto":
        return tuning.precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_native_bf16()


def lora_config(tuning: TuningSettings) -> LoraConfig:
    return LoraConfig(
        r=tuning.lora_rank,
        lora_alpha=tuning.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(tuning.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapter(base: PreTrainedModel, tuning: TuningSettings, parent_dir: Path | None) -> PeftModel:
    """The policy to train: the parent adapter made trainable, or a fresh LoRA."""
    if parent_dir is not None:
        return PeftModel.from_pretrained(base, parent_dir, is_trainable=True)
    return get_peft_model(base, lora_config(tuning))


def _common_args(tuning: TuningSettings, device: torch.device, output_dir: Path, *, continued: bool) -> dict[str, Any]:
    return {
        "output_dir": str(output_dir),
        "learning_rate": tuning.continued_learning_rate if continued else tuning.learning_rate,
        "num_train_epochs": tuning.epochs,
        "max_steps": tuning.max_steps,
        "per_device_train_batch_size": tuning.batch_size,
        "gradient_accumulation_steps": tuning.gradient_accumulation_steps,
        "beta": tuning.beta,
        "max_length": tuning.max_length,
        "use_cpu": device.type == "cpu",
        "bf16": use_bf16(tuning, device),
        "gradient_checkpointing": False,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": tuning.seed,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0,
    }


def _drop_reference_copy(model: PeftModel) -> None:
    # Continuing an adapter makes TRL add a frozen "ref" copy; the next phase adds its own.
    if "ref" in model.peft_config:
        model.delete_adapter("ref")
    model.set_adapter("default")


def _run(trainer: Any, method: str, callback: _ProgressCallback) -> PhaseResult:
    trainer.remove_callback(PrinterCallback)  # progress goes to the structured log and the run record
    if trainer.args.use_cpu:
        keep_freed_memory()  # TRL's LM-head tiles would otherwise be fresh, zero-filled pages every step
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in (output.metrics or {}).items() if isinstance(v, int | float)}
    metrics.update({f"last_{k}": v for k, v in callback.last_logs.items()})
    log.info("training phase done", method=method, steps=output.global_step, seconds=round(seconds, 1))
    return PhaseResult(method, int(output.global_step), seconds, metrics)


def train_kto(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: KTOData,
    tuning: TuningSettings,
    device: torch.device,
    output_dir: Path,
    report: Progress,
    *,
    continued: bool = False,
) -> PhaseResult:
    """`continued`: the policy is a parent adapter (smaller steps, see `TuningSettings.continued_learning_rate`)."""
    args = KTOConfig(
        **_common_args(tuning, device, output_dir / "kto", continued=continued),
        desirable_weight=data.desirable_weight,
        undesirable_weight=data.undesirable_weight,
        loss_type=tuning.kto_loss,
    )
    callback = _ProgressCallback("kto", report)
    trainer = KTOTrainer(
        model=model, args=args, train_dataset=data.dataset, processing_class=tokenizer, callbacks=[callback]
    )
    trainer.train_dataset = _cut_answers_without_turn_end(trainer.train_dataset, tokenizer, tuning.batch_size)
    result = _run(trainer, "kto", callback)
    _drop_reference_copy(model)
    return result


def _cut_answers_without_turn_end(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> Dataset:
    """TRL renders every conversational completion with the template's end-of-turn; an answer cut at
    max_tokens never had one. Done on TRL's tokenized rows, after its own preparation (so reference
    log-probs must not be precomputed before this)."""
    if "finished" not in dataset.column_names:
        return dataset

    def strip(row: dict[str, Any]) -> dict[str, Any]:
        if not row["finished"]:
            row["completion_ids"] = without_turn_end(row["completion_ids"], tokenizer)
        return row

    dataset = dataset.map(strip).remove_columns("finished")
    if "KL_completion_ids" in dataset.column_names:  # TRL's mismatched pairs (loss "kto"): rebuild from the new ids

        def rotate(rows: dict[str, list[Any]]) -> dict[str, list[Any]]:
            rows["KL_completion_ids"] = [rows["completion_ids"][-1], *rows["completion_ids"][:-1]]
            return rows

        dataset = dataset.map(rotate, batched=True, batch_size=batch_size)
    return dataset


def train_dpo(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Dataset,
    tuning: TuningSettings,
    device: torch.device,
    output_dir: Path,
    report: Progress,
    *,
    continued: bool = False,
) -> PhaseResult:
    args = DPOConfig(**_common_args(tuning, device, output_dir / "dpo", continued=continued))
    callback = _ProgressCallback("dpo", report)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer, callbacks=[callback])
    result = _run(trainer, "dpo", callback)
    _drop_reference_copy(model)
    return result


def save_adapter(model: PeftModel, directory: Path) -> None:
    """Only the trained adapter, only safetensors."""
    model.save_pretrained(directory, selected_adapters=["default"], safe_serialization=True)
