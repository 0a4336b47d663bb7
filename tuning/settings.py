"""How a tuning round trains: the recipe, read from `LORALOOP_TUNING_*` or `--tuning-*` options.

Defaults follow the calibration on the bundled model (KTO + LoRA, simulated raters): lr 1.5e-4,
rank 16 on all projections, 2 epochs moved a preference without breaking factual answers, where
lr 2e-4 over one epoch on 300 ratings won the rater and broke the model, and 5e-5 on attention
only moved nothing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TuningSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORALOOP_TUNING_", extra="ignore")

    learning_rate: float = Field(1.5e-4, gt=0, le=1e-2, description="AdamW learning rate for the LoRA weights.")
    epochs: float = Field(2.0, gt=0, le=20, description="Passes over the round's data.")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps (-1: run the epochs).")
    batch_size: int = Field(
        8, ge=2, le=256, description="Per-device batch; KTO's KL estimate needs at least 2, 4+ is better."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, le=64)
    lora_rank: int = Field(16, ge=1, le=256)
    lora_alpha: float = Field(32.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: list(ALL_PROJECTIONS))
    beta: float = Field(0.1, gt=0, description="KTO/DPO beta: how strongly the reference anchors the policy.")
    max_length: int = Field(512, ge=32, description="Prompt plus answer tokens per training row.")
    min_ratings: int = Field(2, ge=1, description="A round with less new feedback than this is skipped.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA and on CPUs with native bf16 (about 1.6× faster here), else fp32.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; auto picks CUDA when present.")
    seed: int = 0
    stale_run_minutes: float = Field(
        30.0, gt=0, description="A running round without a heartbeat for this long is marked failed."
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _split_comma_list(cls, value: object) -> object:
        if isinstance(value, str) and not value.lstrip().startswith("["):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _targets_are_projections(self) -> TuningSettings:
        unknown = set(self.target_modules) - set(ALL_PROJECTIONS)
        if unknown or not self.target_modules:
            raise ValueError(
                f"target_modules must be a non-empty subset of {list(ALL_PROJECTIONS)} (got {self.target_modules}); "
                "the server can only apply LoRA to these layers"
            )
        return self
