"""Recording completions: the answers feedback refers to."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy.orm import Session

from feedback.callers import Caller
from feedback.errors import CompletionNotFound, NotYourCompletion
from feedback.models import Completion


@dataclass(frozen=True)
class CompletionRecord:
    id: str
    caller: str
    tenant: str | None
    end_user: str | None
    model_requested: str
    adapter_alias: str | None
    adapter_version_id: int | None
    served_by: str
    prompt_messages: list[dict[str, Any]]
    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    sampling: dict[str, Any]
    latency_ms: float
    time_to_first_token_ms: float | None


def record_completion(session: Session, record: CompletionRecord) -> None:
    """Store one completion; the caller commits before the response completes."""
    session.add(Completion(**asdict(record)))


def get_completion_for(session: Session, completion_id: str, caller: Caller, *, param: str) -> Completion:
    """The completion, if it exists and this caller received it (an admin may see any)."""
    completion = session.get(Completion, completion_id)
    if completion is None:
        raise CompletionNotFound(f"no completion with id {completion_id!r}", param=param)
    if not caller.may_rate(completion.caller, completion.tenant):
        raise NotYourCompletion(f"completion {completion_id!r} was not answered to you", param=param)
    return completion
