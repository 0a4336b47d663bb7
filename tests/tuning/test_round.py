"""A whole tuning round against a real database (SQLite and PostgreSQL) on the tiny model."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from feedback import adapter_registry, training_data
from feedback.callers import LOCAL_CALLER
from feedback.completions import CompletionRecord, record_completion
from feedback.db import make_sync_engine, session_scope
from feedback.models import Adapter, AdapterVersion, FeedbackUse, RunStatus, TuningRun, VersionStatus
from feedback.ratings import RatingInput, submit_rating
from serving.adapters.store import content_sha256
from serving.settings import Settings
from tuning import trainer
from tuning.round import run_round
from tuning.settings import TuningSettings

FAST = TuningSettings(
    max_steps=2, batch_size=4, learning_rate=1e-3, precision="fp32", max_length=128, canary_share=0, gate_probe_tokens=8
)


def _rate_answers(settings: Settings, n: int, *, alias: str = "default", offset: int = 0) -> None:
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        adapter_registry.ensure_alias(session, alias)
        for i in range(offset, offset + n):
            record_completion(
                session,
                CompletionRecord(
                    id=f"chatcmpl-{i}",
                    caller="local",
                    tenant=None,
                    end_user=None,
                    model_requested=alias,
                    adapter_alias=alias,
                    adapter_version_id=None,
                    served_by="tiny",
                    prompt_messages=[{"role": "user", "content": f"Question {i}?"}],
                    answer="Short." if i % 2 else "Long " * 20,
                    finish_reason="stop",
                    prompt_tokens=10,
                    completion_tokens=5,
                    sampling={},
                    latency_ms=1.0,
                    time_to_first_token_ms=None,
                ),
            )
        session.flush()
        for i in range(offset, offset + n):
            submit_rating(session, LOCAL_CALLER, RatingInput(f"chatcmpl-{i}", 1 if i % 2 else -1))
    engine.dispose()


def test_round_trains_registers_and_promotes_a_new_version(settings: Settings) -> None:
    _rate_answers(settings, 8)
    outcome = run_round(settings, FAST, alias="default", trigger="manual")
    assert outcome.status == "promoted", outcome.reason
    assert outcome.version == "default@1"
    assert outcome.counts["ratings"] == 8 and outcome.counts["desirable"] == 4

    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        version = session.scalars(select(AdapterVersion)).one()
        assert version.status == VersionStatus.ACTIVE
        assert version.sha256 == content_sha256(settings.adapters_path / version.path)
        assert session.get(Adapter, "default").active_version_id == version.id
        run = session.get(TuningRun, outcome.run_id)
        assert run.status == RunStatus.SUCCEEDED and run.progress == 1.0
        assert run.produced_version_id == version.id and run.data_counts["kto_rows"] == 8
        assert "kto" in run.metrics
        assert len(session.scalars(select(FeedbackUse)).all()) == 8
        assert training_data.rated_answers(session, "default") == []
    engine.dispose()

    again = run_round(settings, FAST, alias="default", trigger="manual")
    assert again.status == "skipped"

    _rate_answers(settings, 6, offset=100)
    child = run_round(settings, FAST, alias="default", trigger="manual")
    assert child.status == "promoted" and child.version == "default@2"
    with session_scope(engine) as session:
        versions = {v.version: v for v in session.scalars(select(AdapterVersion))}
        assert versions[2].parent_id == versions[1].id
        assert versions[1].status == VersionStatus.RETIRED and versions[2].status == VersionStatus.ACTIVE
    engine.dispose()


def test_a_crash_mid_training_changes_nothing_but_the_run_record(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _rate_answers(settings, 8)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash during training")

    monkeypatch.setattr(trainer, "train_kto", boom)
    outcome = run_round(settings, FAST, alias="default", trigger="manual")
    assert outcome.status == "failed"
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        assert session.scalars(select(AdapterVersion)).all() == []
        assert session.get(Adapter, "default").active_version_id is None
        run = session.get(TuningRun, outcome.run_id)
        assert run.status == RunStatus.FAILED and "simulated crash" in run.error
        assert len(training_data.rated_answers(session, "default")) == 8
    engine.dispose()
    assert not any(settings.adapters_path.glob("default/v*"))
