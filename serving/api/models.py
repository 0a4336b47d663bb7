"""`GET /v1/models`: the base model, every alias, and every servable version, in OpenAI's list format."""

from __future__ import annotations

from litestar import Controller, get
from sqlalchemy.ext.asyncio import AsyncSession

from feedback import adapter_registry
from feedback.models import VersionStatus
from serving.adapters.manager import AdapterManager
from serving.api.schemas import ModelCard, ModelList

HIDDEN = {VersionStatus.FAILED, VersionStatus.REJECTED}


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["models"]

    @get("/", summary="List models: base, adapter aliases (`default`) and versions (`default@3`)")
    async def list_models(self, db_session: AsyncSession, adapters: AdapterManager) -> ModelList:
        versions = await db_session.run_sync(lambda s: adapter_registry.list_versions(s))
        aliases = await db_session.run_sync(adapter_registry.list_aliases)
        base = adapters.base.label
        cards = [ModelCard(id=base, created=0, owned_by="loraloop", root=base)]
        for alias in aliases:
            served = adapters.aliases.get(alias.name)
            cards.append(
                ModelCard(
                    id=alias.name,
                    created=int(alias.created_at.timestamp()),
                    owned_by="loraloop",
                    root=served.label if served else base,
                    parent=base,
                    status="alias",
                )
            )
        for version in versions:
            if version.status in HIDDEN:
                continue
            cards.append(
                ModelCard(
                    id=version.label,
                    created=int(version.created_at.timestamp()),
                    owned_by="loraloop",
                    root=version.path,
                    parent=version.adapter_name,
                    status=version.status,
                )
            )
        return ModelList(data=cards)
