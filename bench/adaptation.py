"""Does the loop learn what its users like without breaking the assistant? One command, a fresh server.

    .venv/bin/python bench/adaptation.py [--rule bench.rules:short_answers] [--rounds 3] [--ratings 240]

Starts `loraloop serve` on a fresh data dir with its own scheduler on, then plays simulated users over
HTTP: each asks an everyday prompt from the shipped train split (`bench/prompts/everyday.jsonl`),
reads the answer and sends a thumb from the preference rule (an answer cut off at `--max-tokens` is a
thumbs-down), flipped with `--noise` probability.
The server decides by itself when a round is due (`schedule_min_feedback` = `--ratings`); while a
candidate is on canary the users keep chatting and rating, so the canary is judged on live thumbs.

After the base model and after every round it measures, on the held-out prompts (greedy, never
trained on), the share of answers the rule likes, and the factual probes (`tuning/probes/factual.jsonl`).
A last round feeds random labels (`--poison`): the gate or the canary must keep it out.

Prints a table per round and writes `adaptation.json` and `adaptation.png` to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tuning.probes import factual_probes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so that --rule bench.rules:… imports from a checkout

Rule = Callable[[str, str], bool]
PROMPTS = ROOT / "bench" / "prompts" / "everyday.jsonl"
ALIAS = "default"


@dataclass
class RoundRow:
    name: str
    ratings_used: int = 0
    desirable: int = 0
    undesirable: int = 0
    outcome: str = ""
    version: str = ""
    active_after: str = ""
    heldout_uprate: float = 0.0
    heldout_uprate_greedy: float = 0.0
    factual: float = 0.0
    gate: dict[str, Any] = field(default_factory=dict)
    canary: dict[str, Any] = field(default_factory=dict)
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    measured_again: bool = True  # False: the active version had not changed, its last measurement stands

    def measured(self, m: Measurement, *, again: bool = True) -> None:
        self.heldout_uprate, self.heldout_uprate_greedy = m.uprate, m.uprate_greedy
        self.factual, self.active_after = m.factual, m.answered_by
        self.measured_again = again


def load_rule(spec: str) -> Rule:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--rule must be package.module:function, got {spec!r}")
    rule = getattr(importlib.import_module(module), name)
    if not callable(rule):
        raise SystemExit(f"{spec} is not callable")
    return rule


def load_prompts() -> tuple[list[str], list[str]]:
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r["prompt"] for r in rows if r["split"] == "train"], [r["prompt"] for r in rows if r["split"] == "heldout"]


class Server:
    """`loraloop serve` as a child process on a fresh data dir, with the scheduler tuned for a benchmark."""

    def __init__(self, data_dir: Path, port: int, ratings: int, extra_env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.port = port
        self.env = {
            **os.environ,
            "LORALOOP_DATA_DIR": str(data_dir),
            "LORALOOP_PORT": str(port),
            "LORALOOP_LOG_FORMAT": "json",
            "LORALOOP_TUNING_SCHEDULE_ENABLED": "true",
            "LORALOOP_TUNING_SCHEDULE_CHECK_SECONDS": "2",
            "LORALOOP_TUNING_SCHEDULE_INTERVAL_SECONDS": "0",
            "LORALOOP_TUNING_SCHEDULE_MIN_FEEDBACK": str(ratings),
            # Decide a canary on posterior means after 50 ratings, not 200: the bench's time, not its evidence.
            # At a 30 % share that is ~170 ratings in all, which with the ~32 in flight when it is decided stay
            # under a round's 240: at 60 (~210 + 32) the server started a round nobody asked for on the last
            # canary's feedback, which then trained beside the bench's last measurement (38 s -> ~2.5 min).
            "LORALOOP_TUNING_CANARY_MAX_RATINGS": "50",
            **extra_env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = Path(sys.executable).parent / "loraloop"
        subprocess.run([str(binary), "db", "upgrade"], env=self.env, check=True, stdout=subprocess.DEVNULL)
        self.log = (self.data_dir / "server.log").open("wb")
        # Its own process group: the server leaves a round in progress to finish (`Scheduler.stop`), and
        # the benchmark, which deletes the data dir, must not leave one training after it.
        self.process = subprocess.Popen(
            [str(binary), "serve"], env=self.env, stdout=self.log, stderr=self.log, start_new_session=True
        )

    async def wait_ready(self, client: httpx.AsyncClient, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise SystemExit(f"the server exited; see {self.data_dir / 'server.log'}")
            try:
                if (await client.get("/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
        raise SystemExit("the server did not get ready")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        with contextlib.suppress(ProcessLookupError):  # a round the scheduler started, still training
            os.killpg(self.process.pid, signal.SIGKILL)


# Simulated users talking at once: the engine's best batch on a 2-core CPU (282 against 206 tok/s at 32
# and 16 clients on the AVX512-BF16 EPYC, README › Performance); the time users spend chatting counts in a round.
CLIENTS = 32


class Users:
    """Simulated users: ask, read, thumb. Each has a stable id, so canary routing keeps them on one arm."""

    def __init__(
        self, client: httpx.AsyncClient, rule: Rule, noise: float, max_tokens: int, temperature: float, seed: int
    ) -> None:
        self.client = client
        self.rule = rule
        self.noise = noise
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.rng = random.Random(seed)
        self.sent = 0
        self.last_run_id = 0  # the newest tuning run a benchmark round has accounted for
        self.last_measured: tuple[str | None, Measurement] | None = None  # (active version, its measurement)

    def likes(self, reply: dict[str, Any], prompt: str) -> bool:
        """The rule's verdict on a finished answer. An answer cut off at max_tokens is a thumbs-down: users
        don't like unfinished answers, and the rule cannot judge what it never saw. (Judged on cut text,
        "under 40 words" liked answers whose tokens were long words, emoji or other languages, and the
        rounds learned exactly that.)"""
        choice = reply["choices"][0]
        return choice["finish_reason"] != "length" and self.rule(choice["message"]["content"], prompt)

    async def ask(self, prompt: str, user: str, *, temperature: float, seed: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": ALIAS,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": self.max_tokens,
            "temperature": temperature,
            "user": user,
        }
        if seed is not None:
            body["seed"] = seed
        response = await self.client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()

    async def ask_and_rate(self, prompt: str, *, poison: bool = False) -> None:
        """One user asks, reads the answer and sends a thumb (the rule's verdict, flipped with the noise;
        a coin when poisoned)."""
        user, flip, coin = f"user-{self.rng.randrange(200)}", self.rng.random(), self.rng.random()
        reply = await self.ask(prompt, user, temperature=self.temperature, seed=self.rng.randrange(2**31))
        liked = coin < 0.5 if poison else self.likes(reply, prompt) != (flip < self.noise)
        sent = await self.client.post(
            "/v1/feedback", json={"completion_id": reply["id"], "rating": 1 if liked else -1, "user": user}
        )
        sent.raise_for_status()
        self.sent += 1

    async def chat_until(
        self,
        done: Callable[[], Awaitable[bool]],
        next_prompt: Callable[[], str],
        *,
        poison: bool = False,
        concurrency: int = CLIENTS,
    ) -> None:
        """`concurrency` users keep asking and rating until `done()` (asked every second) says so; answers
        already asked for are still rated. Traffic that stops when the server acts: in fixed waves, a round
        started on a wave's first part while its rest kept the CPU busy (training steps 15-30 s instead of 3)."""
        stop = asyncio.Event()

        async def watch() -> None:
            while not await done():
                await asyncio.sleep(1)
            stop.set()

        async def one_user() -> None:
            while not stop.is_set():
                await self.ask_and_rate(next_prompt(), poison=poison)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(one_user() for _ in range(concurrency)))
        await watcher


