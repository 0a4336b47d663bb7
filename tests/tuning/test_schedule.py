"""The server's own schedule: enough new feedback starts a round in its own process; the candidate goes
to a canary; live ratings promote it (or roll it back), every decision recorded with its evidence."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from litestar.testing import AsyncTestClient
from sqlalchemy import select

from feedback import adapter_registry
from feedback.callers import LOCAL_CALLER
from feedback.completions import CompletionRecord, record_completion
from feedback.db import make_sync_engine, session_scope
from feedback.models import AdapterVersion, RegistryEvent, VersionStatus
from feedback.ratings import RatingInput, submit_rating
from serving.api.app import build_runtime, create_app
from serving.settings import Settings
from tests.serving.test_hot_swap import _publish
from tuning.schedule import AliasState, judge_canary
from tuning.settings import TuningSettings

SCHEDULED = TuningSettings(
    schedule_check_seconds=0.5,
    schedule_interval_seconds=0,
    schedule_min_feedback=6,
    canary_share=0.5,
    canary_min_ratings=6,
    max_steps=2,
    batch_size=4,
    learning_rate=1e-3,
    precision="fp32",
    max_length=128,
    gate_probe_tokens=4,
)


async def _wait(predicate, timeout: float = 180) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.5)


async def test_schedule_runs_a_round_and_the_canary_is_promoted_on_live_ratings(settings: Settings) -> None:
    app = create_app(settings, runtime=build_runtime(settings), tuning=SCHEDULED)
    async with AsyncTestClient(app, timeout=60) as client:
        for i in range(6):
            reply = (
                await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "default",
                        "messages": [{"role": "user", "content": f"Question {i}"}],
                        "max_tokens": 4,
                    },
                )
            ).json()
            await client.post("/v1/feedback", json={"completion_id": reply["id"], "rating": 1 if i % 2 else -1})

        async def canary_started() -> bool:
            [alias] = (await client.get("/v1/admin/adapters")).json()
            return alias["canary"] == "default@1"

        await _wait(canary_started)
        [run] = (await client.get("/v1/admin/runs")).json()
        assert run["trigger"] == "schedule" and run["status"] == "succeeded"

        # Live traffic: users split between the arms; canary answers are liked, incumbent ones are not.
        arms: dict[str, int] = {}
        for i in range(60):
            reply = (
                await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": "default",
                        "user": f"user-{i}",
                        "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 2,
                    },
                )
            ).json()
            arm = reply["system_fingerprint"]
            arms[arm] = arms.get(arm, 0) + 1
            rating = 1 if arm == "default@1" else -1
            await client.post("/v1/feedback", json={"completion_id": reply["id"], "rating": rating, "user": f"u{i}"})
            if arms.get("default@1", 0) >= 8 and len(arms) == 2:
                break
        assert len(arms) == 2  # both arms served

        async def promoted() -> bool:
            [alias] = (await client.get("/v1/admin/adapters")).json()
            return alias["active"] == "default@1" and alias["canary"] is None

        await _wait(promoted, timeout=30)
        events = (await client.get("/v1/admin/adapters/default/events")).json()
        actions = [(e["action"], e["actor"]) for e in reversed(events)]
        assert ("canary_start", "gate") in actions and ("promote", "canary") in actions
        promote_event = next(e for e in events if e["action"] == "promote")
        assert promote_event["evidence"]["canary_up"] >= 6 and "p_not_worse" in promote_event["evidence"]


def _answers(settings: Settings, served_by: str, ratings: list[int], prefix: str) -> None:
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        for i, rating in enumerate(ratings):
            record_completion(
                session,
                CompletionRecord(
                    id=f"{prefix}{i}",
                    caller="local",
                    tenant=None,
                    end_user=None,
                    model_requested="default",
                    adapter_alias="default",
                    adapter_version_id=None,
                    served_by=served_by,
                    prompt_messages=[{"role": "user", "content": "x"}],
                    answer="y",
                    finish_reason="stop",
                    prompt_tokens=1,
                    completion_tokens=1,
                    sampling={},
                    latency_ms=1,
                    time_to_first_token_ms=None,
                ),
            )
            session.flush()
            submit_rating(session, LOCAL_CALLER, RatingInput(f"{prefix}{i}", rating))
    engine.dispose()


def test_a_canary_that_does_worse_is_rolled_back(settings: Settings, tiny_model_dir: Path, tmp_path: Path) -> None:
    version_id = _publish(settings, tiny_model_dir, tmp_path, 1, promote=False)
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        adapter_registry.start_canary(session, version_id, 0.5)
        adapter = adapter_registry.ensure_alias(session, "default")
        state = AliasState("default", False, None, version_id, "default@1", adapter.canary_started_at, 0, None, False)
    _answers(settings, "default@1", [-1] * 25 + [1] * 5, "canary-")
    _answers(settings, "tiny-base", [1] * 25 + [-1] * 5, "base-")
    with session_scope(engine) as session:
        decision = judge_canary(session, state, "tiny-base", TuningSettings(canary_min_ratings=20))
    assert decision is not None and decision.action == "rollback"
    with session_scope(engine) as session:
        version = session.get(AdapterVersion, version_id)
        assert version.status == VersionStatus.REJECTED
        routing = adapter_registry.routing_table(session)["default"]
        assert routing.active is None and routing.canary is None
        [event] = session.scalars(select(RegistryEvent).where(RegistryEvent.action == "canary_rollback")).all()
        assert event.actor == "canary" and event.evidence["p_drop"] >= 0.95
    engine.dispose()


def test_a_round_the_server_starts_runs_at_a_lower_cpu_priority() -> None:
    # In a child process: a process cannot raise its priority back, and pytest's must stay as it is.
    code = (
        "import os; from tuning.schedule import yield_cpu_to_serving; before = os.nice(0); "
        "print(before, yield_cpu_to_serving(10), yield_cpu_to_serving(0))"
    )
    before, after, unchanged = map(
        int,
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
        ).stdout.split(),
    )
    assert after == min(before + 10, 19) and unchanged == after
    assert TuningSettings().scheduled_niceness == 10
