"""Small builders the tests share."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def make_random_adapter(
    model_dir: Path, out_dir: Path, *, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), seed: int = 1
) -> Path:
    """A LoRA with random (non-zero) A and B, saved the way PEFT saves trained adapters."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