@dataclass
class Measurement:
    uprate: float  # held-out prompts answered the way users get them (their temperature, a fixed seed each)
    uprate_greedy: float  # the same prompts at temperature 0
    factual: float
    answered_by: str


async def measure(users: Users, heldout: list[str], *, concurrency: int = CLIENTS) -> Measurement:
    """Held-out up-rates by the rule (no noise: the true preference) and factual probes, through the API."""
    gate = asyncio.Semaphore(concurrency)
    probes = factual_probes()

    async def answer(prompt: str, temperature: float, seed: int, max_tokens: int | None = None) -> dict[str, Any]:
        async with gate:
            body = {
                "model": ALIAS,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens or users.max_tokens,
                "temperature": temperature,
                "seed": seed,
                "user": "bench-measure",
            }
            return (await users.client.post("/v1/chat/completions", json=body)).json()

    def liked(replies: list[dict[str, Any]]) -> float:
        return sum(users.likes(reply, p) for reply, p in zip(replies, heldout, strict=True)) / len(heldout)

    # All three sets at once: one after the other, each one's last few answers ran in a near-empty batch.
    sampled, greedy, facts = await asyncio.gather(
        asyncio.gather(*(answer(p, users.temperature, i) for i, p in enumerate(heldout))),
        asyncio.gather(*(answer(p, 0.0, 0) for p in heldout)),
        asyncio.gather(*(answer(p.question, 0.0, 0, 32) for p in probes)),
    )
    texts = [reply["choices"][0]["message"]["content"] for reply in facts]
    factual = sum(p.is_answered_by(text) for text, p in zip(texts, probes, strict=True)) / len(probes)
    return Measurement(liked(sampled), liked(greedy), factual, greedy[0]["system_fingerprint"])


