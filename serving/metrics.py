"""Prometheus metrics (`GET /metrics`): requests, errors, latency, tokens per adapter version; queue and
running sequences; ratings by version; tuning rounds; swaps.

One registry per app (not the process-global default), so several apps in one test process never
collide and every replica exposes its own view.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_GAP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)
ROUND_BUCKETS = (10, 30, 60, 120, 300, 600, 1200, 2400, 3600, 7200)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        by_version = ["alias", "version"]
        self.requests = Counter(
            "loraloop_requests", "Chat completions finished, by outcome", [*by_version, "finish_reason"], registry=r
        )
        self.errors = Counter(
            "loraloop_http_errors", "Error responses, by status and code", ["status", "code"], registry=r
        )
        self.latency = Histogram(
            "loraloop_request_latency_seconds", "Whole request time", by_version, buckets=LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "loraloop_time_to_first_token_seconds",
            "Time to the first token",
            by_version,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraloop_inter_token_latency_seconds",
            "Time between streamed tokens",
            by_version,
            buckets=TOKEN_GAP_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("loraloop_prompt_tokens", "Prompt tokens processed", by_version, registry=r)
        self.completion_tokens = Counter(
            "loraloop_completion_tokens", "Completion tokens generated", by_version, registry=r
        )
        self.cached_prompt_tokens = Counter(
            "loraloop_prompt_cached_tokens",
            "Prompt tokens whose keys and values came from the prefix cache (hit rate = this / prompt tokens)",
            by_version,
            registry=r,
        )
        self.ratings = Counter("loraloop_ratings", "Ratings stored, by direction", [*by_version, "rating"], registry=r)
        self.comparisons = Counter("loraloop_comparisons", "Comparisons stored, by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge("loraloop_queue_depth", "Requests waiting for the engine", registry=r)
        self.running = Gauge("loraloop_running_sequences", "Sequences generating now", registry=r)
        self.loaded_adapters = Gauge("loraloop_loaded_adapters", "Adapter versions loaded in slots", registry=r)
        self.response_cache = Counter(
            "loraloop_response_cache_lookups",
            "Deterministic requests looked up in the response pre-cache, by result (hit rate = hit / all)",
            ["result"],
            registry=r,
        )
        self.swaps = Counter("loraloop_adapter_swaps", "Aliases switched to another version", ["alias"], registry=r)
        self.swap_failures = Counter(
            "loraloop_adapter_load_failures", "Versions refused at load (hash, config, files)", ["alias"], registry=r
        )
        self.rounds = Counter(
            "loraloop_tuning_rounds", "Tuning rounds finished, by outcome", ["alias", "status"], registry=r
        )
        self.round_seconds = Histogram(
            "loraloop_tuning_round_seconds",
            "Tuning round wall time",
            ["alias", "status"],
            buckets=ROUND_BUCKETS,
            registry=r,
        )

    def bind_gauges(
        self, queue_depth: Callable[[], float], running: Callable[[], float], loaded: Callable[[], float]
    ) -> None:
        """Gauges read live values at scrape time."""
        self.queue_depth.set_function(queue_depth)
        self.running.set_function(running)
        self.loaded_adapters.set_function(loaded)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def version_labels(label: str, alias: str | None) -> tuple[str, str]:
    """(alias, version) label values: requests for the base model have alias "base"."""
    return alias or "base", label
