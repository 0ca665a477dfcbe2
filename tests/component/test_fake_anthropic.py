"""The local Messages API server itself, over HTTP: limits with the service's semantics,
the API's shapes, and its control endpoints. It must be right, or every LLM test and the
burst figures built on it are wrong."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from loadtest.fake_anthropic import FakeAnthropic, FakeConfig
from services._common.ratelimit import ModelLimits

KEY = {"x-api-key": "sk-test-not-a-real-key", "anthropic-version": "2023-06-01"}


def body(max_tokens: int = 100, prompt: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-haiku-5-5",
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
        **extra,
    }


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=20.0) as client:
        yield client


async def serve(**cfg: Any) -> FakeAnthropic:
    cfg.setdefault("latency_ms", "fixed:1")
    server = FakeAnthropic(FakeConfig(output_tokens="fixed:40", **cfg))
    await server.start()
    return server


async def test_json_reply_shape_usage_and_limit_headers(http: httpx2.AsyncClient) -> None:
    server = await serve(limits={"claude-haiku": ModelLimits(50, 10_000, 2_000)})
    try:
        r = await http.post(f"{server.url}/v1/messages", headers=KEY, json=body())
    finally:
        await server.stop()
    assert r.status_code == 200
    doc = r.json()
    assert doc["type"] == "message"
    assert doc["content"][0]["text"].startswith("[simulated]")
    assert doc["usage"]["output_tokens"] == 40
    assert "SIMULATED" in r.headers["server"]
    assert r.headers["anthropic-ratelimit-requests-limit"] == "50"
    assert r.headers["anthropic-ratelimit-requests-remaining"] == "49"
    in_left = int(r.headers["anthropic-ratelimit-input-tokens-remaining"])
    assert in_left == 10_000 - doc["usage"]["input_tokens"]
    # the output bucket held max_tokens (100) while the reply ran; 40 were used
    assert server.stats.output_tokens == 40


async def test_sse_stream_shape(http: httpx2.AsyncClient) -> None:
    server = await serve()
    try:
        r = await http.post(f"{server.url}/v1/messages", headers=KEY, json=body(stream=True))
    finally:
        await server.stop()
    events = [line.split(": ", 1)[1] for line in r.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "message_start"
    assert events[1] == "content_block_start"
    assert set(events[2:-3]) == {"content_block_delta"}
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    delta = [
        json.loads(line[6:])
        for line in r.text.splitlines()
        if '"message_delta"' in line and line.startswith("data: ")
    ][0]
    assert delta["usage"]["output_tokens"] == 40


async def test_a_burst_beyond_rpm_gets_exactly_the_excess_429(http: httpx2.AsyncClient) -> None:
    server = await serve(limits={"*": ModelLimits(10, 0, 0)})
    try:
        replies = await asyncio.gather(
            *(http.post(f"{server.url}/v1/messages", headers=KEY, json=body()) for _ in range(25))
        )
    finally:
        await server.stop()
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 10 + [429] * 15
    limited = [r for r in replies if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 for r in limited)
    assert limited[0].json()["error"]["type"] == "rate_limit_error"
    assert "10 requests per minute" in limited[0].json()["error"]["message"]
    assert server.stats.rate_limited == 15


async def test_a_one_second_burst_window_holds_a_second_of_the_rate(
    http: httpx2.AsyncClient,
) -> None:
    server = await serve(limits={"*": ModelLimits(600, 0, 0)}, burst_s=1.0)
    try:
        replies = await asyncio.gather(
            *(http.post(f"{server.url}/v1/messages", headers=KEY, json=body()) for _ in range(25))
        )
    finally:
        await server.stop()
    ok = [r for r in replies if r.status_code == 200]
    assert 10 <= len(ok) <= 11  # 10 at once, and maybe one refilled while they were served
    assert ok[0].headers["anthropic-ratelimit-requests-limit"] == "600"
    assert "600 requests per minute" in next(r for r in replies if r.status_code == 429).text


async def test_output_bucket_holds_max_tokens_in_flight_then_keeps_only_the_output(
    http: httpx2.AsyncClient,
) -> None:
    server = await serve(limits={"*": ModelLimits(0, 0, 1000)}, latency_ms="fixed:300")
    try:
        url = f"{server.url}/v1/messages"
        both = await asyncio.gather(
            http.post(url, headers=KEY, json=body(max_tokens=600)),
            http.post(url, headers=KEY, json=body(max_tokens=600)),
        )
        # one ran (600 held), the other did not fit; after the first ended, 960 are free
        assert sorted(r.status_code for r in both) == [200, 429]
        again = await http.post(url, headers=KEY, json=body(max_tokens=900))
    finally:
        await server.stop()
    assert again.status_code == 200


async def test_input_tokens_count_against_itpm(http: httpx2.AsyncClient) -> None:
    server = await serve(limits={"*": ModelLimits(0, 500, 0)})
    try:
        url = f"{server.url}/v1/messages"
        big = await http.post(url, headers=KEY, json=body(prompt="x" * 1600))  # ~410 tokens
        small = await http.post(url, headers=KEY, json=body(prompt="x" * 400))  # ~110 tokens
        tiny = await http.post(url, headers=KEY, json=body(prompt="x"))
    finally:
        await server.stop()
    assert (big.status_code, small.status_code, tiny.status_code) == (200, 429, 200)
    assert "input tokens per minute" in small.json()["error"]["message"]


@pytest.mark.parametrize(
    ("headers", "doc", "status", "etype"),
    [
        ({}, body(), 401, "authentication_error"),
        (KEY, {"model": "m", "messages": []}, 400, "invalid_request_error"),
        (
            KEY,
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
            400,
            "invalid_request_error",
        ),
    ],
)
async def test_bad_requests_get_the_api_error_shape(
    http: httpx2.AsyncClient, headers: dict[str, str], doc: dict[str, Any], status: int, etype: str
) -> None:
    server = await serve()
    try:
        r = await http.post(f"{server.url}/v1/messages", headers=headers, json=doc)
    finally:
        await server.stop()
    assert r.status_code == status
    assert r.json()["type"] == "error"
    assert r.json()["error"]["type"] == etype
    assert r.json()["error"]["message"].startswith("(simulated)")


async def test_control_endpoints(http: httpx2.AsyncClient) -> None:
    server = await serve()
    try:
        r = await http.post(f"{server.url}/_fake/script", json={"outcomes": ["529", "429:2"]})
        assert r.json() == {"queued": 2}
        first = await http.post(f"{server.url}/v1/messages", headers=KEY, json=body())
        second = await http.post(f"{server.url}/v1/messages", headers=KEY, json=body())
        third = await http.post(f"{server.url}/v1/messages", headers=KEY, json=body())
        stats = (await http.get(f"{server.url}/_fake/stats")).json()
        bad = await http.post(f"{server.url}/_fake/script", json={"outcomes": ["maybe"]})
        count = await http.post(f"{server.url}/v1/messages/count_tokens", headers=KEY, json=body())
        missing = await http.get(f"{server.url}/v1/models")
        await http.post(f"{server.url}/_fake/reset")
        after = (await http.get(f"{server.url}/_fake/stats")).json()
    finally:
        await server.stop()
    assert (first.status_code, second.status_code, third.status_code) == (529, 429, 200)
    assert first.json()["error"]["type"] == "overloaded_error"
    assert second.headers["retry-after"] == "2"
    assert stats["simulated"] is True
    assert stats["requests"] == 3
    assert stats["status"] == {"529": 1, "429": 1, "200": 1}
    assert bad.status_code == 400
    assert count.json()["input_tokens"] > 0
    assert missing.status_code == 404
    assert after["requests"] == 0


def test_command_line_says_it_is_simulated_and_prints_its_counters() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.fake_anthropic",
            "--duration-s",
            "0.3",
            "--limits",
            "*=10/100/100",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    first, _, rest = proc.stdout.partition("\n")
    assert first.startswith(
        "SIMULATED Anthropic Messages API (not Claude) listening on http://127.0.0.1:"
    )
    assert json.loads(rest)["simulated"] is True
