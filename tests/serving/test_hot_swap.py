"""Hot-swap through the registry: promotion is picked up without a restart, in-flight requests finish on
their version, pinned versions work, and a tampered version is refused while the alias keeps serving."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from litestar.testing import AsyncTestClient
from sqlalchemy import select

from feedback import adapter_registry
from feedback.db import make_sync_engine, session_scope
from feedback.models import AdapterVersion, Completion, VersionStatus
from serving.settings import Settings
from tests.helpers import make_random_adapter, publish_adapter

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Say something."}], "temperature": 0}


def _publish(
    settings: Settings, tiny_model_dir: Path, tmp_path: Path, number: int, *, promote: bool = True, tamper: bool = False
) -> int:
    source = make_random_adapter(tiny_model_dir, tmp_path / f"src{number}", rank=4, seed=number)
    return publish_adapter(
        settings.database_url,
        settings.adapters_path,
        source,
        number=number,
        base_model_id="tiny",
        promote=promote,
        tamper=tamper,
    )


async def _wait_for_fingerprint(client: AsyncTestClient, expected: str, timeout: float = 10) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body = (await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 3})).json()
        if body["system_fingerprint"] == expected or asyncio.get_running_loop().time() > deadline:
            return body
        await asyncio.sleep(0.1)


async def test_promotion_is_served_without_restart_and_inflight_finish_on_old(
    client: AsyncTestClient, settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    before = (await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 3})).json()
    base_label = before["system_fingerprint"]
    assert base_label != "default@1"

    # A long stream starts on the base, then a version is promoted while it generates.
    async with client.stream("POST", "/v1/chat/completions", json=CHAT | {"max_tokens": 60, "stream": True}) as stream:
        lines = stream.aiter_lines()
        first = json.loads((await anext(lines))[6:])
        _publish(settings, tiny_model_dir, tmp_path, 1)
        after = await _wait_for_fingerprint(client, "default@1")
        rest = [line async for line in lines if line.startswith("data: {")]
    assert after["system_fingerprint"] == "default@1"
    assert first["system_fingerprint"] == base_label
    assert all(json.loads(line[6:])["system_fingerprint"] == base_label for line in rest)

    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        served = {c.id: c.served_by for c in session.scalars(select(Completion))}
    engine.dispose()
    assert served[first["id"]] == base_label
    assert served[after["id"]] == "default@1"

    pinned = (await client.post("/v1/chat/completions", json=CHAT | {"model": "default@1", "max_tokens": 3})).json()
    assert pinned["system_fingerprint"] == "default@1"
    models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert "default@1" in models


async def test_tampered_version_is_refused_and_alias_keeps_serving(
    client: AsyncTestClient, settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    _publish(settings, tiny_model_dir, tmp_path, 1)
    await _wait_for_fingerprint(client, "default@1")
    bad = _publish(settings, tiny_model_dir, tmp_path, 2, tamper=True)
    await asyncio.sleep(1.0)  # several poll intervals
    body = await _wait_for_fingerprint(client, "default@1", timeout=2)
    assert body["system_fingerprint"] == "default@1"
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        version = session.get(AdapterVersion, bad)
        assert version.status == VersionStatus.FAILED and "hash" in version.status_reason
        assert adapter_registry.active_versions(session)["default"].version == 1
    engine.dispose()
    pinned_bad = await client.post("/v1/chat/completions", json=CHAT | {"model": "default@2"})
    assert pinned_bad.status_code == 503
