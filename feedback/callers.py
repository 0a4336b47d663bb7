"""Who is asking: the identity every completion, rating and comparison is recorded against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["admin", "user"]


@dataclass(frozen=True)
class Caller:
    id: str  # an API key's id, or "local" in the keyless laptop mode
    role: Role
    tenant: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


# The embedded default: one trusted person on their own machine (refused on non-loopback addresses).
LOCAL_CALLER = Caller(id="local", role="admin")
