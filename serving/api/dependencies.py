"""Values the handlers receive by name through Litestar's dependency injection."""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide

from feedback.callers import Caller
from serving.adapters.manager import AdapterManager
from serving.api.auth import caller_of
from serving.completions import ChatService


def provide_caller(request: Request[Any, Any, Any]) -> Caller:
    return caller_of(request)


def provide_chat(state: State) -> ChatService:
    return state.chat


def provide_adapters(state: State) -> AdapterManager:
    return state.adapters


DEPENDENCIES = {
    "caller": Provide(provide_caller, sync_to_thread=False),
    "chat": Provide(provide_chat, sync_to_thread=False),
    "adapters": Provide(provide_adapters, sync_to_thread=False),
}
