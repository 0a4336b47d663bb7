"""Small builders the tests share."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from serving.adapters.store import LoRAWeights, read_version, write_version
from serving.engine.adapter_slots import AdapterSlots
from serving.engine.kv_cache import KVCache
from serving.engine.lora import SERVABLE_MODULES
from serving.engine.model import LeanLlama, PrefillChunk, StepBatch


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


def stored_random_adapter(
    model_dir: Path, tmp_path: Path, number: int, targets: tuple[str, ...]
) -> tuple[Path, LoRAWeights]:
    """A random adapter of rank 4 x `number` (seed `number`) as PEFT saves it, and as the server reads it back from
    the store (`default@number` under tmp_path/store): the saved dir and the verified weights."""
    source = make_random_adapter(model_dir, tmp_path / f"src{number}", rank=4 * number, targets=targets, seed=number)
    stored = write_version(tmp_path / "store", "default", number, source)
    weights = read_version(
        tmp_path / "store", stored.relative_path, stored.sha256, max_rank=32, allowed_modules=SERVABLE_MODULES
    )
    return source, weights


def make_tiny_model(tokenizer_dir: Path, out_dir: Path) -> Path:
    """A 2-layer random Llama with the tokenizer (and chat template) of `tokenizer_dir`: the tests' `tiny_model_dir`
    fixture, and runs outside pytest (`bench/load.py`)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def greedy_reference(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Exactly `n` greedy tokens from transformers' own `generate`: what an engine's output is held against."""
    out = model.generate(
        torch.tensor([prompt], device=model.device), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


def publish_adapter(
    database_url: str,
    adapter_dir: Path,
    source: Path,
    *,
    number: int,
    base_model_id: str,
    alias: str = "default",
    promote: bool = True,
    actor: str = "admin",
    tamper: bool = False,
) -> int:
    """What a tuning round does at its end: write a saved adapter into the store, register it (rank, alpha
    and targets read from its adapter_config.json) and promote it. `tamper` flips a byte of the stored
    weights after hashing, so the registry's sha256 no longer matches. Returns the version id."""
    import json

    from feedback import adapter_registry
    from feedback.db import make_sync_engine, session_scope
    from feedback.models import AdapterVersion
    from serving.adapters.store import write_version

    stored = write_version(adapter_dir, alias, number, source)
    if tamper:
        weights = adapter_dir / stored.relative_path / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
    config = json.loads((source / "adapter_config.json").read_text())
    engine = make_sync_engine(database_url)
    try:
        with session_scope(engine) as session:
            version = adapter_registry.register_version(
                session,
                AdapterVersion(
                    adapter_name=alias,
                    version=number,
                    path=stored.relative_path,
                    sha256=stored.sha256,
                    base_model_id=base_model_id,
                    rank=int(config["r"]),
                    alpha=float(config["lora_alpha"]),
                    target_modules=sorted(config["target_modules"]),
                ),
            )
            if promote:
                adapter_registry.promote(session, version.id, actor=actor)
            return version.id
    finally:
        engine.dispose()


def step_logits(
    lean: LeanLlama,
    cache: KVCache,
    adapters: AdapterSlots,
    rows: list[tuple[int, list[int], int]],
    adapter_slot: int = 0,
) -> torch.Tensor:
    """One step over `rows` = (KV slot, new tokens, cached positions before them): the last token's logits of each.

    A row with one new token is a decode row, the others prompt chunks (decode rows first, as the engine
    orders them). Every token uses the adapter in `adapter_slot` (0: the base model)."""
    decode = [r for r in rows if len(r[1]) == 1 and r[2] > 0]
    chunks = [r for r in rows if r not in decode]
    tokens: list[int] = []
    positions: list[int] = []
    prefills, last = [], []
    for _slot, new, start in decode:
        last.append(len(tokens))
        tokens += new
        positions.append(start)
    for slot, new, start in chunks:
        prefills.append(PrefillChunk(slot, start, len(new), len(tokens)))
        tokens += new
        positions += range(start, start + len(new))
        last.append(len(tokens) - 1)
    batch = StepBatch(
        token_ids=torch.tensor(tokens),
        positions=torch.tensor(positions),
        decode_slots=[slot for slot, _, _ in decode],
        decode_lengths=[start + 1 for _, _, start in decode],
        prefills=prefills,
        logits_rows=torch.tensor(last),
        adapters=adapters.plan([adapter_slot] * len(tokens), decode_rows=len(decode)),
    )
    logits = lean.forward(batch, cache, adapters)
    for slot, new, start in rows:
        cache.mark_written(slot, start + len(new))
    return logits.float()
