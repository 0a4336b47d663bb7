"""The OpenAI chat-completions wire format, as msgspec structs (validated on the way in, documented in OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

from serving.api.errors import APIError

MAX_MESSAGES = 256
MAX_MESSAGE_CHARS = 100_000
# All messages together: far past any context this server runs, and a bound on the tokenizer's work per request.
MAX_TOTAL_CHARS = 200_000
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
# The schema's ceiling; the real one is the context left after the prompt (a 400 naming the parameter).
MAX_TOKENS_CEILING = 2**31 - 1

# Ids and version numbers the client sends: bounded to what an INTEGER column holds, so a huge one is a 400
# (or a 404), never a database overflow.
DbInt = Annotated[int, Meta(ge=1, le=2**31 - 1)]
StopSequence = Annotated[str, Meta(min_length=1, max_length=MAX_STOP_CHARS)]
MaxTokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS_CEILING)]


class TextPart(Struct, forbid_unknown_fields=True):
    type: Literal["text"]
    text: Annotated[str, Meta(max_length=MAX_MESSAGE_CHARS)]


class ChatMessage(Struct, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Meta(max_length=MAX_MESSAGE_CHARS)] | list[TextPart] | None = None
    name: Annotated[str, Meta(max_length=64)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class ChatCompletionRequest(Struct, forbid_unknown_fields=True):
    """What `POST /v1/chat/completions` accepts. Fields OpenAI defines but we do not implement
    are accepted only at their neutral value, so a client is told instead of silently ignored."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    model: Annotated[str, Meta(min_length=1, max_length=160)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    stop: StopSequence | Annotated[list[StopSequence], Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=0.0, le=0.0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=0.0, le=0.0)] | None = None
    logprobs: Literal[False] | None = None
    metadata: dict[str, Annotated[str, Meta(max_length=512)]] | None = None
    store: bool | None = None

    def check_limits(self) -> None:
        """The limits one field's schema cannot say (raises APIError 400)."""
        total = sum(len(message.text()) for message in self.messages)
        if total > MAX_TOTAL_CHARS:
            raise APIError(
                400,
                f"the messages hold {total} characters together; the limit is {MAX_TOTAL_CHARS}",
                code="too_many_characters",
                param="messages",
            )

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class PromptTokensDetails(Struct):
    cached_tokens: int  # prompt tokens whose keys and values came from the prefix cache, not computed


class Usage(Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(Struct):
    role: Literal["assistant"]
    content: str


class Choice(Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(Struct):
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[Choice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"


class Delta(Struct, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(Struct):
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class ModelCard(Struct):
    id: str
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    status: str | None = None
    object: Literal["model"] = "model"


class ModelList(Struct):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ErrorBody(Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(Struct):
    error: ErrorBody


def sampling_dict(request: ChatCompletionRequest, max_tokens: int) -> dict[str, Any]:
    """The sampling parameters as recorded with the completion (for reproduction and training)."""
    return {
        "max_tokens": max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "seed": request.seed,
        "stop": list(request.stop_sequences()),
    }
