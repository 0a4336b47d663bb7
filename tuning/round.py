"""One tuning round: new feedback → TRL on the alias's LoRA → the gate → a canary (or promotion).

Only one round runs at a time across every process and replica (a lease in the database,
`tuning/lock.py`). Nothing a round does is visible until its last transaction: the version files
appear by an atomic rename, and registering the version, recording what data it used, the gate's
verdict and the canary start or promotion are one commit. A round that dies at any point leaves the
active version and the data untouched, and its run is marked failed (here, or by the next round once
its heartbeat is stale).
"""

from __future__ import annotations

import os
import random
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog
import torch
from sqlalchemy import Engine

from feedback import adapter_registry, training_data, tuning_runs
from feedback.db import make_sync_engine, session_scope
from feedback.models import Adapter, AdapterVersion, RunStatus, TuningRun, UseRole, VersionStatus, utcnow
from feedback.training_data import ComparedAnswers, RatedAnswer
from serving import base_model, failpoints
from serving.adapters.store import content_sha256, read_version, sweep, write_version
from serving.engine.lora import SERVABLE_MODULES
from serving.settings import Settings
from tuning import trainer
from tuning.crew import Crew, TrainingOrders
from tuning.datasets import dpo_dataset, kto_dataset
from tuning.gate import Contenders, GateReport, run_gate
from tuning.lock import RoundLock
from tuning.probe_answers import KnownAnswers, ProbeAnswerStore
from tuning.probes import factual_probes
from tuning.settings import TuningSettings

log = structlog.get_logger(__name__)


@dataclass
class RoundOutcome:
    run_id: int | None
    status: str
    version: str | None = None
    reason: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "status": self.status,
            "version": self.version,
            "reason": self.reason,
            "counts": self.counts,
            "seconds": round(self.seconds, 1),
            "metrics": self.metrics,
        }


class _RunReporter:
    """Writes a run's stage, progress and heartbeat to its record, at most once a second."""

    def __init__(self, db: Engine, run_id: int) -> None:
        self.db = db
        self.run_id = run_id
        self._last = 0.0

    def __call__(self, stage: str, step: int, total: int, logs: dict[str, float]) -> None:
        failpoints.hit(f"training-step-{step}")
        now = time.monotonic()
        if now - self._last < 1.0 and step < total:
            return
        self._last = now
        progress = 0.1 + 0.8 * (step / total if total else 0.0)  # training is the middle 80 %
        log.info("tuning progress", run=self.run_id, stage=stage, step=step, total=total, loss=logs.get("loss"))
        with session_scope(self.db) as session:
            tuning_runs.report_progress(session, self.run_id, stage=stage, progress=progress)

    def stage(self, stage: str, progress: float) -> None:
        with session_scope(self.db) as session:
            tuning_runs.report_progress(session, self.run_id, stage=stage, progress=progress)


