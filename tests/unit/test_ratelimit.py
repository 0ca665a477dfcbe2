"""Rate-limit buckets and admission control: exact arithmetic on a fake clock."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest

from services._common.clock import FakeClock
from services._common.ratelimit import (
    INPUT_TOKENS,
    OUTPUT_TOKENS,
    REQUESTS,
    AdmissionControl,
    ModelLimits,
    TokenBucket,
    parse_limit_specs,
    parse_ratelimit_headers,
    ratelimit_headers_of,
)

T0 = 1000.0


def rfc3339(wall_s: float) -> str:
    return datetime.fromtimestamp(wall_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- the bucket ----


def test_bucket_starts_full_and_refills_continuously_at_capacity_per_minute() -> None:
    b = TokenBucket(60, T0)  # 1 token per second
    assert b.level(T0) == 60
    assert b.try_take(60, T0)
    assert b.level(T0) == 0
    assert b.level(T0 + 0.5) == pytest.approx(0.5)
    assert b.level(T0 + 30) == pytest.approx(30)
    assert b.level(T0 + 600) == 60  # never above capacity


def test_bucket_at_and_around_its_limit() -> None:
    b = TokenBucket(600, T0)  # 10 per second
    assert b.try_take(599, T0)
    assert b.try_take(1, T0)  # exactly the capacity in one burst
    assert not b.try_take(1, T0)  # one more is refused
    assert b.wait_s(1, T0) == pytest.approx(0.1)
    assert not b.try_take(1, T0 + 0.099)
    assert b.try_take(1, T0 + 0.1)
    assert b.wait_s(10, T0 + 0.1) == pytest.approx(1.0)


def test_bucket_refusal_takes_nothing() -> None:
    b = TokenBucket(100, T0)
    assert b.try_take(90, T0)
    assert not b.try_take(20, T0)
    assert b.level(T0) == pytest.approx(10)


def test_oversized_request_waits_for_a_full_bucket_then_goes_into_debt() -> None:
    b = TokenBucket(60, T0)
    assert b.try_take(30, T0)
    assert b.wait_s(100, T0) == pytest.approx(30)  # until full, not forever
    assert b.try_take(100, T0 + 30)
    assert b.level(T0 + 30) == pytest.approx(-40)
    assert b.wait_s(1, T0 + 30) == pytest.approx(41)


def test_force_corrects_both_ways_and_never_overfills() -> None:
    b = TokenBucket(100, T0)
    b.force(80, T0)
    b.force(-50, T0)  # refund: estimate was too high
    assert b.level(T0) == pytest.approx(70)
    b.force(-500, T0)
    assert b.level(T0) == 100
    b.force(150, T0)  # actual use above the estimate: debt
    assert b.level(T0) == pytest.approx(-50)


def test_cap_at_and_resize_keep_what_was_spent() -> None:
    b = TokenBucket(100, T0)
    b.cap_at(40, T0)
    assert b.level(T0) == 40
    b.cap_at(90, T0)  # never raised by a report
    assert b.level(T0) == 40
    b.resize(200, T0)
    assert b.level(T0) == 140  # 60 spent stays spent
    assert b.rate == pytest.approx(200 / 60)
    assert b.full_in_s(T0) == pytest.approx(60 / (200 / 60))


def test_bucket_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0, T0)


@pytest.mark.parametrize(
    ("spec", "limits"),
    [
        ("50/40000/8000", ModelLimits(50, 40000, 8000)),
        ("4_000/2_000_000/0", ModelLimits(4000, 2_000_000, 0)),
    ],
)
def test_limits_parse(spec: str, limits: ModelLimits) -> None:
    assert ModelLimits.parse(spec) == limits


@pytest.mark.parametrize("spec", ["50/40000", "a/b/c", "-1/2/3", ""])
def test_limits_parse_refuses(spec: str) -> None:
    with pytest.raises(ValueError, match="RPM/ITPM/OTPM"):
        ModelLimits.parse(spec)


def test_limit_specs() -> None:
    assert parse_limit_specs(["claude-opus=10/20/30", " * = 1/2/3"]) == {
        "claude-opus": ModelLimits(10, 20, 30),
        "*": ModelLimits(1, 2, 3),
    }
    with pytest.raises(ValueError, match="MODEL=RPM/ITPM/OTPM"):
        parse_limit_specs(["10/20/30"])


# ---- headers ----


def test_parse_headers_turns_reset_into_seconds() -> None:
    now = 1_800_000_000.0
    headers = {
        "Anthropic-RateLimit-Requests-Limit": "50",
        "anthropic-ratelimit-requests-remaining": "49",
        "anthropic-ratelimit-requests-reset": rfc3339(now + 2),
        "anthropic-ratelimit-output-tokens-limit": "8000",
        "anthropic-ratelimit-output-tokens-remaining": "100",
        "anthropic-ratelimit-output-tokens-reset": "not a time",
        "content-type": "application/json",
    }
    got = parse_ratelimit_headers(headers, now)
    assert set(got) == {REQUESTS, OUTPUT_TOKENS}
    assert got[REQUESTS].limit == 50
    assert got[REQUESTS].remaining == 49
    assert got[REQUESTS].reset_in_s == pytest.approx(2)
    assert got[OUTPUT_TOKENS].reset_in_s is None
    assert ratelimit_headers_of({**headers, "Retry-After": "3"}).keys() == {
        *(k.lower() for k in headers if k.lower().startswith("anthropic")),
        "retry-after",
    }


# ---- admission control ----


def control(clock: FakeClock, **limits: ModelLimits) -> AdmissionControl:
    return AdmissionControl({k.replace("_", "-"): v for k, v in limits.items()}, clock)


def test_admits_until_a_bucket_is_empty_then_says_how_long() -> None:
    clock = FakeClock(T0)
    ac = control(clock, claude_haiku=ModelLimits(rpm=3, itpm=1000, otpm=600))
    for _ in range(3):
        assert ac.try_admit("claude-haiku-5-5", 100, 100)
    refused = ac.try_admit("claude-haiku-5-5", 100, 100)
    assert not refused
    assert refused.wait_s == pytest.approx(20)  # 3 per minute: one every 20 s
    assert "requests per minute" in refused.reason
    assert ac.why_waiting() == [
        "claude-haiku: waiting for requests per minute (1 needed, 0 of 3 free when last "
        "tried); fits in about 20.0 s"
    ]


def test_output_estimate_is_max_tokens_and_settle_refunds_the_unused() -> None:
    clock = FakeClock(T0)
    ac = control(clock, m=ModelLimits(rpm=0, itpm=0, otpm=1000))
    first = ac.try_admit("m", 10, 800)
    assert first
    assert not ac.try_admit("m", 10, 800)  # 200 left
    ac.settle(first, input_tokens=12, output_tokens=100)  # gives 700 back
    assert ac.try_admit("m", 10, 800)


def test_settle_with_more_than_estimated_drives_the_bucket_into_debt() -> None:
    clock = FakeClock(T0)
    ac = control(clock, m=ModelLimits(itpm=600))
    ticket = ac.try_admit("m", 100, 1)
    ac.settle(ticket, input_tokens=700, output_tokens=1)
    refused = ac.try_admit("m", 1, 1)
    assert not refused
    assert refused.wait_s == pytest.approx(10.1)  # from -100 to 1 at 10/s


def test_unlimited_models_and_family_prefixes() -> None:
    clock = FakeClock(T0)
    ac = control(clock, claude_opus=ModelLimits(rpm=1), claude_opus_5_5=ModelLimits(rpm=2))
    assert ac.key("claude-opus-5-5") == "claude-opus-5-5"
    assert ac.key("claude-opus-4-8") == "claude-opus"
    assert ac.key("claude-sonnet-5-5") == ""
    for _ in range(100):
        assert ac.try_admit("claude-sonnet-5-5", 10**6, 10**6)
    assert ac.try_admit("claude-opus-4-7", 1, 1)
    assert not ac.try_admit("claude-opus-4-8", 1, 1)  # the family shares one bucket
    assert ac.try_admit("claude-opus-5-5", 1, 1)


def test_refusal_takes_nothing_from_any_bucket() -> None:
    clock = FakeClock(T0)
    ac = control(clock, m=ModelLimits(rpm=10, itpm=100, otpm=100))
    assert ac.try_admit("m", 1, 60)
    assert not ac.try_admit("m", 50, 60)  # output does not fit
    snap = ac.snapshot()["m"]
    assert snap["requests_free"] == 9
    assert snap["input-tokens_free"] == 99


def test_headers_lower_our_view_and_adopt_the_server_limits() -> None:
    clock = FakeClock(T0)
    ac = control(clock, m=ModelLimits(rpm=100, itpm=10_000, otpm=1000))
    ac.observe_headers(
        "m",
        {
            "anthropic-ratelimit-requests-limit": "100",
            "anthropic-ratelimit-requests-remaining": "2",
            "anthropic-ratelimit-input-tokens-limit": "20000",
            "anthropic-ratelimit-input-tokens-remaining": "19000",
        },
    )
    snap = ac.snapshot()["m"]
    assert snap["requests_free"] == 2  # others use the account too
    assert snap["input-tokens_limit"] == 20_000
    assert snap["input-tokens_free"] == 19_000  # resized, then capped at what it reports
    assert ac.try_admit("m", 1, 1)
    assert ac.try_admit("m", 1, 1)
    assert not ac.try_admit("m", 1, 1)


def test_a_report_never_raises_our_view() -> None:
    clock = FakeClock(T0)
    ac = control(clock, m=ModelLimits(rpm=10))
    for _ in range(10):
        assert ac.try_admit("m", 1, 1)
    # a stale header from before our admissions reached the server
    ac.observe_headers(
        "m",
        {"anthropic-ratelimit-requests-limit": "10", "anthropic-ratelimit-requests-remaining": "9"},
    )
    assert not ac.try_admit("m", 1, 1)


def test_limits_are_learned_from_headers_for_an_unconfigured_model() -> None:
    clock = FakeClock(T0)
    ac = AdmissionControl({}, clock)
    assert ac.try_admit("claude-haiku-5-5", 1, 1)
    ac.observe_headers(
        "claude-haiku-5-5",
        {
            "anthropic-ratelimit-requests-limit": "60",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-output-tokens-limit": "6000",
        },
    )
    refused = ac.try_admit("claude-haiku-5-5", 1, 1)
    assert not refused
    assert refused.wait_s == pytest.approx(1.0)
    assert ac.snapshot()["claude-haiku-5-5"]["output-tokens_limit"] == 6000
    assert INPUT_TOKENS + "_limit" not in ac.snapshot()["claude-haiku-5-5"]


def test_retry_after_pauses_the_family_and_is_explained() -> None:
    clock = FakeClock(T0)
    ac = control(clock, m=ModelLimits(rpm=1000))
    ac.observe_retry_after("m-large", 7)
    refused = ac.try_admit("m-small", 1, 1)
    assert not refused
    assert refused.wait_s == pytest.approx(7)
    assert ac.why_waiting() == ["m: paused after a 429 (retry-after), 7.0 s left"]
    ac.observe_retry_after("m", math.inf)  # ignored, never a permanent stop


async def test_waits_end_when_the_clock_says_so() -> None:
    clock = FakeClock(T0)
    ac = control(clock, m=ModelLimits(rpm=60))
    for _ in range(60):
        assert ac.try_admit("m", 1, 1)
    refused = ac.try_admit("m", 1, 1)
    await clock.advance(refused.wait_s - 0.001)
    assert not ac.try_admit("m", 1, 1)
    await clock.advance(0.001)
    assert ac.try_admit("m", 1, 1)
    assert ac.why_waiting() == []


def test_done_waiting_clears_the_status_line() -> None:
    clock = FakeClock(T0)
    ac = control(clock, m=ModelLimits(rpm=1))
    ac.try_admit("m", 1, 1)
    ac.try_admit("m", 1, 1)
    assert ac.why_waiting()
    ac.done_waiting("m")
    assert ac.why_waiting() == []


def test_settle_of_a_refused_or_unlimited_ticket_is_harmless() -> None:
    clock = FakeClock(T0)
    ac = control(clock, m=ModelLimits(rpm=1))
    ac.try_admit("m", 1, 1)
    refused = ac.try_admit("m", 1, 1)
    ac.settle(refused, 0, 0)
    ac.settle(ac.try_admit("other", 1, 1), 5, 5)
    assert ac.snapshot()["m"]["requests_free"] == 0


def test_a_short_burst_window_enforces_the_same_rate_over_shorter_intervals() -> None:
    clock = FakeClock(T0)
    ac = AdmissionControl({"m": ModelLimits(rpm=600, otpm=60_000)}, clock, burst_s=1.0)
    for _ in range(10):  # 600 per minute held as 10 per second
        assert ac.try_admit("m", 1, 100)
    refused = ac.try_admit("m", 1, 100)
    assert not refused
    assert refused.wait_s == pytest.approx(0.1)
    snap = ac.snapshot()["m"]
    assert snap["requests_limit"] == 600  # still stated per minute
    assert snap["output-tokens_free"] == pytest.approx(0)
    ac.observe_headers("m", {"anthropic-ratelimit-requests-limit": "1200"})
    assert ac.snapshot()["m"]["requests_limit"] == pytest.approx(1200)
