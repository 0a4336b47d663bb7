"""How a tuning round trains: the recipe, read from `LORALOOP_TUNING_*` or `--tuning-*` options.

Defaults follow the calibration on the bundled model (KTO + LoRA, simulated raters): rank 16 on all
projections, 2 epochs. lr 2e-4 over one epoch on 300 ratings won the rater and broke the model, 5e-5 on
attention only moved nothing; 1.5e-4 moved a preference 23 % → 47 % keeping factual answers, but in
`bench/adaptation.py` only +13 points in a round. At 3e-4 (2 epochs, a quarter of the feedback held out)
the bench's rounds gained +47 (one round), +61 (two, the first refused by the gate for answering in
French) and, as shipped here, +75 points (three, the first refused), factual probes 97-100 % after each
promotion: the gate, not a timid lr, is what keeps a round from harm.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class TuningSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORALOOP_TUNING_", extra="ignore")

    learning_rate: float = Field(3e-4, gt=0, le=1e-2, description="AdamW learning rate for a fresh LoRA.")
    # A fresh LoRA starts with B = 0, so its first steps barely move the model; a parent's A and B both
    # carry gradient from the first step. At the same lr, continued rounds drifted 5-9x further (probe KL
    # 0.075-0.124 against 0.014) and broke factual answers, so they take smaller steps.
    continued_learning_rate: float = Field(
        1.5e-4, gt=0, le=1e-2, description="AdamW learning rate when a round continues the active adapter."
    )
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
    # "kto" estimates its reference point z from a second forward pass of policy and reference over mismatched
    # (prompt, answer) pairs; "apo_zero_unpaired" (TRL's other KTO loss) anchors at z = 0 and skips that pass.
    # With z = 0 they are the same loss (z is clamped at 0 and carries no gradient); skipping the pass makes
    # a step 40 % cheaper: 10.7 s against 17.7 s (batch 8, ~190 tokens, bf16 autocast, this 2-core CPU).
    kto_loss: Literal["kto", "apo_zero_unpaired"] = Field(
        "apo_zero_unpaired", description="TRL KTOTrainer loss_type for thumbs."
    )
    max_length: int = Field(512, ge=32, description="Prompt plus answer tokens per training row.")
    min_ratings: int = Field(2, ge=1, description="A round with less new feedback than this is skipped.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto",
        description="auto: bf16 autocast on CUDA and on CPUs with bf16 in hardware (AVX512-BF16, AMX), else fp32.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train; auto picks CUDA when present.")
    seed: int = 0
    stale_run_minutes: float = Field(
        3.0, gt=0, description="A running round without a heartbeat for this long is marked failed (its process died)."
    )

    # Held-out slice and gate (tuning/gate.py)
    # With ~15 % thumbs-up, a fifth held out left ~10 liked answers for the gate's preference test: too few
    # for its z to tell a real gain from luck.
    heldout_fraction: float = Field(
        0.25, ge=0, lt=1, description="Share of each round's feedback kept out for the gate."
    )
    gate_min_heldout: int = Field(8, ge=2, description="Below this many held-out ratings, preference is not measured.")
    gate_min_z: float = Field(1.645, description="One-sided z the held-out win must reach (1.645: 95 %).")
    gate_max_kl: float = Field(
        0.35, gt=0, description="Drift budget: mean per-token KL(incumbent ‖ candidate) on probes."
    )
    gate_min_factual_accuracy: float = Field(0.9, ge=0, le=1, description="Share of factual probes to keep answering.")
    gate_probe_tokens: int = Field(32, ge=4, le=256, description="Answer length generated per probe.")
    gate_max_new_non_answers: int = Field(
        3,
        ge=0,
        description="Probe answers the candidate may turn into non-answers (a deflection, another language) "
        "beyond the incumbent's.",
    )
    # Canary (tuning/canary.py)
    canary_share: float = Field(
        0.3,
        ge=0,
        le=1,
        description="Share of an alias's traffic a passing candidate serves first (0: promote at once).",
    )
    canary_min_ratings: int = Field(20, ge=1, description="Ratings on canary answers before any decision.")
    canary_max_ratings: int = Field(200, ge=1, description="Decide on the posterior means after this many.")
    canary_confidence: float = Field(0.95, gt=0.5, lt=1, description="Posterior probability a promotion needs.")
    # Stricter than promotion: the decision is re-checked after every rating, and at 0.95 an equally good canary
    # was rolled back 8 times in 40 simulated streams (0.99: 4 in 40), wasting the round's feedback.
    canary_rollback_confidence: float = Field(
        0.99, gt=0.5, lt=1, description="Posterior probability of a drop beyond the margin that rolls back."
    )
    canary_margin: float = Field(0.05, ge=0, lt=1, description="'Not worse' tolerance on the up-rate.")
    # Schedule (tuning/schedule.py)
    schedule_enabled: bool = Field(True, description="Servers start rounds by themselves.")
    schedule_check_seconds: float = Field(15.0, gt=0, description="How often a server checks whether a round is due.")
    schedule_interval_seconds: float = Field(
        600.0, ge=0, description="Least time between the start of one round of an alias and the next."
    )
    schedule_min_feedback: int = Field(50, ge=1, description="New ratings + comparisons an alias needs for a round.")
    lock_ttl_seconds: float = Field(90.0, gt=5, description="The round lock expires this long after its last renewal.")
    # A server's own rounds share its machine: at equal priority, the requests in flight when a round started
    # (48 in one benchmark run on 2 cores) took a minute to finish beside the round's start.
    scheduled_niceness: int = Field(
        10, ge=0, le=19, description="Nice value added to rounds a server starts, so its requests get the CPU first."
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
