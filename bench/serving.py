"""Serving throughput and latency through HTTP, loraloop against baselines run in the same invocation.

    make bench                                                            # A + loraloop
    flock /tmp/loraloop-cpu.lock .venv/bin/python bench/serving.py --llama-cpp   # + both llama.cpp servers

Every engine is a server process answering OpenAI streaming chat requests (chat prompts, greedy,
max_tokens 128) from N concurrent clients, each sending requests back to back. The clients arrive
over a `--warmup` (10 s), and only the `--seconds` window after it is measured: tokens count when they
arrive inside it, so servers that run one request at a time are not flattered by a long drain, and the
start-up wave of N prompts at once is not what a level measures. Engines:

- A: plain transformers + PEFT `generate` with a streamer, one request at a time, behind a minimal
  threaded HTTP server (this file, `--serve-hf`), same adapter and dtype as loraloop;
- B (opt-in `--llama-cpp`): the pip `llama-cpp-python[server]` (n_threads 1, its faster setting on 2
  cores; one request at a time, the others queued) and the native `llama-server` built with cmake from
  that sdist's vendored llama.cpp (`-t 2 -np 32`, continuous batching), on the bundled GGUF (Q4_1, base
  model: no adapter), with `repeat_penalty` 1.0 so greedy means greedy. Built once into
  ~/.cache/loraloop/llama.cpp;
- loraloop: `loraloop serve` on a temporary data dir, with nine random rank-16 adapter versions of
  `default` registered (v1 active).

Figures: aggregate completion tok/s at each concurrency, time to first token and inter-token latency
p50/p99, peak RSS of each server, the machine's measured matmul GFLOP/s and memory GB/s and what
share of them loraloop reaches, 8 different pinned adapters mixed vs one, and a hot-swap (v9 promoted
in the registry) in the middle of a 32-client run: failed requests and latency around the swap.
It prints a table with ratios and writes everything to a JSON file (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VENV_BIN = Path(sys.executable).parent
MODEL_CACHE = Path(os.environ.get("LORALOOP_MODEL_CACHE_DIR", Path.home() / ".cache" / "loraloop"))
LLAMA_DIR = MODEL_CACHE / "llama.cpp"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
MAX_TOKENS = 128
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "Describe a walk through a busy market in the morning.",
    "Give me ten tips for learning a new language, with a sentence on each.",
    "Tell me about the history of the bicycle.",
    "Write a letter to a friend about a trip to the mountains.",
    "Explain why the sky is blue to a curious child.",
    "Describe how bread is made, from the field to the table.",
]


# -- the load client ------------------------------------------------------------------------------
@dataclass
class Request:
    started: float
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0  # the server's usage count when it finished in the window, else chunks received in it
    failed: str | None = None
    fingerprint: str | None = None
    answered: bool = False  # the server sent a response (status line) to it
    retries: int = 0


@dataclass
class Level:
    clients: int
    seconds: float
    tok_s: float
    requests: int
    failed: int
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    errors: list[str]
    retries: int = 0  # requests sent again after a kept-alive connection closed unanswered (see `_stream`)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": round(pick(0.5) * 1000, 1), "p99": round(pick(0.99) * 1000, 1)}


async def _stream(http: httpx.AsyncClient, payload: dict[str, Any], deadline: float) -> Request:
    """One streamed chat request; cut off (the client hangs up) when the window closes.

    A request that a server closed its kept-alive connection on before answering at all is sent once more on
    a new connection, as browsers do: llama-server closed about one in four at one client (httpx:
    "Server disconnected without sending a response"). Such a server never saw the request; one that
    dies fails the second try too. The retries are counted."""
    request = Request(started=time.perf_counter())
    try:
        await _stream_once(http, payload, deadline, request)
    except httpx.RemoteProtocolError as exc:  # raised only before any answer, on the first try
        if "without sending a response" in str(exc):
            request.retries += 1
            await _stream_once(http, payload, deadline, request)
        else:
            request.failed = f"RemoteProtocolError: {exc}"
    return request


async def _stream_once(http: httpx.AsyncClient, payload: dict[str, Any], deadline: float, request: Request) -> None:
    body = payload | {"stream": True, "stream_options": {"include_usage": True}}
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            request.answered = True
            if response.status_code != 200:
                request.failed = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            finished = False
            async for line in response.aiter_lines():
                finished = finished or line == "data: [DONE]"
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                now = time.perf_counter()
                request.fingerprint = event.get("system_fingerprint") or request.fingerprint
                if event.get("usage"):
                    request.tokens = event["usage"]["completion_tokens"]
                elif event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                    if now > deadline:
                        break
                    request.chunk_times.append(now)
            else:
                request.tokens = request.tokens or len(request.chunk_times)
                if not finished:  # the server ended the stream early (a failed step): not a finished answer
                    request.failed = "stream ended without [DONE]"
                return
    except httpx.RemoteProtocolError as exc:
        if not request.answered and not request.retries:
            raise  # `_stream` decides
        request.failed = f"RemoteProtocolError: {exc}"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        request.failed = f"{type(exc).__name__}: {exc}"
    request.tokens = len(request.chunk_times)  # cut off: what arrived in the window


async def run_level(
    url: str,
    clients: int,
    seconds: float,
    payload: Callable[[int, int], dict[str, Any]],
    during: Callable[[float], Any] | None = None,
    stagger: float = 0.0,
    warmup: float = 0.0,
) -> tuple[Level, list[Request]]:
    """`clients` loops of back-to-back requests; `payload(client, n)` builds each request.

    `stagger`: client i sends its first request i * stagger / clients seconds in, so arrivals spread out.
    `warmup`: the clients start staggered over it (unless `stagger` says otherwise) and the measured window
    is the `seconds` after it: the level's steady state, not its start-up wave. On a 2-core VM a 32-client
    answer takes about 20 s, so a window that opens with the clients' first requests measures one wave of
    32 prompts prefilled together and nothing else. Without a warm-up every token counts, as before."""
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    stagger = stagger or warmup
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as http:
        start = time.perf_counter()
        opens = start + warmup
        deadline = opens + seconds
        done: list[Request] = []

        async def client(i: int) -> None:
            n = 0
            await asyncio.sleep(i * stagger / clients)
            while time.perf_counter() < deadline:
                done.append(await _stream(http, payload(i, n), deadline))
                n += 1

        tasks = [client(i) for i in range(clients)]
        if during is not None:
            tasks.append(during(start))
        await asyncio.gather(*tasks)

    def tokens_in_window(r: Request) -> float:
        """The server's token count (or the chunks seen) times the share of its chunks that came in the window."""
        if not r.chunk_times:
            return 0.0 if warmup else r.tokens
        return r.tokens * sum(t >= opens for t in r.chunk_times) / len(r.chunk_times)

    ttft = [r.chunk_times[0] - r.started for r in done if r.chunk_times and r.started >= opens]
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False) if a >= opens]
    failed = [r for r in done if r.failed]
    level = Level(
        clients=clients,
        seconds=seconds,
        tok_s=round(sum(tokens_in_window(r) for r in done if not r.failed) / seconds, 1),
        requests=len(done),
        failed=len(failed),
        ttft_ms=_percentiles(ttft),
        itl_ms=_percentiles(itl),
        errors=sorted({r.failed for r in failed if r.failed})[:5],
        retries=sum(r.retries for r in done),
    )
    return level, done


