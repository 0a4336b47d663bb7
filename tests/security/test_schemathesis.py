"""Schemathesis against the app's own OpenAPI schema (fetched from /schema with a key), in `keys` mode.

For every operation, valid and invalid generated requests: never a 5xx, every response matches the
schema (status, content type, body), invalid input is refused, and an operation that declares the
bearer scheme does not answer 2xx once the key is removed (`ignored_auth`). Tiny model, a short
context and a small example budget keep it to seconds per database.

Operations are driven with `APIOperation.as_strategy` rather than `schemathesis.pytest.from_fixture`,
whose fixture plumbing does not run on pytest 9 (it reads a private `_nodeid`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from litestar import Litestar
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.python import asgi
from schemathesis.schemas import APIOperation

from serving.api.app import build_runtime, create_app
from serving.settings import Settings
from tests.security.conftest import IssueKey, bearer

MAX_EXAMPLES = 12  # per operation and generation mode
ALWAYS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Valid requests: also, removing the key must turn a 2xx into a 401.
POSITIVE_CHECKS = [*ALWAYS, ignored_auth]
# Invalid bodies must be refused. Not applied to query strings and headers: unknown query parameters are
# ignored (as most HTTP APIs do), and the key is sent on every call, so "missing Authorization" never is.
NEGATIVE_BODY_CHECKS = [*ALWAYS, negative_data_rejection]
# Starting a tuning round launches a training process: not something to fire dozens of times here.
SKIPPED = {("POST", "/v1/admin/runs")}


@pytest.fixture
def fuzzed_app(keys_settings: Settings) -> Iterator[Litestar]:
    # A short context bounds how long any generated max_tokens can make the tiny model talk.
    small = keys_settings.model_copy(update={"max_context_tokens": 256, "default_max_tokens": 8})
    app = create_app(small, runtime=build_runtime(small))
    yield app
    asgi.shutdown_lifespans()  # schemathesis started the app's lifespan when it fetched the schema


def _fuzz(operation: APIOperation, mode: GenerationMode, token: str) -> None:
    negative = NEGATIVE_BODY_CHECKS if operation.body else ALWAYS
    checks = POSITIVE_CHECKS if mode == GenerationMode.POSITIVE else negative

    @given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis_settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call(headers=bearer(token))
        case.validate_response(response, checks=checks)

    with contextlib.suppress(Unsatisfiable):  # nothing in `GET /health` can be made invalid: no parameters
        run()


def test_api_matches_its_schema(fuzzed_app: Litestar, issue_key: IssueKey) -> None:
    admin = issue_key("admin")
    schema = schemathesis.openapi.from_asgi("/schema/openapi.json", fuzzed_app, headers=bearer(admin))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 16
    failures = []
    for operation in operations:
        if (operation.method.upper(), operation.path) in SKIPPED:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _fuzz(operation, mode, admin)
            except (Exception, BaseExceptionGroup) as failure:  # collect all: one run shows every broken operation
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {failure}")
    assert not failures, "\n\n".join(failures)
