"""`POST /v1/chat/completions`: OpenAI-compatible, streaming or not."""

from __future__ import annotations

from litestar import Controller, Response, post
from litestar.response import ServerSentEvent

from feedback.callers import Caller
from serving.api.schemas import ChatCompletion, ChatCompletionRequest
from serving.completions import ChatService

VERSION_HEADER = "x-loraloop-adapter-version"


class ChatController(Controller):
    path = "/v1/chat/completions"
    tags = ["chat"]

    @post(
        "/",
        summary="Create a chat completion",
        description="The response `id` is what feedback refers to; `system_fingerprint` names the adapter "
        "version that answered (`default@3`, or the base model).",
        status_code=200,
        responses={},
    )
    async def create(
        self, data: ChatCompletionRequest, chat: ChatService, caller: Caller
    ) -> Response[ChatCompletion] | ServerSentEvent:
        data.check_limits()
        if data.stream:
            events, target = await chat.stream(data, caller)
            return ServerSentEvent(events, headers={VERSION_HEADER: target.label})
        completion, target = await chat.complete(data, caller)
        return Response(completion, headers={VERSION_HEADER: target.label})
