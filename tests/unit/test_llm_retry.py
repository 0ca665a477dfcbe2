"""The one LLM retry policy: what is retried, and the waits (no sockets)."""

from __future__ import annotations

import json
import random

import anthropic
import httpx2
import pytest

from services.agent_pool.llm_retry import RetryPolicy, Verdict, classify, retry_after_s

REQUEST = httpx2.Request("POST", "http://127.0.0.1/v1/messages")


def status_error(
    status: int, etype: str, headers: dict[str, str] | None = None
) -> anthropic.APIStatusError:
    body = {"type": "error", "error": {"type": etype, "message": f"{etype} happened"}}
    response = httpx2.Response(status, headers=headers or {}, request=REQUEST, json=body)
    return anthropic._error_classes.make_status_error(
        f"Error code: {status}", body=body, response=response
    )


@pytest.mark.parametrize(
    ("status", "etype", "retry"),
    [
        (429, "rate_limit_error", True),
        (529, "overloaded_error", True),
        (500, "api_error", True),
        (503, "api_error", True),
        (408, "timeout_error", True),
        (400, "invalid_request_error", False),
        (401, "authentication_error", False),
        (403, "permission_error", False),
        (404, "not_found_error", False),
        (413, "request_too_large", False),
        (422, "invalid_request_error", False),
    ],
)
def test_status_codes(status: int, etype: str, retry: bool) -> None:
    verdict = classify(status_error(status, etype))
    assert verdict.retry is retry
    assert verdict.status == status
    assert verdict.what == f"{status} {etype}: {etype} happened"


def test_x_should_retry_decides_when_present() -> None:
    assert not classify(status_error(529, "overloaded_error", {"x-should-retry": "false"})).retry
    assert classify(status_error(400, "invalid_request_error", {"x-should-retry": "true"})).retry


def test_error_event_in_a_stream() -> None:
    assert classify(status_error(200, "overloaded_error")).retry
    assert not classify(status_error(200, "invalid_request_error")).retry
    assert classify(status_error(200, "overloaded_error")).what.startswith("stream error")


def test_transport_and_malformed_responses_are_retried() -> None:
    assert classify(anthropic.APIConnectionError(request=REQUEST)).retry
    assert classify(anthropic.APITimeoutError(request=REQUEST)).retry
    assert classify(httpx2.RemoteProtocolError("peer closed")).retry
    assert classify(httpx2.ReadTimeout("slow")).retry
    try:
        json.loads("{")
    except json.JSONDecodeError as err:
        verdict = classify(err)
    assert verdict.retry
    assert "malformed response" in verdict.what


def test_anything_else_is_not_retried() -> None:
    assert not classify(ValueError("bad argument")).retry
    assert not classify(KeyError("x")).retry


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),
        ({"retry-after": "Thu, 01 Jan 2026 00:00:10 GMT"}, 10.0),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_forms(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after_s(headers, now_wall_s=1767225600.0) == seconds


def test_wait_honours_retry_after_never_less_and_spreads_a_little() -> None:
    policy = RetryPolicy()
    rng = random.Random(7)
    waits = [policy.wait_s(1, Verdict(True, "", 429, retry_after_s=2.0), rng) for _ in range(200)]
    assert min(waits) >= 2.0
    assert max(waits) <= 2.0 * 1.2
    assert max(waits) - min(waits) > 0.1  # not all agents back in the same instant


def test_backoff_without_a_hint_is_exponential_with_full_jitter_and_capped() -> None:
    policy = RetryPolicy(backoff_initial_s=0.5, backoff_max_s=4.0)
    rng = random.Random(1)
    for attempt, ceiling in ((1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (10, 4.0)):
        waits = [policy.wait_s(attempt, Verdict(True, ""), rng) for _ in range(300)]
        assert 0 <= min(waits) < ceiling * 0.2
        assert ceiling * 0.8 < max(waits) <= ceiling
