"""The simple engine: one sequence at a time on a dedicated thread, any adapter per request.

Model work runs on its own thread so the event loop keeps serving HTTP. Adapter loads and unloads
are queued behind the sequences already waiting, so a request always finishes on the adapter it
started with. Continuous batching replaces the scheduling here without changing the interface.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from serving.adapters.store import LoRAWeights
from serving.engine.cpu_threads import claim_cores
from serving.engine.detokenizer import IncrementalDetokenizer
from serving.engine.lora import BASE_SLOT, LoRASlots
from serving.engine.sampling import make_generator, sample_token
from serving.engine.types import EngineOverloaded, GenerationChunk, GenerationRequest

log = structlog.get_logger(__name__)


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return frozenset(ids)


@dataclass
class _Sequence:
    request: GenerationRequest
    emit: Callable[[GenerationChunk | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Command:
    run: Callable[[], Any]
    done: Callable[[Any, BaseException | None], None]


_STOP = object()


class SimpleEngine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_loaded_adapters: int = 8,
        max_lora_rank: int = 32,
        max_waiting: int = 256,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = model.device
        self.lora = LoRASlots(model, num_slots=max_loaded_adapters, max_rank=max_lora_rank)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.max_waiting = max_waiting
        self._max_loaded = max_loaded_adapters
        self._slot_of: dict[str, int] = {}
        self._free_slots = list(range(max_loaded_adapters, BASE_SLOT, -1))
        self._work: queue.Queue[_Sequence | _Command | object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._running = 0

    # -- interface -------------------------------------------------------------------------
    @property
    def loaded_adapters(self) -> frozenset[str]:
        return frozenset(self._slot_of)

    @property
    def max_loaded_adapters(self) -> int:
        return self._max_loaded

    @property
    def waiting(self) -> int:
        return self._work.qsize()

    @property
    def running(self) -> int:
        return self._running

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="loraloop-engine", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        if self._thread is not None:
            self._work.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._work.qsize() >= self.max_waiting:
            raise EngineOverloaded(f"{self._work.qsize()} requests are already waiting")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[GenerationChunk | BaseException] = asyncio.Queue()
        sequence = _Sequence(request, emit=lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item))
        self._work.put(sequence)
        try:
            while True:
                item = await chunks.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            sequence.cancelled.set()  # a no-op when finished; frees the sequence when the client left

    async def load_adapter(self, key: str, weights: LoRAWeights) -> None:
        await self._call(lambda: self._load(key, weights))

    async def unload_adapter(self, key: str) -> None:
        await self._call(lambda: self._unload(key))

    # -- worker thread ---------------------------------------------------------------------
    async def _call(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            def settle() -> None:
                if future.cancelled():
                    return
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(result)

            loop.call_soon_threadsafe(settle)

        self._work.put(_Command(fn, done))
        return await future

    def _load(self, key: str, weights: LoRAWeights) -> None:
        if key in self._slot_of:
            return
        if not self._free_slots:
            raise EngineOverloaded(f"all {self._max_loaded} adapter slots are in use")
        slot = self._free_slots.pop()
        try:
            self.lora.fill(slot, weights)
        except BaseException:
            self._free_slots.append(slot)
            raise
        self._slot_of[key] = slot
        log.info("adapter loaded", adapter=key, slot=slot)

    def _unload(self, key: str) -> None:
        slot = self._slot_of.pop(key, None)
        if slot is not None:
            self.lora.clear(slot)
            self._free_slots.append(slot)
            log.info("adapter unloaded", adapter=key, slot=slot)

    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        claim_cores()
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            if isinstance(item, _Command):
                try:
                    item.done(item.run(), None)
                except BaseException as exc:  # handed to the awaiting coroutine
                    item.done(None, exc)
            elif isinstance(item, _Sequence):
                self._running = 1
                try:
                    self._run_sequence(item)
                except BaseException as exc:
                    log.exception("generation failed", request_id=item.request.request_id)
                    item.emit(exc)
                finally:
                    self._running = 0

    def _run_sequence(self, sequence: _Sequence) -> None:
        request, params = sequence.request, sequence.request.sampling
        if request.adapter_key is None:
            slot = BASE_SLOT
        elif request.adapter_key in self._slot_of:
            slot = self._slot_of[request.adapter_key]
        else:
            raise KeyError(f"adapter {request.adapter_key!r} is not loaded")
        self.lora.rows.slots = slot
        generator = make_generator(params, self.device)
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        cache = DynamicCache()
        input_ids = torch.tensor([request.prompt_token_ids], device=self.device)
        prompt_tokens = len(request.prompt_token_ids)
        finish: str | None = None
        generated = 0
        with torch.inference_mode():
            while finish is None:
                if sequence.cancelled.is_set():
                    finish = "cancelled"
                    break
                out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
                token = sample_token(out.logits[0, -1], params, generator)
                generated += 1
                if token in self.eos_ids:
                    finish = "stop"
                    break
                text = detokenizer.add(token)
                if detokenizer.stopped:
                    finish = "stop"
                elif generated >= params.max_tokens:
                    finish = "length"
                if text:
                    sequence.emit(GenerationChunk(text=text, token_ids=[token]))
                input_ids = torch.tensor([[token]], device=self.device)
        tail = detokenizer.flush() if finish != "cancelled" else ""
        sequence.emit(
            GenerationChunk(
                text=tail,
                finish_reason=finish,  # type: ignore[arg-type]
                prompt_tokens=prompt_tokens,
                completion_tokens=generated,
            )
        )
