"""Many concurrent clients rating (and some chatting) against a real server, and the check afterwards.

Shared by the durability tests and `bench/load.py`. Every rating carries its own `feedback_id` and a
`user` of its own, so each one is one row; some clients re-rate what they rated before (same
`feedback_id`, flipped thumbs). A request whose answer never came (the server was killed) is retried
with the same body once the server is back, as a real client would. The ledger remembers what was
sent and what was acknowledged; `check_ratings` compares it with the database: an acknowledged rating
missing (or holding an older value) is lost, a row nobody sent is unexpected, two rows for one rater
and completion are duplicates.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from sqlalchemy import Engine, func, insert, select, text

from feedback.db import is_sqlite, make_sync_engine
from feedback.models import Completion, Feedback

RERATE_SHARE = 0.1  # of a rating client's requests re-rate one of its earlier ratings
CHAT_MAX_TOKENS = 8


class ServerGone(Exception):
    """The connection broke or was refused: the request may or may not have been applied."""


class HTTPConnection:
    """A bare HTTP/1.1 keep-alive connection: a fraction of httpx's CPU per request, so the load
    generator (which shares the machine with the server) measures the server rather than itself."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None:
            try:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                raise ServerGone(str(exc)) from exc
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def post(self, path: str, payload: dict[str, object]) -> tuple[int, bytes]:
        body = json.dumps(payload).encode()
        reader, writer = await self._open()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        try:
            writer.write(head.encode() + body)
            header = await reader.readuntil(b"\r\n\r\n")
            lines = header.split(b"\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"content-length" in headers:
                content = await reader.readexactly(int(headers[b"content-length"]))
            else:  # chunked: only streams answer this way, and the load sends none
                content = b""
                while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
                    content += (await reader.readexactly(size + 2))[:-2]
                await reader.readuntil(b"\r\n")
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            self.close()
            raise ServerGone(str(exc)) from exc
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, content


@dataclass
class Sent:
    """What was sent last for one feedback_id, and the newest value the server acknowledged."""

    completion_id: str
    user: str
    rating: int
    acked_rating: int | None = None
    acked: bool = False  # the last sent value was acknowledged


@dataclass
class LoadResult:
    ledger: dict[str, Sent] = field(default_factory=dict)
    acked: int = 0  # rating requests answered 2xx (re-ratings and retries included)
    chats: int = 0
    retried: int = 0  # requests re-sent after the connection broke
    errors: dict[int, int] = field(default_factory=dict)  # non-2xx answers by status
    latencies: list[float] = field(default_factory=list)  # seconds, acknowledged ratings
    seconds: float = 0.0

    @property
    def ratings_per_second(self) -> float:
        return self.acked / self.seconds if self.seconds else 0.0

    def latency_ms(self, quantile: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]


def seed_completions(database_url: str, count: int) -> list[str]:
    """Completions to rate, written straight to the database: the load measures rating, not generation."""
    now = datetime.now(UTC)
    ids = [f"chatcmpl-load{uuid.uuid4().hex}" for _ in range(count)]
    rows = [
        {
            "id": completion_id,
            "created_at": now,
            "caller": "local",
            "model_requested": "default",
            "adapter_alias": "default",
            "served_by": "load-test",
            "prompt_messages": [{"role": "user", "content": f"question {i}"}],
            "answer": f"answer {i}",
            "finish_reason": "stop",
            "prompt_tokens": 3,
            "completion_tokens": 2,
            "sampling": {},
            "latency_ms": 1.0,
        }
        for i, completion_id in enumerate(ids)
    ]
    engine = make_sync_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(insert(Completion), rows)
    finally:
        engine.dispose()
    return ids


class Load:
    """Rating clients and chat clients sharing one ledger, until a deadline."""

    def __init__(self, url: str, completion_ids: list[str], *, deadline: float, recover_seconds: float) -> None:
        self.url = url
        self.completion_ids = completion_ids
        self.deadline = deadline
        self.recover_seconds = recover_seconds  # how long a client waits for a killed server to come back
        self.result = LoadResult()

    async def _send_until_answered(self, connection: HTTPConnection, path: str, payload: dict[str, object]) -> int:
        """Sends until an answer arrives, re-sending the same body while the server is away."""
        gave_up_at = max(self.deadline, time.monotonic()) + self.recover_seconds
        while True:
            try:
                status, _ = await connection.post(path, payload)
                return status
            except ServerGone:
                if time.monotonic() > gave_up_at:
                    raise
                self.result.retried += 1
                await asyncio.sleep(0.05)

    async def _rate(self, connection: HTTPConnection, feedback_id: str, sent: Sent) -> None:
        payload = {"completion_id": sent.completion_id, "rating": sent.rating, "feedback_id": feedback_id}
        payload["user"] = sent.user
        sent.acked = False
        started = time.monotonic()
        status = await self._send_until_answered(connection, "/v1/feedback", payload)
        if 200 <= status < 300:
            sent.acked, sent.acked_rating = True, sent.rating
            self.result.acked += 1
            self.result.latencies.append(time.monotonic() - started)
        else:
            self.result.errors[status] = self.result.errors.get(status, 0) + 1

    async def rating_client(self, number: int) -> None:
        connection = HTTPConnection(self.url)
        rng = random.Random(number)
        mine: list[str] = []
        sequence = 0
        try:
            while time.monotonic() < self.deadline:
                if mine and rng.random() < RERATE_SHARE:
                    feedback_id = rng.choice(mine)
                    sent = self.result.ledger[feedback_id]
                    sent.rating = -sent.rating
                else:
                    feedback_id = uuid.uuid4().hex
                    sequence += 1
                    sent = Sent(rng.choice(self.completion_ids), f"rater-{number}-{sequence}", rng.choice((1, -1)))
                    self.result.ledger[feedback_id] = sent
                    mine.append(feedback_id)
                await self._rate(connection, feedback_id, sent)
        finally:
            connection.close()

    async def chat_client(self, number: int) -> None:
        """Chats (tiny model, few tokens) and rates each answer, as a person using the chat page would."""
        connection = HTTPConnection(self.url)
        try:
            while time.monotonic() < self.deadline:
                request = {
                    "model": "default",
                    "messages": [{"role": "user", "content": f"Say something ({number}, {self.result.chats})"}],
                    "max_tokens": CHAT_MAX_TOKENS,
                }
                status, content = await connection.post("/v1/chat/completions", request)
                if status != 200:
                    self.result.errors[status] = self.result.errors.get(status, 0) + 1
                    continue
                self.result.chats += 1
                feedback_id = uuid.uuid4().hex
                sent = Sent(json.loads(content)["id"], f"chatter-{number}-{self.result.chats}", 1)
                self.result.ledger[feedback_id] = sent
                await self._rate(connection, feedback_id, sent)
        except ServerGone:
            pass  # a chat cut off by a kill is not a rating; the rating clients carry the durability check
        finally:
            connection.close()


async def run_load(
    url: str,
    completion_ids: list[str],
    *,
    seconds: float,
    clients: int,
    chat_clients: int = 0,
    disruption: Callable[[], Awaitable[None]] | None = None,
    recover_seconds: float = 120.0,
) -> LoadResult:
    """Runs the clients for `seconds` (plus the time a disruption, e.g. a kill and restart, takes)."""
    started = time.monotonic()
    load = Load(url, completion_ids, deadline=started + seconds, recover_seconds=recover_seconds)
    tasks = [load.rating_client(i) for i in range(clients)] + [load.chat_client(i) for i in range(chat_clients)]
    if disruption is not None:
        tasks.append(disruption())
    await asyncio.gather(*tasks)
    load.result.seconds = time.monotonic() - started
    return load.result


@dataclass
class Verdict:
    acknowledged: int  # feedback ids whose last acknowledged value must be in the database
    rows: int
    lost: list[str]  # acknowledged, but missing or holding a value older than the acknowledged one
    unexpected: list[str]  # rows with an id no client sent
    duplicates: int  # (completion, caller, user) with more than one row
    problems: list[str]  # integrity and consistency findings

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexpected or self.duplicates or self.problems)


