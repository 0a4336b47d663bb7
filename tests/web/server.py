"""A real `loraloop serve` process for the browser tests: its own port, data dir and SQLite database."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from serving.settings import Settings
from tests.conftest import MODEL_CACHE

LORALOOP = Path(sys.executable).parent / "loraloop"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class RunningServer:
    url: str
    data_dir: Path
    base_model: Path

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'loraloop.db'}"

    def base_label(self) -> str:
        """What the base model answers as (`system_fingerprint`), as /v1/models lists it."""
        models = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]
        return next(m["id"] for m in models if m["parent"] is None)

    def settings(self) -> Settings:
        """The server's own configuration, for tuning rounds run in the test process against its data."""
        return Settings(
            data_dir=self.data_dir,
            database_url=self.database_url,
            base_model=str(self.base_model),
            model_cache_dir=MODEL_CACHE,
            device="cpu",
            dtype="float32",
            log_format="console",
        )


@contextmanager
def running_server(data_dir: Path, base_model: Path, *, max_tokens: int = 24) -> Iterator[RunningServer]:
    """Starts the server on a free port, waits for /ready, and stops it (its log is `<data_dir>/server.log`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = os.environ | {
        "LORALOOP_DATA_DIR": str(data_dir),
        "LORALOOP_BASE_MODEL": str(base_model),
        "LORALOOP_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "LORALOOP_DEVICE": "cpu",
        "LORALOOP_DTYPE": "float32",
        "LORALOOP_PORT": str(port),
        "LORALOOP_SWAP_POLL_SECONDS": "0.3",
        "LORALOOP_DEFAULT_MAX_TOKENS": str(max_tokens),
        "LORALOOP_LOG_FORMAT": "json",
        # The tests start their own rounds; a server's scheduled round would race them.
        "LORALOOP_TUNING_SCHEDULE_ENABLED": "false",
    }
    log_path = data_dir / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([str(LORALOOP), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_ready(process, url, log_path)
            yield RunningServer(url, data_dir, base_model)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited during start-up:\n{log_path.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server was not ready within 180 s:\n{log_path.read_text()[-3000:]}")
