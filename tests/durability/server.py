"""A real `loraloop serve` process that can be killed with SIGKILL and started again on the same data.

The browser tests' `running_server` starts a server once; these tests also kill it mid-load, restart it
on the same database and adapter directory, run two of them side by side, and read its memory.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import MODEL_CACHE
from tests.web.server import LORALOOP, _wait_until_ready, free_port


@dataclass
class ServerProcess:
    """One `loraloop serve` on a fixed port; `start()` again after `kill()` reuses the port and the data."""

    data_dir: Path
    base_model: Path
    database_url: str | None = None  # default: the SQLite file in data_dir
    adapter_dir: Path | None = None  # default: <data_dir>/adapters
    poll_seconds: float = 0.3
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"server-{self.port}.log"

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the server is not running")
        return self.process.pid

    def environment(self) -> dict[str, str]:
        env = os.environ | {
            "LORALOOP_DATA_DIR": str(self.data_dir),
            "LORALOOP_BASE_MODEL": str(self.base_model),
            "LORALOOP_MODEL_CACHE_DIR": str(MODEL_CACHE),
            "LORALOOP_DEVICE": "cpu",
            "LORALOOP_DTYPE": "float32",
            "LORALOOP_PORT": str(self.port),
            "LORALOOP_SWAP_POLL_SECONDS": str(self.poll_seconds),
            "LORALOOP_DEFAULT_MAX_TOKENS": "16",
            "LORALOOP_LOG_FORMAT": "json",
            "LORALOOP_LOG_LEVEL": "warning",
            # A scheduled round in the server would race the tests' own rounds and locks.
            "LORALOOP_TUNING_SCHEDULE_ENABLED": "false",
        }
        if self.database_url is not None:
            env["LORALOOP_DATABASE_URL"] = self.database_url
        if self.adapter_dir is not None:
            env["LORALOOP_ADAPTER_DIR"] = str(self.adapter_dir)
        return env | self.env

    def start(self, *, wait: bool = True) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a") as log:  # appended: a restart keeps the killed run's log above it
            self.process = subprocess.Popen(
                [str(LORALOOP), "serve"], env=self.environment(), stdout=log, stderr=subprocess.STDOUT
            )
        self.starts += 1
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        if self.process is None:
            raise RuntimeError("start() the server first")
        _wait_until_ready(self.process, self.url, self.log_path)

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, no buffer is flushed; only what was committed survives."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server process has used so far, from /proc (Linux)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmRSS not found in /proc status")


@contextmanager
def server_process(data_dir: Path, base_model: Path, **options: object) -> Iterator[ServerProcess]:
    """A started, ready server, stopped (or killed, if it hangs) at the end whatever happened."""
    server = ServerProcess(data_dir, base_model, **options)  # type: ignore[arg-type]
    try:
        server.start()
        yield server
    finally:
        server.stop()
