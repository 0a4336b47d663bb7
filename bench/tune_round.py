"""Time one tuning round on N real ratings, and check the running server swaps to the new version.

    .venv/bin/python bench/tune_round.py --ratings 100          # against `make serve` on 127.0.0.1:8000

It chats with the server N times (everyday prompts), rates each answer with a simple rule
(thumbs-up when the answer has at most 40 words), runs `loraloop tune` as its own process with the
server's data dir, then asks again until `system_fingerprint` names the new version. It prints the
round's wall time and the server's swap delay, and checks the database holds every completion and
rating it made.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import func, select

# Run as `python bench/tune_round.py`, this folder comes first on the path and `bench/serving.py` would
# shadow the `serving` package: the project root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from feedback.db import make_sync_engine, session_scope
from feedback.models import Completion, Feedback
from serving.settings import Settings

PROMPTS = [
    "What is the capital of France?",
    "Give me a tip for sleeping better.",
    "How do I boil an egg?",
    "What is photosynthesis?",
    "Suggest a name for a cat.",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What is a good breakfast?",
    "Explain what a noun is.",
    "How do I make tea?",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    parser.add_argument("--ratings", type=int, default=100)
    parser.add_argument("--alias", default="default")
    args = parser.parse_args()
    client = httpx.Client(base_url=args.server, timeout=120)

    started = time.perf_counter()
    made: list[str] = []
    for i in range(args.ratings):
        prompt = f"{PROMPTS[i % len(PROMPTS)]} (request {i})"
        reply = client.post(
            "/v1/chat/completions",
            json={
                "model": args.alias,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 64,
                "temperature": 0.8,
                "seed": i,
            },
        ).json()
        answer = reply["choices"][0]["message"]["content"]
        rating = 1 if len(answer.split()) <= 40 else -1
        client.post("/v1/feedback", json={"completion_id": reply["id"], "rating": rating}).raise_for_status()
        made.append(reply["id"])
    chat_seconds = time.perf_counter() - started
    before = reply["system_fingerprint"]

    round_started = time.perf_counter()
    tune = subprocess.run(
        [str(Path(sys.executable).parent / "loraloop"), "tune", "--alias", args.alias],
        capture_output=True,
        text=True,
        env=os.environ,
    )
    round_seconds = time.perf_counter() - round_started
    if tune.returncode != 0:
        sys.exit(tune.stderr[-3000:])
    summary = json.loads(tune.stdout.strip().splitlines()[-1])

    swap_started = time.perf_counter()
    while True:
        after = client.post(
            "/v1/chat/completions",
            json={"model": args.alias, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 16},
        ).json()
        if after["system_fingerprint"] == summary["version"] or time.perf_counter() - swap_started > 60:
            break
        time.sleep(0.2)
    swap_seconds = time.perf_counter() - swap_started

    settings = Settings()
    engine = make_sync_engine(settings.database_url)
    with session_scope(engine) as session:
        stored = set(session.scalars(select(Completion.id).where(Completion.id.in_([*made, after["id"]]))))
        rated = session.scalar(select(func.count()).select_from(Feedback).where(Feedback.completion_id.in_(made)))
    engine.dispose()
    result = {
        "ratings": args.ratings,
        "desirable": summary["counts"].get("desirable"),
        "chat_and_rate_seconds": round(chat_seconds, 1),
        "tune_round_seconds": round(round_seconds, 1),
        "training_seconds": {k: v.get("seconds") for k, v in summary["metrics"].items()},
        "training_steps": {k: v.get("steps") for k, v in summary["metrics"].items()},
        "fingerprint_before": before,
        "fingerprint_after": after["system_fingerprint"],
        "new_version": summary["version"],
        "swap_seen_after_seconds": round(swap_seconds, 1),
        "completions_stored": f"{len(stored)}/{len(made) + 1}",
        "ratings_stored": f"{rated}/{len(made)}",
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