UNIQUE_PROMPTS = False  # --unique-prompts


def chat(model: str, client: int, n: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    prompt = PROMPTS[(client + n) % len(PROMPTS)]
    if UNIQUE_PROMPTS:  # first in the message: what prompts share ends with the chat template's system prompt
        prompt = f"(request {client}.{n}) {prompt}"
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS}
    return body | {"temperature": 0} | (extra or {})


async def settle(url: str, model: str, extra: dict[str, Any] | None = None) -> None:
    """Warm the server up; on loraloop, also wait until nothing runs or waits, so that a window starts clean.

    A request cut off at the end of a window should be cancelled at once, but if a server let it run on,
    the next window would start with it still generating (found: a loraloop bug did, and the mixed-adapter
    window's 32nd request waited ~15 s for a slot). Servers without loraloop's gauges are only warmed up."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        body = chat(model, 0, 0, extra) | {"max_tokens": 4}
        response = await http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            metrics = await http.get("/metrics")
            busy = re.findall(r"^loraloop_(?:running_sequences|queue_depth) (\S+)$", metrics.text, re.M)
            if metrics.status_code != 200 or not busy or not any(float(value) for value in busy):
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the server still runs requests 120 s after the clients left")


# -- server processes -----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _peak_rss_mib(pid: int) -> float:
    """VmHWM: the most resident memory the process ever had."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


