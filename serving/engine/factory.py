"""Which engine serves: built once from Settings at start-up (`build_runtime`)."""

from __future__ import annotations

import structlog
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from serving.engine.batched import BatchedEngine
from serving.engine.model import UnsupportedModel
from serving.engine.simple import SimpleEngine
from serving.engine.types import Engine
from serving.response_cache import CachingEngine, ResponseCache
from serving.settings import Settings

log = structlog.get_logger(__name__)


def build_engine(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings) -> Engine:
    """The batched engine for Llama-family models (the simple one otherwise), behind the response cache if on."""
    engine: Engine | None = None
    if settings.engine == "batched":
        try:
            engine = BatchedEngine(
                model,
                tokenizer,
                max_loaded_adapters=settings.max_loaded_adapters,
                max_lora_rank=settings.max_lora_rank,
                max_running=settings.max_running_sequences,
                max_batched_tokens=settings.max_batched_tokens,
                max_waiting=settings.max_waiting_requests,
                max_context=settings.max_context_tokens,
                threads=settings.engine_threads,
                merge_after_steps=settings.merge_adapter_after_steps,
                q4_small_steps=settings.q4_small_steps,
                cpu_kernels=settings.cpu_kernels,
                prefix_cache_bytes=settings.prefix_cache_mib * 2**20,
            )
        except UnsupportedModel as exc:
            log.warning("the batched engine cannot run this model; serving one request at a time", reason=str(exc))
    if engine is None:
        engine = SimpleEngine(
            model,
            tokenizer,
            max_loaded_adapters=settings.max_loaded_adapters,
            max_lora_rank=settings.max_lora_rank,
            max_waiting=settings.max_waiting_requests,
        )
    if settings.response_cache_entries:
        engine = CachingEngine(engine, ResponseCache(settings.response_cache_entries))
    return engine
