"""Who is calling, and what they may do: the authentication middleware, key verification and route guards.

Deny by default. In `keys` mode every route needs `Authorization: Bearer <key>` except the few in
PUBLIC_PATHS; in `local` mode (the laptop default, refused on non-loopback addresses by Settings)
every request is the local admin. Routes then ask for more with guards: `admin_guard` for the admin
API and the metrics.
"""

from __future__ import annotations

import time
from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from feedback.api_keys import caller_for_token, token_digest
from feedback.callers import LOCAL_CALLER, Caller
from serving.settings import Settings

# Answer without a key: liveness and readiness probes, and the web pages' own files (HTML, JS, CSS),
# which hold no data; the pages ask for a key when the API answers 401.
PUBLIC_PATHS = ["^/health$", "^/ready$", "^/$", "^/dashboard$", "^/static/"]
# Routes other modules define that need an admin: the metrics name every version and count every rating.
ADMIN_PATHS = frozenset({"/metrics"})
BEARER_SCHEME = "BearerAuth"
KEY_REQUIRED = "an API key is required: send `Authorization: Bearer <key>`"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="loraloop"'}
_MAX_CACHED_KEYS = 10_000


class KeyVerifier:
    """Turns a bearer token into a Caller, remembering good keys for `ttl_seconds`.

    The cache spares the database a read per request; the price is that a revoked key keeps working
    on a running server for up to `ttl_seconds` (LORALOOP_KEY_CACHE_SECONDS, 0 = always ask). Unknown
    and revoked keys are never cached, so a new key works at once. Entries are keyed by the token's
    digest, so the plaintext token is not kept in memory.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], ttl_seconds: float) -> None:
        self._sessions = sessions
        self._ttl = ttl_seconds
        self._cache: dict[str, tuple[float, Caller]] = {}

    async def caller_for(self, token: str) -> Caller | None:
        digest = token_digest(token)
        now = time.monotonic()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        async with self._sessions() as session:
            caller = await session.run_sync(caller_for_token, token)
        if caller is None:
            self._cache.pop(digest, None)
        elif self._ttl > 0:
            if len(self._cache) >= _MAX_CACHED_KEYS:
                self._cache.clear()  # a bound on memory, not an eviction policy: refills on the next requests
            self._cache[digest] = (now + self._ttl, caller)
        return caller


def bearer_token(header: str | None) -> str | None:
    """The token in `Authorization: Bearer <token>` (the scheme is case-insensitive), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyAuthentication(AbstractAuthenticationMiddleware):
    """`keys` mode: a valid, unrevoked API key or 401."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        token = bearer_token(connection.headers.get("authorization"))
        if token is None:
            raise NotAuthorizedException(KEY_REQUIRED, headers=CHALLENGE)
        verifier: KeyVerifier = connection.app.state.key_verifier
        caller = await verifier.caller_for(token)
        if caller is None:
            raise NotAuthorizedException("the API key is invalid or revoked", headers=CHALLENGE)
        return AuthenticationResult(user=caller, auth=caller.id)


class LocalAuthentication(AbstractAuthenticationMiddleware):
    """`local` mode: one trusted person on a loopback address, the local admin; any Authorization is ignored."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        return AuthenticationResult(user=LOCAL_CALLER, auth=None)


def authentication_middleware(settings: Settings) -> DefineMiddleware:
    middleware = KeyAuthentication if settings.auth == "keys" else LocalAuthentication
    return DefineMiddleware(middleware, exclude=PUBLIC_PATHS)


def caller_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Caller:
    """The Caller the authentication middleware put in the scope; none there is a 401, never a default identity."""
    caller = connection.scope.get("user")
    if not isinstance(caller, Caller):
        raise NotAuthorizedException(KEY_REQUIRED, headers=CHALLENGE)
    return caller


# Guards are async on purpose: Litestar hands a sync guard to a worker thread on every request.
async def admin_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if not caller_of(connection).is_admin:
        raise PermissionDeniedException("this route needs an admin key")


async def admin_paths_guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """App-wide guard for the ADMIN_PATHS that other modules own."""
    if connection.scope.get("path") in ADMIN_PATHS:
        await admin_guard(connection, handler)