@contextlib.contextmanager
def server_process(
    command: list[str], ready_path: str, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = _free_port()
    command = [part.replace("{port}", str(port)) for part in command]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited: {log_path.read_text(errors='replace')[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + ready_path, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{command[0]} not ready in 300 s; see {log_path}")
                time.sleep(0.5)
            yield url, process
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


# -- baseline A: transformers + PEFT generate, one request at a time ------------------------------
def serve_hf(port: int, adapter_dir: Path) -> None:
    """What a user writes first: load base + LoRA with PEFT, `generate` under a lock, stream tokens as SSE."""
    import torch
    from peft import PeftModel
    from transformers.generation.streamers import BaseStreamer

    from serving import base_model
    from serving.prompt import render_prompt

    model_dir = base_model.prepare_bundled_model(MODEL_CACHE)
    device = torch.device("cpu")
    dtype = base_model.resolve_dtype("auto", device)
    model = PeftModel.from_pretrained(base_model.load_model(model_dir, device, dtype), adapter_dir).eval()
    tokenizer = base_model.load_tokenizer(model_dir)
    one_at_a_time = threading.Lock()

    class SSE(BaseStreamer):
        def __init__(self, out: Any) -> None:
            self.out, self.prompt_seen, self.count = out, False, 0

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate hands the prompt over first
                self.prompt_seen = True
                return
            for token in value.reshape(-1).tolist():
                self.count += 1
                self.send({"choices": [{"index": 0, "delta": {"content": tokenizer.decode([token])}}]})

        def end(self) -> None:
            pass

        def send(self, event: dict[str, Any]) -> None:
            self.out.write(b"data: " + json.dumps(event).encode() + b"\n\n")  # BrokenPipe ends generate
            self.out.flush()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # the connection closes after each answer: no chunked encoding needed

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            prompt = render_prompt(tokenizer, body["messages"])
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            streamer = SSE(self.wfile)
            try:
                with one_at_a_time, torch.inference_mode():
                    model.generate(
                        torch.tensor([prompt]),
                        max_new_tokens=body.get("max_tokens", MAX_TOKENS),
                        do_sample=False,
                        streamer=streamer,
                    )
                finish = [{"index": 0, "delta": {}, "finish_reason": "length"}]
                streamer.send({"choices": finish})
                usage = {"prompt_tokens": len(prompt), "completion_tokens": streamer.count}
                streamer.send({"choices": [], "usage": usage})
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client left; the lock is free for the next request

    class Server(ThreadingHTTPServer):
        request_queue_size = 128  # the default listen backlog of 5 refuses connections from 32 clients

    Server(("127.0.0.1", port), Handler).serve_forever()


# -- baseline B: llama.cpp, built once outside the repository -------------------------------------
def _run(command: list[str], **kwargs: Any) -> None:
    print("  $", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def ensure_llama_cpp() -> tuple[Path, Path]:
    """The pip server's Python and the native llama-server from the same sdist (~4 min each the first time)."""
    env = os.environ | {"CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    venv = LLAMA_DIR / "venv"
    python = venv / "bin" / "python"
    if not (venv / ".installed").exists():
        _run([sys.executable, "-m", "venv", str(venv)])
        _run([str(python), "-m", "pip", "install", "-q", f"{LLAMA_CPP_PYTHON.replace('==', '[server]==')}"], env=env)
        (venv / ".installed").touch()
    server = LLAMA_DIR / "build" / "bin" / "llama-server"
    if not server.exists():
        sdists = LLAMA_DIR / "sdist"
        _run([str(python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(sdists),
              LLAMA_CPP_PYTHON])  # fmt: skip
        archive = next(sdists.glob("llama_cpp_python-*.tar.gz"))
        source = LLAMA_DIR / "src"
        shutil.rmtree(source, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(source, filter="data")
        vendored = next(source.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"
        build = LLAMA_DIR / "build"
        _run(["cmake", "-S", str(vendored), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
              "-DLLAMA_OPENSSL=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"], env=env)  # fmt: skip
        _run(["cmake", "--build", str(build), "-j2", "--target", "llama-server"], env=env)
    return python, server


# -- loraloop: a data dir with nine adapter versions ----------------------------------------------
def save_random_adapters(model_dir: Path, out_dir: Path, versions: int) -> list[Path]:
    """`versions` random rank-16 LoRAs on every servable projection, saved as PEFT saves trained ones
    (`out_dir/v1`, ...): a real but gentle change each, answers differ and text stays text."""
    import torch
    from peft import LoraConfig, get_peft_model

    from serving import base_model
    from serving.engine.lora import SERVABLE_MODULES

    config = LoraConfig(r=16, lora_alpha=32, target_modules=sorted(SERVABLE_MODULES), init_lora_weights=False)
    model = get_peft_model(base_model.load_model(model_dir, torch.device("cpu"), torch.float32), config)
    sources = []
    for number in range(1, versions + 1):
        torch.manual_seed(number)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.02)
        sources.append(out_dir / f"v{number}")
        model.save_pretrained(sources[-1], safe_serialization=True)
    return sources


def prepare_loraloop(data_dir: Path, versions: int = 9) -> tuple[str, Path]:
    """Migrate a fresh SQLite DB and register `versions` random rank-16 adapters of `default` (v1 active)."""
    from feedback import migrate
    from serving import base_model
    from tests.helpers import publish_adapter

    url = f"sqlite:///{data_dir / 'loraloop.db'}"
    data_dir.mkdir(parents=True)
    migrate.upgrade(url)
    model_dir = base_model.prepare_bundled_model(MODEL_CACHE)
    sources = save_random_adapters(model_dir, data_dir / "sources", versions)
    for number, source in enumerate(sources, start=1):
        publish_adapter(
            url,
            data_dir / "adapters",
            source,
            number=number,
            base_model_id="SmolLM2-135M-Instruct",
            promote=number == 1,
            actor="bench",
        )
    return url, sources[0]


def promote(url: str, number: int) -> None:
    from sqlalchemy import select

    from feedback import adapter_registry
    from feedback.db import make_sync_engine, session_scope
    from feedback.models import AdapterVersion

    engine = make_sync_engine(url)
    with session_scope(engine) as session:
        version = session.scalars(
            select(AdapterVersion).where(AdapterVersion.adapter_name == "default", AdapterVersion.version == number)
        ).one()
        adapter_registry.promote(session, version.id, actor="bench", reason="hot-swap under load")
    engine.dispose()


# -- the machine ----------------------------------------------------------------------------------
def machine_ceilings() -> dict[str, float]:
    """Measured matmul GFLOP/s (fp32, bf16; 2048x2048, 512x512 for emulated bf16) and memory bandwidth
    (a copy of 512 MiB, read + write)."""
    import torch

    from serving.base_model import cpu_has_native_bf16

    def best(run: Callable[[], Any], repeat: int = 5, budget_s: float = 3.0) -> float:
        # The budget: a CPU without bf16 in hardware (AVX2 only) emulates it at ~0.3 GFLOP/s, a minute a call.
        start = time.perf_counter()
        run()
        times = [time.perf_counter() - start]
        while len(times) <= repeat and sum(times) < budget_s:
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times)

    out: dict[str, float] = {"threads": torch.get_num_threads()}
    for dtype in (torch.float32, torch.bfloat16):
        n = 2048 if dtype == torch.float32 or cpu_has_native_bf16() else 512
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        seconds = best(lambda a=a, b=b: a @ b)
        out[f"matmul_gflops_{str(dtype).removeprefix('torch.')}"] = round(2 * n**3 / seconds / 1e9, 1)
    src = torch.ones(128 * 2**20)  # 512 MiB of fp32
    dst = torch.empty_like(src)
    out["memory_gb_s"] = round(2 * src.numel() * 4 / best(lambda: dst.copy_(src)) / 1e9, 1)
    return out


def serving_dtype() -> str:
    """The dtype `loraloop serve` picks on this machine with the default `dtype: auto` (the same rule)."""
    import torch

    from serving.base_model import resolve_dtype

    return str(resolve_dtype("auto", torch.device("cpu"))).removeprefix("torch.")


def model_params() -> int:
    return sum(math.prod(shape) for shape in _weight_shapes().values())


@functools.cache
def _weight_shapes() -> dict[str, list[int]]:
    from safetensors import safe_open

    from serving import base_model

    shapes = {}
    for path in base_model.prepare_bundled_model(MODEL_CACHE).glob("*.safetensors"):
        with safe_open(path, "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[name] = tensors.get_slice(name).get_shape()
    return shapes


def one_row_step_bytes(dtype: str) -> int:
    """Weight bytes a one-row decode step reads: 4-bit projections where the engine keeps that form (bf16 on a
    CPU with the int4 kernel: 4 bits a weight plus a bf16 scale and zero per 32), the rest in `dtype`."""
    from serving.engine.q4 import GROUP_SIZE, q4_kernel_works

    four_bit = dtype == "bfloat16" and q4_kernel_works()
    total = 0
    for name, shape in _weight_shapes().items():
        n = math.prod(shape)
        if four_bit and name.endswith("_proj.weight") and shape[-1] % GROUP_SIZE == 0:
            total += n // 2 + n // GROUP_SIZE * 4
        else:
            total += n * (4 if dtype == "float32" else 2)
    return total


# `python -m llama_cpp.server` with the model loaded as llama-server's `--no-repack` loads it (no extra weight
# buffers: the repacked and AMX layouts). On an AMX VM the pip server crashed at its first request otherwise
# (exit 139, 2026-12-04), as llama-server did without `--no-repack`.
_PIP_SERVER_WITHOUT_REPACK = """
import runpy
import llama_cpp.llama_cpp as bindings
defaults = bindings.llama_model_default_params
def without_repack():
    params = defaults()
    params.use_extra_bufts = False
    return params
bindings.llama_model_default_params = without_repack
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


# -- scenarios ------------------------------------------------------------------------------------
async def concurrency_levels(
    url: str, model: str, levels: list[int], seconds: float, warmup: float, extra: dict[str, Any] | None = None
) -> list[Level]:
    results = []
    for clients in levels:
        await settle(url, model, extra)
        level, _ = await run_level(url, clients, seconds, lambda i, n: chat(model, i, n, extra), warmup=warmup)
        print(f"    {clients:>3} clients: {level.tok_s:7.1f} tok/s  ttft p50 {level.ttft_ms['p50']} ms  "
              f"itl p50 {level.itl_ms['p50']} ms  failed {level.failed}  retried {level.retries}",
              flush=True)  # fmt: skip
        results.append(level)
    await settle(url, model, extra)
    return results


async def hot_swap(url: str, db_url: str, seconds: float) -> dict[str, Any]:
    """32 clients on `default` for 2 x `seconds`; v9 is promoted in the registry a quarter of the way in, so
    that clients start requests on the new version before the end even where a request takes `seconds`
    (32 clients on a slow CPU); compare latency around the flip.

    The clients start staggered over the first `seconds / 2`, as independent users arrive. Started together,
    with answers of the same length (greedy, 128 tokens), they finish together and arrive together again:
    every ~12 s a step prefills five to seven prompts at once (the 256-token budget) and the running streams
    wait 0.3-0.7 s for their next token (the engine's slow steps on an AVX512-BF16 VM came in such waves
    before the promotion as after it). The window around the flip opens at the promotion and closes 2 s
    after the first request on v9, i.e. at the next wave, so it always held one, where the steady window
    diluted its waves over 20 s: there the swap window's p99 was 2.3-2.5x the steady one."""
    swap: dict[str, float] = {}

    async def promote_midway(start: float) -> None:
        await asyncio.sleep(seconds / 2)
        swap["promoted"] = time.perf_counter()
        await asyncio.to_thread(promote, db_url, 9)

    await settle(url, "default")
    level, requests = await run_level(
        url, 32, 2 * seconds, lambda i, n: chat("default", i, n), promote_midway, stagger=seconds / 2
    )
    promoted = swap["promoted"]
    switched = min((r.started for r in requests if r.fingerprint == "default@9"), default=float("nan"))
    window = (promoted, (switched if switched == switched else promoted) + 2.0)

    def gaps(keep: Callable[[float], bool]) -> list[float]:
        return [b - a for r in requests for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False) if keep(b)]

    steady, during = gaps(lambda t: t < promoted), gaps(lambda t: window[0] <= t <= window[1])
    return {
        "level": asdict(level),
        "requests_on_new_version": sum(r.fingerprint == "default@9" for r in requests),
        "seconds_to_first_request_on_new_version": round(switched - promoted, 2),
        "itl_ms_steady": _percentiles(steady),
        "itl_ms_during_swap": _percentiles(during),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="loraloop-bench-"))
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict[str, Any] = {
        "max_tokens": MAX_TOKENS,
        "seconds_per_level": args.seconds,
        "warmup_seconds": args.warmup,
        "engines": {},
    }
    print("machine ceilings ...", flush=True)
    report["machine"] = machine_ceilings()
    report["serving_dtype"] = serving_dtype()
    report["model_params"] = model_params()
    report["one_row_step_bytes"] = one_row_step_bytes(report["serving_dtype"])
    print(f"  {report['machine']}, {report['model_params'] / 1e6:.1f} M params", flush=True)
    db_url, adapter_v1 = prepare_loraloop(work / "data")

    if not args.skip_baseline:
        print("baseline A: transformers + PEFT generate, one request at a time", flush=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-hf", "{port}", str(adapter_v1)]
        with server_process(command, "/", work / "hf.log") as (url, process):
            runs = await concurrency_levels(url, "default", levels, args.seconds, args.warmup)
            report["engines"]["A: transformers+PEFT"] = {"levels": runs, "peak_rss_mib": _peak_rss_mib(process.pid)}

    if args.llama_cpp:
        python, llama_server = ensure_llama_cpp()
        from serving.base_model import bundled_gguf_path

        gguf = str(bundled_gguf_path())
        greedy = {"repeat_penalty": 1.0}
        native = [str(llama_server), "-m", gguf, "--host", "127.0.0.1", "--port", "{port}", "-t", "2", "-tb", "2",
                  "-c", "8192", "-np", "32", "-kvu", "--no-webui", "--no-repack"]  # fmt: skip
        # --no-repack: on this AMX CPU the repacked weights' matmul (ggml_backend_amx_mul_mat) segfaulted at once.
        print("baseline B: native llama-server (-t 2 -np 32)", flush=True)
        await _baseline(report, "B: llama-server", native, "/health", work / "llama-server.log", levels, args, greedy)
        pip_server = [str(python), "-c", _PIP_SERVER_WITHOUT_REPACK, "--model", gguf, "--host", "127.0.0.1",
                      "--port", "{port}", "--n_threads", "1", "--n_threads_batch", "1", "--n_ctx", "2048",
                      "--verbose", "False", "--interrupt_requests", "False"]  # fmt: skip
        # interrupt_requests (on by default) ends the running answer whenever another request arrives: with
        # 4 or more clients every answer was cut off after a token or two (0 tok/s). Off, requests queue.
        print("baseline B: llama-cpp-python server (n_threads 1)", flush=True)
        await _baseline(report, "B: llama-cpp-python", pip_server, "/v1/models", work / "llama-cpp-python.log",
                        levels, args, greedy)  # fmt: skip

    print("loraloop serve", flush=True)
    env = os.environ | {
        "LORALOOP_DATA_DIR": str(work / "data"),
        "LORALOOP_MODEL_CACHE_DIR": str(MODEL_CACHE),
        "LORALOOP_SWAP_POLL_SECONDS": "0.5",
        "LORALOOP_MAX_LOADED_ADAPTERS": "10",
        "LORALOOP_LOG_FORMAT": "json",
        "LORALOOP_LOG_LEVEL": "warning",
        "LORALOOP_TUNING_SCHEDULE_ENABLED": "false",
    }
    command = [str(VENV_BIN / "loraloop"), "serve", "--port", "{port}"]
    with server_process(command, "/ready", work / "loraloop.log", env) as (url, process):
        engine: dict[str, Any] = {"levels": await concurrency_levels(url, "default", levels, args.seconds, args.warmup)}
        print("  one pinned adapter vs eight mixed, 32 clients", flush=True)
        for name, model_of in (("single_adapter", lambda i: "default@1"), ("mixed_8_adapters", _mixed)):
            for client in range(8):  # load every adapter before the window: on-demand loads are not measured here
                await settle(url, model_of(client))
            level, _ = await run_level(
                url, 32, args.seconds, lambda i, n, m=model_of: chat(m(i), i, n), warmup=args.warmup
            )
            engine[name] = asdict(level)
            print(f"    {name}: {level.tok_s} tok/s, failed {level.failed}", flush=True)
        print("  hot-swap to default@9 in the middle of a 32-client run", flush=True)
        engine["hot_swap"] = await hot_swap(url, db_url, max(args.seconds, 20))
        print(f"    {engine['hot_swap']}", flush=True)
        engine["peak_rss_mib"] = _peak_rss_mib(process.pid)
        engine["prompt_tokens"] = _prompt_tokens(url)
        report["engines"]["loraloop"] = engine
    shutil.rmtree(work, ignore_errors=True)
    return report


async def _baseline(
    report: dict[str, Any],
    name: str,
    command: list[str],
    ready_path: str,
    log_path: Path,
    levels: list[int],
    args: argparse.Namespace,
    extra: dict[str, Any],
) -> None:
    """One llama.cpp server's levels; a server that dies is reported as such and the benchmark goes on."""
    try:
        with server_process(command, ready_path, log_path) as (url, process):
            runs = await concurrency_levels(url, "default", levels, args.seconds, args.warmup, extra)
            report["engines"][name] = {"levels": runs, "peak_rss_mib": _peak_rss_mib(process.pid)}
    except (RuntimeError, httpx.HTTPError) as exc:
        print(f"  {name} failed: {str(exc)[-300:]}", flush=True)
        report.setdefault("failed_baselines", {})[name] = str(exc)[-2000:]


def _prompt_tokens(url: str) -> dict[str, float]:
    """The server's prompt tokens over the whole run, and how many of them came from its prefix cache: the
    bench's prompts come from a fixed list, so many repeat exactly (per adapter version) and more than a
    shared system prompt is reused."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"loraloop_prompt_tokens_total": 0.0, "loraloop_prompt_cached_tokens_total": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return {"all": totals["loraloop_prompt_tokens_total"], "cached": totals["loraloop_prompt_cached_tokens_total"]}


def _mixed(client: int) -> str:
    return f"default@{client % 8 + 1}"


# -- the report -----------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, Level):
        return asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def summarise(report: dict[str, Any]) -> str:
    engines = report["engines"]
    levels = [lv["clients"] for lv in engines["loraloop"]["levels"]]
    window = f"{report['seconds_per_level']} s per level after a {report.get('warmup_seconds', 0)} s warm-up"
    lines = ["", f"aggregate completion tok/s (max_tokens {MAX_TOKENS}, {window})"]
    header = (
        f"{'engine':<24}"
        + "".join(f"{c:>9} cl" for c in levels)
        + "   TTFT p50/p99 ms @1 | @32    ITL p50/p99 ms @1 | @32   peak RSS"
    )
    lines.append(header)
    for name, data in engines.items():
        runs = {lv["clients"]: lv for lv in data["levels"]}
        row = f"{name:<24}" + "".join(f"{runs[c]['tok_s']:>12.1f}" if c in runs else f"{'-':>12}" for c in levels)

        def lat(key: str, c: int, runs: dict[int, Any] = runs) -> str:
            """p50/p99; "-" where no request started in the window got its first token in it (a server that
            answers one request at a time, with its queue longer than the window)."""
            if c not in runs or math.isnan(runs[c][key]["p50"]):
                return "-"
            return f"{runs[c][key]['p50']:.0f}/{runs[c][key]['p99']:.0f}"

        lo, hi = levels[0], levels[-1]
        row += (
            f"   {lat('ttft_ms', lo):>12} | {lat('ttft_ms', hi):<12} {lat('itl_ms', lo):>10} | {lat('itl_ms', hi):<10}"
        )
        row += f" {data['peak_rss_mib']:>8.0f} MiB"
        lines.append(row)
    ours = {lv["clients"]: lv["tok_s"] for lv in engines["loraloop"]["levels"]}
    for name, data in engines.items():
        if name == "loraloop":
            continue
        theirs = {lv["clients"]: lv["tok_s"] for lv in data["levels"]}
        ratios = "".join(f"{ours[c] / theirs[c]:>11.2f}x" if theirs.get(c) else f"{'-':>12}" for c in levels)
        lines.append(f"{'loraloop / ' + name.split(': ')[-1]:<24}{ratios}")
    lo = engines["loraloop"]
    single, mixed = lo["single_adapter"]["tok_s"], lo["mixed_8_adapters"]["tok_s"]
    lines.append(f"8 mixed adapters vs 1 (32 clients): {mixed} / {single} tok/s = {mixed / single:.2f}x")
    prompts = lo.get("prompt_tokens")
    if prompts and prompts["all"]:
        lines.append(
            f"prompt tokens from the prefix cache, whole run: {prompts['cached']:.0f} of {prompts['all']:.0f} "
            f"({100 * prompts['cached'] / prompts['all']:.0f} %; LORALOOP_PREFIX_CACHE_MIB=0 turns it off)"
        )
    swap = lo["hot_swap"]
    lines.append(
        f"hot-swap under 32 clients: {swap['level']['failed']} failed of {swap['level']['requests']} requests, "
        f"{swap['requests_on_new_version']} answered by the new version "
        f"(first {swap['seconds_to_first_request_on_new_version']} s after promotion); ITL p50/p99 steady "
        f"{swap['itl_ms_steady']['p50']}/{swap['itl_ms_steady']['p99']} ms, during swap "
        f"{swap['itl_ms_during_swap']['p50']}/{swap['itl_ms_during_swap']['p99']} ms"
    )
    machine, params = report["machine"], report["model_params"]
    dtype = report.get("serving_dtype", "bfloat16")  # what the engine computes in: its matmul ceiling applies
    weight_bytes = report.get("one_row_step_bytes", params * (4 if dtype == "float32" else 2))
    matmul = machine[f"matmul_gflops_{dtype}"]
    flops = 2 * params
    best = max(ours.values())
    line = (
        f"machine: matmul fp32 {machine['matmul_gflops_float32']} / bf16 {machine['matmul_gflops_bfloat16']} GFLOP/s, "
        f"memory {machine['memory_gb_s']} GB/s; loraloop serves in {dtype}. At its best level it uses "
        f"{best * flops / 1e9:.0f} GFLOP/s = {100 * best * flops / 1e9 / matmul:.0f} % of {dtype} matmul"
    )
    report["efficiency"] = {"compute_share_at_best_level": round(best * flops / 1e9 / matmul, 3)}
    if 1 in ours:  # only a run with a single-stream level (`--concurrency` may leave it out) measures bandwidth use
        streamed = ours[1] * weight_bytes / 1e9
        line += (
            f"; single stream reads {streamed:.1f} GB/s of weights ({weight_bytes / 1e6:.0f} MB a token) = "
            f"{100 * streamed / machine['memory_gb_s']:.0f} % of memory bandwidth"
        )
        report["efficiency"]["bandwidth_share_single_stream"] = round(streamed / machine["memory_gb_s"], 3)
    lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-cpp", action="store_true", help="also run both llama.cpp servers (built once)")
    parser.add_argument("--skip-baseline", action="store_true", help="skip baseline A (quicker engine iterations)")
    parser.add_argument("--seconds", type=float, default=20.0, help="measurement window per level")
    parser.add_argument(
        "--warmup", type=float, default=10.0, help="seconds before each window, clients arriving over them (0: none)"
    )
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument(
        "--unique-prompts",
        action="store_true",
        help="no prompt repeats (each question starts with its request's number): prefix caches reuse only the "
        "chat template's system prompt",
    )
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "loraloop-bench-serving.json")
    parser.add_argument("--serve-hf", nargs=2, metavar=("PORT", "ADAPTER_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global UNIQUE_PROMPTS
    UNIQUE_PROMPTS = args.unique_prompts
    if args.serve_hf:
        serve_hf(int(args.serve_hf[0]), Path(args.serve_hf[1]))
        return
    report = _plain(asyncio.run(bench(args)))
    table = summarise(report)
    print(table)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
