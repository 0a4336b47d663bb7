"""The admin API: versions with live up-rates, promote and roll back, runs, JSONL export."""

from __future__ import annotations

import json
from pathlib import Path

from litestar.testing import AsyncTestClient

from feedback import tuning_runs
from feedback.db import make_sync_engine, session_scope
from feedback.models import RunStatus
from serving.settings import Settings
from tests.serving.test_hot_swap import _publish, _wait_for_fingerprint

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


async def _rate(client: AsyncTestClient, rating: int, **extra: object) -> str:
    completion = (await client.post("/v1/chat/completions", json=CHAT)).json()
    response = await client.post("/v1/feedback", json={"completion_id": completion["id"], "rating": rating} | extra)
    assert response.status_code == 200
    return completion["id"]


async def test_versions_carry_live_uprates_and_can_be_promoted_and_rolled_back(
    client: AsyncTestClient, settings: Settings, tiny_model_dir: Path, tmp_path: Path
) -> None:
    for rating in (1, 1, -1):
        await _rate(client, rating)
    _publish(settings, tiny_model_dir, tmp_path, 1)
    await _wait_for_fingerprint(client, "default@1")
    await _rate(client, -1)
    _publish(settings, tiny_model_dir, tmp_path, 2, promote=False)

    [alias] = (await client.get("/v1/admin/adapters")).json()
    assert alias["name"] == "default" and alias["active"] == "default@1" and alias["serving"] == "default@1"
    assert (alias["base"]["up"], alias["base"]["down"]) == (2, 1)
    assert 0 < alias["base"]["up_rate_low"] < 2 / 3 < alias["base"]["up_rate_high"] <= 1
    versions = {v["label"]: v for v in alias["versions"]}
    assert (versions["default@1"]["up"], versions["default@1"]["down"]) == (0, 1)
    assert versions["default@2"]["status"] == "candidate"

    promoted = await client.post("/v1/admin/adapters/default/promote", json={"version": 2})
    assert promoted.json() == {"alias": "default", "active": "default@2"}
    await _wait_for_fingerprint(client, "default@2")
    rolled = await client.post("/v1/admin/adapters/default/rollback")
    assert rolled.json() == {"alias": "default", "active": "default@1"}
    body = await _wait_for_fingerprint(client, "default@1")
    assert body["system_fingerprint"] == "default@1"
    missing = await client.post("/v1/admin/adapters/default/promote", json={"version": 9})
    assert missing.status_code == 404 and "error" in missing.json()

    series = (await client.get("/v1/admin/stats/uprate", params={"bucket_seconds": 60})).json()
    assert sum(p["up"] for p in series) == 2 and sum(p["down"] for p in series) == 2


async def test_runs_and_export(client: AsyncTestClient, settings: Settings) -> None:
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        run = tuning_runs.start_run(session, alias="default", trigger="manual", config={"lr": 1}, owner="test")
        tuning_runs.finish_run(session, run.id, RunStatus.SKIPPED, error="not enough")
    engine.dispose()
    [listed] = (await client.get("/v1/admin/runs")).json()
    assert listed["status"] == "skipped" and listed["seconds"] is not None
    assert (await client.get(f"/v1/admin/runs/{listed['id']}")).json()["id"] == listed["id"]
    assert (await client.get("/v1/admin/runs/999")).status_code == 404

    await _rate(client, 1, correction="A better answer.")
    await _rate(client, -1)
    raw = [json.loads(line) for line in (await client.get("/v1/admin/feedback/export")).text.splitlines()]
    assert sorted(r["rating"] for r in raw) == [-1, 1]
    kto = [json.loads(x) for x in (await client.get("/v1/admin/feedback/export?format=kto")).text.splitlines()]
    assert sorted(r["label"] for r in kto) == [False, True]
    assert kto[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    dpo = [json.loads(x) for x in (await client.get("/v1/admin/feedback/export?format=dpo")).text.splitlines()]
    assert len(dpo) == 1 and dpo[0]["chosen"] == [{"role": "assistant", "content": "A better answer."}]
