"""`/metrics` parses as Prometheus text and moves with requests, errors and ratings."""

from __future__ import annotations

from litestar.testing import AsyncTestClient
from prometheus_client.parser import text_string_to_metric_families

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


async def _samples(client: AsyncTestClient) -> dict[tuple[str, frozenset], float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def _sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


async def test_metrics_move_with_traffic(client: AsyncTestClient) -> None:
    before = await _samples(client)
    assert _sum(before, "loraloop_requests_total") == 0
    assert ("loraloop_queue_depth", frozenset()) in before

    completion = (await client.post("/v1/chat/completions", json=CHAT)).json()
    async with client.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}) as stream:
        [line async for line in stream.aiter_lines()]
    await client.post("/v1/feedback", json={"completion_id": completion["id"], "rating": -1})
    await client.post("/v1/chat/completions", json=CHAT | {"temperature": 9})

    after = await _samples(client)
    version = completion["system_fingerprint"]
    assert _sum(after, "loraloop_requests_total", alias="default", version=version) == 2
    assert _sum(after, "loraloop_request_latency_seconds_count", alias="default") == 2
    assert _sum(after, "loraloop_time_to_first_token_seconds_count", alias="default") == 2
    assert _sum(after, "loraloop_completion_tokens_total", alias="default") > 0
    assert _sum(after, "loraloop_prompt_tokens_total", alias="default") > 0
    assert _sum(after, "loraloop_ratings_total", version=version, rating="down") == 1
    assert _sum(after, "loraloop_http_errors_total", status="400") == 1


async def test_a_repeated_prompt_reports_its_cached_tokens_in_usage_and_metrics(client: AsyncTestClient) -> None:
    """OpenAI's `usage.prompt_tokens_details.cached_tokens`: the second request with the same messages (same
    adapter version) takes all but the last prompt token from the prefix cache."""
    chat = CHAT | {"messages": [{"role": "user", "content": "Tell me about the sea, the sky and the mountains."}]}
    first = (await client.post("/v1/chat/completions", json=chat)).json()["usage"]
    second = (await client.post("/v1/chat/completions", json=chat)).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    assert second["prompt_tokens_details"] == {"cached_tokens": second["prompt_tokens"] - 1}
    after = await _samples(client)
    assert _sum(after, "loraloop_prompt_cached_tokens_total", alias="default") == second["prompt_tokens"] - 1