def run_round(settings: Settings, tuning: TuningSettings, *, alias: str, trigger: str) -> RoundOutcome:
    started = time.perf_counter()
    crew = Crew(cpu=trainer.training_device(tuning).type == "cpu")
    if not crew.is_main:
        return _follow(settings, tuning, crew)
    db = make_sync_engine(settings.database_url)
    lock = RoundLock(db, ttl_seconds=tuning.lock_ttl_seconds)
    run_id: int | None = None
    try:
        with session_scope(db) as session:
            abandoned = tuning_runs.fail_abandoned_runs(
                session, stale_after=timedelta(minutes=tuning.stale_run_minutes)
            )
        if abandoned:
            log.warning("marked abandoned runs failed", runs=abandoned)
        if not lock.acquire():
            return RoundOutcome(None, "busy", reason=f"another round holds the lock ({lock.current_holder()})")
        with session_scope(db) as session:
            adapter = adapter_registry.ensure_alias(session, alias)
            blocked = _why_not_now(adapter)
            if blocked is None:
                run_id = tuning_runs.start_run(
                    session,
                    alias=alias,
                    trigger=trigger,
                    config=tuning.model_dump(mode="json"),
                    owner=f"{socket.gethostname()}:{os.getpid()}",
                ).id
        if run_id is None:
            return RoundOutcome(None, "skipped", reason=blocked)
        lock.on_renew = lambda: _heartbeat(db, run_id)
        outcome = _train_gate_publish(settings, tuning, db, run_id, alias, lock, crew)
    except Exception as exc:
        log.exception("tuning round failed")
        if run_id is not None:
            error = "".join(traceback.format_exception(exc))[-4000:]
            with session_scope(db) as session:
                tuning_runs.finish_run(session, run_id, RunStatus.FAILED, error=error)
        outcome = RoundOutcome(run_id=run_id, status="failed", reason=f"{type(exc).__name__}: {exc}")
    finally:
        crew.send(None)  # followers still waiting (a skipped or failed round) go home
        lock.release()
        db.dispose()
    outcome.seconds = time.perf_counter() - started
    log.info("tuning round finished", **outcome.summary())
    return outcome


def _why_not_now(adapter: Adapter) -> str | None:
    if adapter.pinned:
        return f"alias {adapter.name!r} is pinned"
    if adapter.canary_version_id is not None:
        return f"alias {adapter.name!r} has a canary in progress; it is decided first"
    return None


def _heartbeat(db: Engine, run_id: int) -> None:
    with session_scope(db) as session:
        session.get_one(TuningRun, run_id).heartbeat_at = utcnow()


def split_heldout(
    ratings: list[RatedAnswer], comparisons: list[ComparedAnswers], tuning: TuningSettings
) -> tuple[list[RatedAnswer], list[RatedAnswer], list[ComparedAnswers], list[ComparedAnswers]]:
    """Keep a slice of the round's feedback out of training for the gate: stratified by label, seeded.

    With too little feedback for a meaningful slice, everything trains (the gate then says the
    preference was not measured and relies on its drift checks).
    """
    rng = random.Random(tuning.seed)
    if len(ratings) * tuning.heldout_fraction < tuning.gate_min_heldout:
        train_r, held_r = list(ratings), []
    else:
        train_r, held_r = [], []
        for label in (1, -1):
            group = [r for r in ratings if r.rating == label]
            rng.shuffle(group)
            cut = round(len(group) * tuning.heldout_fraction)
            held_r += group[:cut]
            train_r += group[cut:]
    shuffled = list(comparisons)
    rng.shuffle(shuffled)
    cut = round(len(shuffled) * tuning.heldout_fraction) if len(shuffled) * tuning.heldout_fraction >= 2 else 0
    return train_r, held_r, shuffled[cut:], shuffled[:cut]


def _follow(settings: Settings, tuning: TuningSettings, crew: Crew) -> RoundOutcome:
    """A follower process under `accelerate launch`: train what the main process sends, touch nothing else."""
    orders = crew.receive()
    if orders is None:
        return RoundOutcome(None, "follower", reason="the main process trained nothing this round")
    policy, tokenizer, device = _load_policy(settings, tuning, orders.parent_dir)
    with tempfile.TemporaryDirectory(prefix="loraloop-tune-") as scratch:
        _train(policy, tokenizer, orders, tuning, device, Path(scratch), lambda *_: None)
    return RoundOutcome(orders.run_id, "follower")


def _load_policy(settings: Settings, tuning: TuningSettings, parent_dir: Path | None) -> tuple[Any, Any, torch.device]:
    source = base_model.resolve_base_model(settings)
    device = trainer.training_device(tuning)
    tokenizer = base_model.load_tokenizer(source.path)
    model = base_model.load_model(source.path, device, torch.float32)
    return trainer.attach_adapter(model, tuning, parent_dir), tokenizer, device


