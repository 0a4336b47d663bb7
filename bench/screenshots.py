"""Save the screenshots issue 5 asks for into a directory: the chat page after a rated exchange, the
dashboard after two tuning rounds, and (as a bonus) the side-by-side comparison.

    .venv/bin/python bench/screenshots.py OUT_DIR           # the bundled SmolLM2: real answers (a few minutes)
    .venv/bin/python bench/screenshots.py OUT_DIR --tiny    # the tests' tiny random model (under a minute)

The pictures are taken by the browser tests themselves (tests/web), so they show exactly what the tests
check: this runs those tests with LORALOOP_TEST_SCREENSHOTS_DIR set, on a real server process, in
Debian's headless Chromium.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/web/test_chat_page.py::test_streamed_answer_rated_down_with_a_reason",
    "tests/web/test_chat_page.py::test_regenerate_side_by_side_and_pick_the_better",
    "tests/web/test_dashboard.py::test_dashboard_after_two_rounds",
]
PICTURES = {
    "chat-rated-exchange.png": "the chat page after a rated exchange (thumbs down, a reason, a comment)",
    "chat-comparison.png": "two answers side by side, the better one picked",
    "dashboard-after-two-rounds.png": "the dashboard after two tuning rounds",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where the PNG files go (created if missing)")
    parser.add_argument("--tiny", action="store_true", help="use the tests' tiny random model instead of SmolLM2")
    args = parser.parse_args()
    out_dir = args.out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    env = os.environ | {"LORALOOP_TEST_SCREENSHOTS_DIR": str(out_dir)}
    if not args.tiny:
        env["LORALOOP_TEST_WEB_MODEL"] = "bundled"
    # Two rounds with the real model and its gate take minutes on a small CPU: more than the suite's per-test limit.
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "3600", *TESTS]
    result = subprocess.run(command, cwd=ROOT, env=env, check=False)
    for name, what in PICTURES.items():
        path = out_dir / name
        print(f"{path}  {what}" if path.exists() else f"missing: {path}")
    sys.exit(result.returncode)


if __name__ == "__main__":
    main()
