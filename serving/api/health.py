"""Operations: `/health` (alive), `/ready` (model loaded, database reachable), `/metrics` (Prometheus)."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Response, get
from litestar.datastructures import State
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from serving.api.errors import error_response
from serving.metrics import CONTENT_TYPE


class HealthController(Controller):
    tags = ["health"]

    @get("/health", summary="Liveness")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @get("/ready", summary="Readiness: model loaded and database reachable")
    async def ready(self, state: State, db_session: AsyncSession) -> Response[Any]:
        if not getattr(state, "ready", False):
            return error_response(503, "the model is still loading", code="not_ready")
        try:
            await db_session.execute(text("SELECT 1"))
        except Exception as exc:
            return error_response(503, f"database unreachable: {type(exc).__name__}", code="not_ready")
        return Response({"status": "ready", "model": state.adapters.base.label})

    @get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics(self, state: State) -> Response[bytes]:
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)