CONSISTENCY_QUERIES = {
    "ratings of a completion that does not exist": "SELECT count(*) FROM feedback f "
    "LEFT JOIN completions c ON c.id = f.completion_id WHERE c.id IS NULL",
    "rating and status disagree": "SELECT count(*) FROM feedback WHERE status <> 'quarantined' "
    "AND ((rating = 0) <> (status = 'retracted'))",
    "revision below 1": "SELECT count(*) FROM feedback WHERE revision < 1",
    "two rows for one rater and completion": "SELECT count(*) FROM (SELECT 1 FROM feedback "
    "GROUP BY completion_id, caller, end_user HAVING count(*) > 1) AS d",
    "uses of a rating that does not exist": "SELECT count(*) FROM feedback_uses u "
    "LEFT JOIN feedback f ON f.id = u.feedback_id WHERE f.id IS NULL",
}


def integrity_problems(engine: Engine) -> list[str]:
    """SQLite's own integrity and foreign-key checks, and consistency queries on both backends."""
    problems = []
    with engine.connect() as connection:
        if is_sqlite(str(engine.url)):
            verdict = [row[0] for row in connection.exec_driver_sql("PRAGMA integrity_check")]
            if verdict != ["ok"]:
                problems.append(f"integrity_check: {verdict[:5]}")
            orphans = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if orphans:
                problems.append(f"foreign_key_check: {orphans[:5]}")
        for name, query in CONSISTENCY_QUERIES.items():
            if count := connection.execute(text(query)).scalar_one():
                problems.append(f"{name}: {count}")
    return problems


def check_ratings(database_url: str, result: LoadResult) -> Verdict:
    engine = make_sync_engine(database_url)
    try:
        with engine.connect() as connection:
            stored = {
                row.id: row.rating
                for row in connection.execute(select(Feedback.id, Feedback.rating).where(Feedback.caller == "local"))
            }
            duplicates = connection.execute(
                select(func.count()).select_from(
                    select(Feedback.completion_id)
                    .group_by(Feedback.completion_id, Feedback.caller, Feedback.end_user)
                    .having(func.count() > 1)
                    .subquery()
                )
            ).scalar_one()
        problems = integrity_problems(engine)
    finally:
        engine.dispose()
    lost = []
    acknowledged = 0
    for feedback_id, sent in result.ledger.items():
        if sent.acked_rating is None:
            continue  # never acknowledged: it may or may not have been applied
        acknowledged += 1
        # The last acknowledged value must be there, unless a later (unanswered) re-rating replaced it.
        allowed = {sent.acked_rating} if sent.acked else {sent.acked_rating, sent.rating}
        if stored.get(feedback_id) not in allowed:
            lost.append(feedback_id)
    unexpected = sorted(set(stored) - set(result.ledger))
    return Verdict(acknowledged, len(stored), lost, unexpected, duplicates, problems)