def _train(
    policy: Any,
    tokenizer: Any,
    orders: TrainingOrders,
    tuning: TuningSettings,
    device: torch.device,
    workdir: Path,
    report: trainer.Progress,
) -> list[trainer.PhaseResult]:
    """KTO on the thumbs, then DPO on the pairs: the same calls, in the same order, in every process."""
    kto = None
    if orders.train_ratings:
        kto = kto_dataset(orders.train_ratings, orders.train_comparisons, seed=tuning.seed)
    pairs = dpo_dataset(orders.train_ratings, orders.train_comparisons, seed=tuning.seed)
    phases: list[trainer.PhaseResult] = []
    continued = orders.parent_dir is not None
    if kto is not None and len(kto.dataset) >= 2:
        phases.append(trainer.train_kto(policy, tokenizer, kto, tuning, device, workdir, report, continued=continued))
    if pairs is not None:
        phases.append(trainer.train_dpo(policy, tokenizer, pairs, tuning, device, workdir, report, continued=continued))
    return phases


def _train_gate_publish(
    settings: Settings, tuning: TuningSettings, db: Engine, run_id: int, alias: str, lock: RoundLock, crew: Crew
) -> RoundOutcome:
    report = _RunReporter(db, run_id)
    with session_scope(db) as session:
        ratings = training_data.rated_answers(session, alias)
        comparisons = training_data.compared_answers(session, alias)
        parent = adapter_registry.routing_table(session)[alias].active
        registered = {v.path for v in adapter_registry.list_versions(session, alias)}
    leftovers = sweep(settings.adapters_path, alias, registered)
    if leftovers:
        log.warning("moved aside what an earlier crashed round left", paths=leftovers)
    train_r, held_r, train_c, held_c = split_heldout(ratings, comparisons, tuning)
    kto = kto_dataset(train_r, train_c, seed=tuning.seed) if train_r else None
    pairs = dpo_dataset(train_r, train_c, seed=tuning.seed)
    counts = {
        "ratings": len(ratings),
        "comparisons": len(comparisons),
        "heldout_ratings": len(held_r),
        "heldout_comparisons": len(held_c),
        "kto_rows": len(kto.dataset) if kto else 0,
        "desirable": kto.desirable if kto else 0,
        "undesirable": kto.undesirable if kto else 0,
        "dpo_pairs": len(pairs) if pairs is not None else 0,
    }
    with session_scope(db) as session:
        run = session.get_one(TuningRun, run_id)
        run.data_counts = counts
        run.parent_version_id = parent.id if parent else None
        run.method = "+".join(m for m, n in (("kto", counts["kto_rows"]), ("dpo", counts["dpo_pairs"])) if n) or None
    if counts["ratings"] + counts["comparisons"] < tuning.min_ratings or (kto is None and pairs is None):
        reason = f"{counts['ratings']} new ratings and {counts['comparisons']} comparisons; need {tuning.min_ratings}"
        with session_scope(db) as session:
            tuning_runs.finish_run(session, run_id, RunStatus.SKIPPED, error=reason)
        return RoundOutcome(run_id, "skipped", reason=reason, counts=counts)

    report.stage("loading", 0.05)
    source = base_model.resolve_base_model(settings)
    parent_dir = None
    if parent is not None:
        # The parent is verified like a server would before training on top of it.
        read_version(settings.adapters_path, parent.path, parent.sha256, max_rank=256, allowed_modules=SERVABLE_MODULES)
        parent_dir = settings.adapters_path / parent.path
    orders = TrainingOrders(run_id, train_r, train_c, parent_dir)
    crew.send(orders)
    policy, tokenizer, device = _load_policy(settings, tuning, parent_dir)
    with tempfile.TemporaryDirectory(prefix="loraloop-tune-") as scratch:
        workdir = Path(scratch)
        phases = _train(policy, tokenizer, orders, tuning, device, workdir, report)
        if not phases:
            reason = "not enough rows to train on"
            with session_scope(db) as session:
                tuning_runs.finish_run(session, run_id, RunStatus.SKIPPED, error=reason)
            return RoundOutcome(run_id, "skipped", reason=reason, counts=counts)
        report.stage("saving", 0.9)
        trainer.save_adapter(policy, workdir / "adapter")
        report.stage("gate", 0.92)
        base = f"{source.model_id}@{source.path}"
        known = KnownAnswers(
            ProbeAnswerStore(settings.model_cache_dir / "probe-answers"),
            incumbent=base if parent is None else f"{base}+{parent.sha256}",
            candidate=f"{base}+{content_sha256(workdir / 'adapter')}",
        )
        gate = run_gate(
            Contenders(policy, parent_dir), tokenizer, held_r, held_c, factual_probes(), tuning, known=known
        )
        with session_scope(db) as session:
            number = adapter_registry.next_version_number(session, alias)
        stored = write_version(settings.adapters_path, alias, number, workdir / "adapter")
        failpoints.hit("version-written")
    metrics = {p.method: {"steps": p.steps, "seconds": round(p.seconds, 1), **p.metrics} for p in phases}
    metrics["gate"] = gate.as_metrics()
    peft_config = policy.peft_config["default"]
    return _publish(
        db,
        lock,
        run_id,
        alias,
        counts,
        metrics,
        gate,
        tuning,
        AdapterVersion(
            adapter_name=alias,
            version=number,
            parent_id=parent.id if parent else None,
            path=stored.relative_path,
            sha256=stored.sha256,
            base_model_id=source.model_id,
            rank=int(peft_config.r),
            alpha=float(peft_config.lora_alpha),
            target_modules=sorted(peft_config.target_modules),
            status=VersionStatus.CANDIDATE,
            metrics=metrics,
            tuning_run_id=run_id,
        ),
        used=(train_r, train_c, held_r, held_c),
    )


