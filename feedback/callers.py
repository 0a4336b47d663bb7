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

    def may_rate(self, answered_to: str, answered_tenant: str | None) -> bool:
        """Whether this caller may rate or compare a completion answered to key `answered_to` in `answered_tenant`.

        An admin may rate any; a key with a tenant, any completion of its tenant (keys of one tenant
        are one customer: a rotated key keeps its users' history); a key without one, only its own.
        """
        if self.is_admin:
            return True
        if self.tenant is not None:
            return answered_tenant == self.tenant
        return answered_to == self.id


# The embedded default: one trusted person on their own machine (refused on non-loopback addresses).
LOCAL_CALLER = Caller(id="local", role="admin")
