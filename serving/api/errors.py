"""One mapping from every error to the OpenAI error JSON `{"error": {message, type, param, code}}`.

Handlers never build error bodies themselves: they raise, and this module answers. Client mistakes
are 4xx with the offending parameter named; anything unexpected is a logged 500 without internals.
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.spec import Components, OpenAPI, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Reference, Schema
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from feedback.errors import FeedbackError
from serving.adapters.manager import AdapterUnavailable, UnknownModel
from serving.engine.types import EngineOverloaded

log = structlog.get_logger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


# OpenAI's codes where it has one; otherwise the type doubles as the code.
_CODES = {401: "invalid_api_key", 403: "permission_denied", 413: "request_too_large"}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def error_response(status: int, message: str, *, code: str | None = None, param: str | None = None) -> Response[Any]:
    return Response(
        {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}},
        status_code=status,
        media_type=MediaType.JSON,
    )


_MSGSPEC_PATH = re.compile(r" - at `\$\.?([^`]*)`")
_MSGSPEC_FIELD = re.compile(r"(?:missing required|unknown) field `([^`]*)`")


def _param_of_validation(exc: ValidationException) -> tuple[str, str | None]:
    """Name the offending parameter from msgspec's message, e.g.
    "Expected `int`, got `str` - at `$.max_tokens`" or "Object missing required field `messages`"."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict) and item.get("message"):
            message = str(item["message"])
            at = _MSGSPEC_PATH.search(message)
            key = item.get("key") if item.get("key") not in (None, "", "body", "data") else None
            path = (key or (at.group(1) if at else "")).replace("[", ".").replace("]", "")
            field = _MSGSPEC_FIELD.search(message)
            parts = [p for p in (path, field.group(1) if field else "") if p]
            param = ".".join(parts) or None
            clean = message.split(" - at ")[0]
            if field and message.startswith("Object contains unknown field"):
                clean = f"unsupported parameter `{param}`: this server does not implement it"
            return (f"{param}: {clean}" if param and not field else clean), param
    return exc.detail or "invalid request", None


def _answer(
    request: Request[Any, Any, Any], status: int, message: str, *, code: str | None = None, param: str | None = None
) -> Response[Any]:
    """The error response, counted in the app's metrics."""
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(str(status), code or "").inc()
    return error_response(status, message, code=code, param=param)


def handle_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    message, param = _param_of_validation(exc)
    return _answer(request, 400, message, code="invalid_value" if param else "invalid_request", param=param)


def handle_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    if status >= 500:
        log.error("server error", status=status, detail=exc.detail)
        return _answer(request, status, "the server could not handle this request", code="server_error")
    message = exc.detail or "bad request"
    if status == 413:
        limit = request.route_handler.resolve_request_max_body_size()
        message = f"the request body is larger than this server's limit of {limit} bytes"
    response = _answer(request, status, message, code=_CODES.get(status) or _TYPES.get(status, "invalid_request"))
    if exc.headers:
        response.headers.update(exc.headers)  # e.g. WWW-Authenticate on a 401
    return response


def handle_api_error(request: Request[Any, Any, Any], exc: APIError) -> Response[Any]:
    return _answer(request, exc.status, exc.message, code=exc.code, param=exc.param)


def handle_feedback_error(request: Request[Any, Any, Any], exc: FeedbackError) -> Response[Any]:
    return _answer(request, exc.status_code, str(exc), code=exc.code, param=exc.param)


def handle_unknown_model(request: Request[Any, Any, Any], exc: UnknownModel) -> Response[Any]:
    return _answer(request, 404, str(exc), code="model_not_found", param="model")


def handle_adapter_unavailable(request: Request[Any, Any, Any], exc: AdapterUnavailable) -> Response[Any]:
    return _answer(request, 503, str(exc), code="adapter_unavailable", param="model")


def handle_overloaded(request: Request[Any, Any, Any], exc: EngineOverloaded) -> Response[Any]:
    response = _answer(request, 429, f"the server is busy: {exc}; retry shortly", code="overloaded")
    response.headers["retry-after"] = "1"
    return response


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error", path=request.url.path, error=type(exc).__name__)
    return _answer(request, HTTP_500_INTERNAL_SERVER_ERROR, "internal server error", code="server_error")


EXCEPTION_HANDLERS: dict[type[Exception] | int, Any] = {
    ValidationException: handle_validation,
    HTTPException: handle_http,
    APIError: handle_api_error,
    FeedbackError: handle_feedback_error,
    UnknownModel: handle_unknown_model,
    AdapterUnavailable: handle_adapter_unavailable,
    EngineOverloaded: handle_overloaded,
    Exception: handle_unexpected,
}


def _error_schema() -> Schema:
    nullable_string = Schema(one_of=[Schema(type=OpenAPIType.STRING), Schema(type=OpenAPIType.NULL)])
    body = Schema(
        type=OpenAPIType.OBJECT,
        required=["message", "type", "param", "code"],
        properties={
            "message": Schema(type=OpenAPIType.STRING),
            "type": Schema(type=OpenAPIType.STRING),
            "param": nullable_string,
            "code": nullable_string,
        },
    )
    return Schema(type=OpenAPIType.OBJECT, required=["error"], properties={"error": body}, description="OpenAI error")


def document_errors(openapi: OpenAPI, public_paths: list[str]) -> None:
    """Write the one error shape into the OpenAPI document: every operation answers it for any non-2xx
    status (`default`, replacing Litestar's own 400 shape, which this app never sends), and the
    routes in `public_paths` (regexes) need no credentials."""
    components = openapi.components if isinstance(openapi.components, Components) else Components()
    openapi.components = components
    components.schemas = {**(components.schemas or {}), "Error": _error_schema()}
    error = OpenAPIResponse(
        description="OpenAI-shaped error: 4xx for the client's input (`param` names it), 5xx for the server's",
        content={MediaType.JSON: OpenAPIMediaType(schema=Reference(ref="#/components/schemas/Error"))},
    )
    for path, item in (openapi.paths or {}).items():
        public = any(re.search(pattern, path) for pattern in public_paths)
        for method in ("get", "put", "post", "delete", "patch"):
            operation = getattr(item, method, None)
            if operation is None:
                continue
            responses = operation.responses or {}
            responses.pop("400", None)
            responses["default"] = error
            operation.responses = responses
            if public:
                operation.security = []
