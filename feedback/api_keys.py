"""API keys: issued once, stored as a sha256 digest, looked up by their public id, revocable.

A token reads `ll_<id>_<secret>`: the id (12 hex characters) is public — it is what `loraloop keys
list` shows and what completions and ratings are recorded against — and the secret is 256 random
bits. Because the secret is that long, one fast hash is enough (as GitHub and Stripe do for their
tokens); a slow password hash would only slow every request. The digest is compared in constant
time, so timing does not tell how much of a guessed token was right.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import get_args

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.callers import Caller, Role
from feedback.models import ApiKey, utcnow

TOKEN_PREFIX = "ll"
_TOKEN = re.compile(rf"^{TOKEN_PREFIX}_([0-9a-f]{{12}})_([A-Za-z0-9_-]{{43}})$")
TENANT = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_NAME_CHARS = 128


class ApiKeyError(ValueError):
    """A key cannot be created or changed as asked; the message says why."""


class UnknownKey(ApiKeyError):
    pass


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def key_id_of(token: str) -> str | None:
    """The public id inside a well-formed token, or None for anything else."""
    match = _TOKEN.match(token)
    return match.group(1) if match else None


def create_key(session: Session, role: str, *, tenant: str | None = None, name: str = "") -> tuple[ApiKey, str]:
    """A new key and its token; the token exists only in the return value (it is never stored)."""
    if role not in get_args(Role):
        raise ApiKeyError(f"role must be one of {', '.join(get_args(Role))}, not {role!r}")
    if tenant is not None and not TENANT.match(tenant):
        raise ApiKeyError("tenant must be 1-64 letters, digits, '.', '_' or '-'")
    if role == "admin" and tenant is not None:
        # An admin acts on every tenant's data (export, promote); a tenant on it would promise a scope it lacks.
        raise ApiKeyError("admin keys are global: give --tenant only with --role user")
    if len(name) > MAX_NAME_CHARS:
        raise ApiKeyError(f"name is at most {MAX_NAME_CHARS} characters")
    key_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKey(id=key_id, token_sha256=token_digest(token), role=role, tenant=tenant, name=name)
    session.add(row)
    session.flush()
    return row, token


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def has_active_key(session: Session) -> bool:
    return session.scalar(select(ApiKey.id).where(ApiKey.revoked_at.is_(None)).limit(1)) is not None


def revoke_key(session: Session, key_id: str) -> ApiKey:
    """Revoke a key (idempotent); its past completions and ratings stay attributed to it."""
    row = session.get(ApiKey, key_id)
    if row is None:
        raise UnknownKey(f"no API key with id {key_id!r} (see `loraloop keys list`)")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def caller_for_token(session: Session, token: str) -> Caller | None:
    """The Caller a token authenticates as, or None when it is malformed, unknown or revoked."""
    key_id = key_id_of(token)
    if key_id is None:
        return None
    row = session.get(ApiKey, key_id)
    # Compare digests even for an unknown id, so an unknown id and a wrong secret take the same time.
    stored = row.token_sha256 if row is not None else "0" * 64
    if not hmac.compare_digest(token_digest(token), stored) or row is None or row.revoked_at is not None:
        return None
    return Caller(id=row.id, role=row.role, tenant=row.tenant)  # type: ignore[arg-type]
