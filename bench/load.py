"""Ratings per second a real `loraloop serve` sustains with nothing lost, on SQLite or PostgreSQL.

    flock /tmp/loraloop-cpu.lock .venv/bin/python bench/load.py                       # SQLite, 15 s
    flock /tmp/loraloop-cpu.lock .venv/bin/python bench/load.py --database postgresql
    flock /tmp/loraloop-cpu.lock .venv/bin/python bench/load.py --kill                # SIGKILL mid-load, restart

It builds a tiny random model (the rating path is measured, not generation), starts a server on a
fresh database, seeds completions, and runs many concurrent clients that rate (each rating its own
`feedback_id`; some re-rate) while a few chat and rate their answers. Afterwards it checks every
acknowledged rating is in the database exactly once with its last acknowledged value, and the
database's integrity. The baseline is the same database written by one connection, one committed
INSERT per rating, with the server's durability settings: the ratio says what the HTTP server adds
(or, with group commit, saves) over the simplest durable writer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the harness lives with the tests

from feedback import migrate
from serving.base_model import prepare_bundled_model
from tests.conftest import MODEL_CACHE, _drop_postgres_database, _fresh_postgres_database
from tests.durability.load import LoadResult, check_ratings, run_load, seed_completions
from tests.durability.server import ServerProcess
from tests.helpers import make_tiny_model


def baseline_inserts_per_second(database_url: str, completion_ids: list[str], seconds: float) -> float:
    """One connection, one transaction per INSERT, the server's durability settings (WAL + FULL on SQLite)."""
    columns = "id, completion_id, caller, end_user, rating, reasons, status, revision, created_at, updated_at"
    values = "{id}, {completion}, 'local', {id}, 1, '[]', 'active', 1, {now}, {now}"
    done = 0
    started = time.monotonic()
    if database_url.startswith("sqlite"):
        connection = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        statement = f"INSERT INTO feedback ({columns}) VALUES ({values.format(id='?1', completion='?2', now='?3')})"
        while time.monotonic() - started < seconds:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(statement, (uuid.uuid4().hex, completion_ids[done % len(completion_ids)], "2026-01-01"))
            connection.execute("COMMIT")
            done += 1
        connection.close()
    else:
        import psycopg

        statement = (
            f"INSERT INTO feedback ({columns}) VALUES ({values.format(id='%(id)s', completion='%(c)s', now='now()')})"
        )
        with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as connection:
            while time.monotonic() - started < seconds:
                connection.execute(statement, {"id": uuid.uuid4().hex, "c": completion_ids[done % len(completion_ids)]})
                done += 1
    return done / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=64, help="concurrent rating clients")
    parser.add_argument("--chat-clients", type=int, default=2, help="concurrent clients chatting, then rating")
    parser.add_argument("--completions", type=int, default=20_000, help="completions seeded to be rated")
    parser.add_argument("--kill", action="store_true", help="SIGKILL the server halfway, restart it, go on")
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loraloop-load-") as tmp:
        root = Path(tmp)
        model = make_tiny_model(prepare_bundled_model(MODEL_CACHE), root / "tiny-model")
        postgres_name = None
        if args.database == "postgresql":
            database_url, postgres_name = _fresh_postgres_database()
        else:
            database_url = f"sqlite:///{root / 'data' / 'loraloop.db'}"
            (root / "data").mkdir()
        try:
            migrate.upgrade(database_url)
            completion_ids = seed_completions(database_url, args.completions)
            server = ServerProcess(root / "data", model, database_url=database_url)
            server.start()
            kill_timing: dict[str, float] = {}

            async def kill_and_restart() -> None:
                await asyncio.sleep(args.seconds / 2)
                server.kill()
                killed = time.monotonic()
                await asyncio.to_thread(server.start)
                kill_timing["down_seconds"] = time.monotonic() - killed

            cpu_before = server.cpu_seconds()
            try:
                result: LoadResult = uvloop.run(
                    run_load(
                        server.url,
                        completion_ids,
                        seconds=args.seconds,
                        clients=args.clients,
                        chat_clients=args.chat_clients,
                        disruption=kill_and_restart if args.kill else None,
                    )
                )
                server_cpu = server.cpu_seconds() - cpu_before if not args.kill else 0.0
            finally:
                server.stop()
            verdict = check_ratings(database_url, result)
            baseline = baseline_inserts_per_second(database_url, completion_ids, args.baseline_seconds)
        finally:
            if postgres_name is not None:
                _drop_postgres_database(postgres_name)

    # With a kill, the server was away for part of the run: the rate is over the time it was up.
    up_seconds = result.seconds - kill_timing.get("down_seconds", 0.0)
    rate = result.acked / up_seconds
    summary = {
        "database": args.database,
        "killed": args.kill,
        "clients": args.clients,
        "chat_clients": args.chat_clients,
        "seconds": round(result.seconds, 2),
        "acknowledged_ratings": result.acked,
        "ratings_per_second": round(rate, 1),
        "latency_ms_p50": round(result.latency_ms(0.5), 2),
        "latency_ms_p99": round(result.latency_ms(0.99), 2),
        "server_cpu_ms_per_rating": round(1000 * server_cpu / result.acked, 3) if server_cpu else None,
        "server_cpu_share_of_a_core": round(server_cpu / result.seconds, 2) if server_cpu else None,
        "chats": result.chats,
        "retried_after_connection_loss": result.retried,
        "errors_by_status": result.errors,
        "baseline_single_connection_inserts_per_second": round(baseline, 1),
        "ratio_to_baseline": round(rate / baseline, 2),
        "distinct_ratings_acknowledged": verdict.acknowledged,
        "rows": verdict.rows,
        "lost": len(verdict.lost),
        "unexpected": len(verdict.unexpected),
        "duplicates": verdict.duplicates,
        "integrity_problems": verdict.problems,
        **kill_timing,
    }
    print(json.dumps(summary, indent=2))
    if not verdict.ok or result.errors:
        sys.exit("FAILED: see lost / unexpected / duplicates / integrity_problems / errors_by_status above")


if __name__ == "__main__":
    main()