async def measure_active(users: Users, heldout: list[str], row: RoundRow, active: str | None) -> None:
    """Measure the active version, unless it is the one measured last (a rejected or rolled-back round):
    then that measurement stands. Asking the same version the same prompts again (greedy, fixed seeds)
    would take ~40 s of the run to show the same answers."""
    if users.last_measured is not None and users.last_measured[0] == active:
        row.measured(users.last_measured[1], again=False)
        return
    measurement = await measure(users, heldout)
    users.last_measured = (active, measurement)
    row.measured(measurement)


async def admin(client: httpx.AsyncClient, path: str) -> Any:
    response = await client.get(f"/v1/admin{path}")
    response.raise_for_status()
    return response.json()


async def alias_view(client: httpx.AsyncClient) -> dict[str, Any]:
    return next(a for a in await admin(client, "/adapters") if a["name"] == ALIAS)


async def latest_run_id(client: httpx.AsyncClient) -> int:
    runs = await admin(client, f"/runs?alias={ALIAS}&limit=1")
    return runs[0]["id"] if runs else 0


async def play_round(users: Users, train: list[str], heldout: list[str], name: str, *, poison: bool) -> RoundRow:
    """Users chat and rate until the server starts a round; wait for it; keep rating through its canary."""
    client = users.client
    row = RoundRow(name)
    started = time.monotonic()
    # A round may already have started on the feedback of the last canary: then it is this round, and more
    # traffic now would only compete with its training for the CPU.
    before = users.last_run_id
    if poison:  # …unless this round is the poisoned one: a round on real feedback must finish first
        latest = await latest_run_id(client)
        while latest != before and (await admin(client, f"/runs/{latest}"))["status"] == "running":
            await asyncio.sleep(3)
        if latest != before:
            print(f"(run {latest}, on the last canary's feedback, finished before the poisoned round)", flush=True)
        before = latest
    pool = train[:]
    users.rng.shuffle(pool)
    prompts = itertools.cycle(pool)

    async def round_started() -> bool:
        return (await latest_run_id(client)) != before

    # Traffic until the scheduler has seen enough new feedback and started a round.
    if not await round_started():
        await users.chat_until(round_started, lambda: next(prompts), poison=poison)
    run_id = users.last_run_id = await latest_run_id(client)
    while (run := await admin(client, f"/runs/{run_id}"))["status"] == "running":
        await asyncio.sleep(1)
    counts, metrics = run["data_counts"], run["metrics"]
    row.ratings_used = counts.get("ratings", 0)
    row.desirable, row.undesirable = counts.get("desirable", 0), counts.get("undesirable", 0)
    row.gate = metrics.get("gate", {})
    row.train_seconds = round(sum(m.get("seconds", 0) for k, m in metrics.items() if k in ("kto", "dpo")), 1)
    row.outcome = run["status"]
    produced = run.get("produced_version_id")

    # A candidate on canary: real users keep chatting (with their real preference) until the scheduler decides.
    async def canary_decided() -> bool:
        return (await alias_view(client))["canary"] is None

    if not await canary_decided():
        await users.chat_until(canary_decided, lambda: users.rng.choice(train))
    aliases = {ALIAS: await alias_view(client)}
    events = await admin(client, f"/adapters/{ALIAS}/events?limit=5")
    decided = next((e for e in events if e["actor"] == "canary"), None)
    if decided is not None and produced is not None and run["status"] == "succeeded":
        row.outcome = f"canary → {decided['action']}"
        row.canary = decided["evidence"]
    versions = [v for v in aliases[ALIAS]["versions"] if v["id"] == produced]
    row.version = versions[0]["label"] if versions else ""
    await measure_active(users, heldout, row, aliases[ALIAS]["active"])
    row.wall_seconds = round(time.monotonic() - started, 1)
    return row


