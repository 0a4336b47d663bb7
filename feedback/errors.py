"""Domain errors of the feedback flow; the API maps each to an OpenAI-style error response."""

from __future__ import annotations


class FeedbackError(Exception):
    """Base: a client-visible problem with what was submitted."""

    status_code = 400
    code = "invalid_request"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class CompletionNotFound(FeedbackError):
    status_code = 404
    code = "completion_not_found"


class NotYourCompletion(FeedbackError):
    status_code = 403
    code = "forbidden"


class ConflictingFeedback(FeedbackError):
    status_code = 409
    code = "conflict"


class InvalidFeedback(FeedbackError):
    status_code = 400
    code = "invalid_value"
