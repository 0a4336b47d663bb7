"""Who is calling, and what they may do. Route guards live here."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import PermissionDeniedException
from litestar.handlers import BaseRouteHandler

from feedback.callers import LOCAL_CALLER, Caller


def caller_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    """The Caller the authentication middleware put in the scope; the keyless local mode is the local admin."""
    caller = connection.scope.get("state", {}).get("caller")
    return caller if isinstance(caller, Caller) else LOCAL_CALLER


def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if not caller_of(connection).is_admin:
        raise PermissionDeniedException("this route needs an admin key")