def print_table(rows: list[RoundRow]) -> None:
    head = f"{'round':<10}{'ratings':>8}{'+/-':>9} {'outcome':<22}{'active':<22}{'held-out up':>12}{'greedy':>8}"
    head += f"{'factual':>9}"
    head += f"{'AUC':>7}{'z':>7}{'AUC/tok':>9}{'KL':>7}{'non-ans':>9}{'train s':>9}{'wall s':>8}"
    print(head)  # "=" after the up-rate: the active version had not changed; its last measurement stands
    for r in rows:
        g = r.gate
        print(
            f"{r.name:<10}{r.ratings_used:>8}{f'{r.desirable}/{r.undesirable}':>9} {r.outcome:<22}{r.active_after:<22}"
            f"{r.heldout_uprate:>11.0%}{' ' if r.measured_again else '='}"
            f"{r.heldout_uprate_greedy:>8.0%}{r.factual:>9.0%}"
            f"{g.get('heldout_auc', float('nan')):>7.2f}"
            f"{g.get('heldout_auc_z', float('nan')):>7.2f}{g.get('heldout_auc_per_token', float('nan')):>9.2f}"
            f"{g.get('probe_kl', float('nan')):>7.3f}"
            f"{str(g.get('non_answers', '-')) + '/' + str(g.get('non_answers_incumbent', '-')):>9}"
            f"{r.train_seconds:>9.0f}{r.wall_seconds:>8.0f}"
        )