def _publish(
    db: Engine,
    lock: RoundLock,
    run_id: int,
    alias: str,
    counts: dict[str, int],
    metrics: dict[str, Any],
    gate: GateReport,
    tuning: TuningSettings,
    candidate: AdapterVersion,
    used: tuple[list[RatedAnswer], list[ComparedAnswers], list[RatedAnswer], list[ComparedAnswers]],
) -> RoundOutcome:
    """One transaction: the version, what it used, the gate's verdict, and its canary or promotion."""
    if lock.lost.is_set():
        raise RuntimeError("lost the round lock before publishing; another round may be running")
    train_r, train_c, held_r, held_c = used
    with session_scope(db) as session:
        version = adapter_registry.register_version(session, candidate)
        training_data.mark_used(session, run_id, ratings=train_r, comparisons=train_c, role=UseRole.TRAIN)
        training_data.mark_used(session, run_id, ratings=held_r, comparisons=held_c, role=UseRole.HELDOUT)
        evidence = gate.as_metrics()
        if not gate.passed:
            adapter_registry.reject(session, version.id, gate.reasons, evidence)
            tuning_runs.finish_run(
                session,
                run_id,
                RunStatus.REJECTED,
                error="; ".join(gate.reasons),
                metrics=metrics,
                produced_version_id=version.id,
            )
            status = "rejected"
        elif tuning.canary_share > 0:
            adapter_registry.start_canary(session, version.id, tuning.canary_share, evidence=evidence)
            tuning_runs.finish_run(
                session, run_id, RunStatus.SUCCEEDED, metrics=metrics, produced_version_id=version.id
            )
            status = "canary"
        else:
            adapter_registry.promote(
                session, version.id, reason=f"passed the gate in run {run_id}", actor="gate", evidence=evidence
            )
            tuning_runs.finish_run(
                session, run_id, RunStatus.SUCCEEDED, metrics=metrics, produced_version_id=version.id
            )
            status = "promoted"
        label = version.label
    return RoundOutcome(
        run_id, status, version=label, reason="; ".join(gate.reasons) or None, counts=counts, metrics=metrics
    )
