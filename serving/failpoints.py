"""Failpoints: named places where a test can make this process die as if killed (SIGKILL).

Crash safety is only believable if it is tested at the awkward moments — mid-training, mid-write,
between writing a version and registering it. `LORALOOP_FAILPOINT=<name>` makes `hit(<name>)` kill
the process on the spot; unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "LORALOOP_FAILPOINT"


def hit(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