def draw_chart(rows: list[RoundRow], rule: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    names = [r.name for r in rows]
    ax.plot(names, [100 * r.heldout_uprate for r in rows], marker="o", label="held-out up-rate (users' sampling)")
    ax.plot(names, [100 * r.heldout_uprate_greedy for r in rows], marker="^", label="held-out up-rate (greedy)")
    ax.plot(names, [100 * r.factual for r in rows], marker="s", linestyle="--", label="factual probes correct")
    for i, r in enumerate(rows[1:], start=1):
        ax.annotate(r.outcome, (i, 100 * r.heldout_uprate), textcoords="offset points", xytext=(0, 8), fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title(f"loraloop adaptation: {rule}")
    # Below the axes: inside, wherever it sits, it covers some round's line or outcome label.
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def run(args: argparse.Namespace) -> list[RoundRow]:
    rule = load_rule(args.rule)
    train, heldout = load_prompts()
    data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="loraloop-adaptation-"))
    if data_dir.exists() and any(data_dir.iterdir()):
        raise SystemExit(f"{data_dir} is not empty: the benchmark needs a fresh data dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(kv.split("=", 1) for kv in args.env)
    server = Server(data_dir, args.port, args.ratings, extra)
    rows: list[RoundRow] = []
    started = time.monotonic()
    learning_seconds = 0.0
    server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{args.port}", timeout=600) as client:
            await server.wait_ready(client)
            users = Users(client, rule, args.noise, args.max_tokens, args.temperature, args.seed)
            base = RoundRow("base")
            aliases = {a["name"]: a for a in await admin(client, "/adapters")}
            await measure_active(users, heldout, base, aliases[ALIAS]["active"] if ALIAS in aliases else None)
            base.wall_seconds = round(time.monotonic() - started, 1)
            rows.append(base)
            learning_seconds = time.monotonic() - started  # the base measurement and the learning rounds
            print_table(rows)
            names = [f"round {i}" for i in range(1, args.rounds + 1)] + (["poisoned"] if args.poison else [])
            for name in names:
                row = await play_round(users, train, heldout, name, poison=name == "poisoned")
                rows.append(row)
                if name != "poisoned":
                    learning_seconds = time.monotonic() - started
                print(f"--- {name} ({time.monotonic() - started:.0f} s so far)", flush=True)
                print_table(rows)
    finally:
        server.stop()
    total = time.monotonic() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    learned = [r for r in rows if r.name.startswith("round")]
    best_gain = max((r.heldout_uprate for r in learned), default=rows[0].heldout_uprate) - rows[0].heldout_uprate
    summary = {
        "rule": args.rule,
        "noise": args.noise,
        "ratings_per_round": args.ratings,
        "total_seconds": round(total, 1),
        "learning_seconds": round(learning_seconds, 1),
        "uprate_gain_points": round(100 * best_gain, 1),
        "min_factual_after_promotion": min((r.factual for r in rows if "promote" in r.outcome), default=None),
        "poison_kept_out": (rows[-1].active_after == rows[-2].active_after) if args.poison else None,
        "rounds": [asdict(r) for r in rows],
        "data_dir": str(data_dir),
    }
    (out / "adaptation.json").write_text(json.dumps(summary, indent=2))
    draw_chart(rows, args.rule, out / "adaptation.png")
    print(
        f"\nheld-out up-rate {rows[0].heldout_uprate:.0%} → best {rows[0].heldout_uprate + best_gain:.0%} "
        f"(+{100 * best_gain:.0f} points); base and learning rounds {learning_seconds / 60:.1f} min, "
        f"total {total / 60:.1f} min; "
        f"results in {out / 'adaptation.json'} and {out / 'adaptation.png'}"
    )
    if not args.keep_data:
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rule", default="bench.rules:concise_answers", help="package.module:function(answer, prompt)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ratings", type=int, default=240, help="new ratings that make a round due")
    parser.add_argument("--noise", type=float, default=0.1, help="share of thumbs flipped")
    parser.add_argument(
        "--poison", action=argparse.BooleanOptionalAction, default=True, help="end with a random-label round"
    )
    # An answer cut at max_tokens is a thumbs-down, so the cap sets the base rate: 4 % of the bundled model's
    # answers finish within 64 tokens, 19 % within 128 (temperature 1.0). Below ~15 %, most thumbs-up under
    # 10 % noise are flips and a round has little to learn from.
    parser.add_argument("--max-tokens", type=int, default=128)
    # 1.0 is the chat API's default. At 0.7 only 5 % of the base model's answers were short: with 10 % label
    # noise two thirds of the thumbs-up were flips, and round 1 learned nothing (held-out AUC 0.50).
    parser.add_argument("--temperature", type=float, default=1.0, help="the users' sampling temperature")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--data-dir", help="fresh data dir (default: a new temp dir)")
    parser.add_argument("--keep-data", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument(
        "--env", action="append", default=[], help="extra server setting, e.g. LORALOOP_TUNING_EPOCHS=2"
    )
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
