"""Per-model rate limits as continuously refilling token buckets (pure: no I/O, no sleeping).

An Anthropic account has, per model (or model family), three limits: requests per minute
(RPM), input tokens per minute (ITPM) and output tokens per minute (OTPM). The service
enforces each as a token bucket whose capacity is the per-minute limit and which refills
continuously at limit/60 per second, so a burst may spend the whole minute's allowance at
once and then waits for the refill. A request's output is unknown when it starts, so the
output bucket is debited by its `max_tokens` up front and corrected when the usage is known.

The same buckets serve two sides:
- the local Messages API server (`loadtest/fake_anthropic.py`) enforces an account's limits
  with them, answering 429 with `retry-after` like the real service;
- `AdmissionControl`, which the coordinator's leader uses to hold `llm` tasks QUEUED until
  they fit, so 200 agents do not each discover the limit with a 429.

Our own choice (the service does not document it): a single request larger than a bucket's
capacity is let through when that bucket is full, driving it negative, instead of waiting
forever; the debt then delays what comes after it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

# The three dimensions, in the order the service names them in its headers.
REQUESTS = "requests"
INPUT_TOKENS = "input-tokens"
OUTPUT_TOKENS = "output-tokens"
DIMENSIONS = (REQUESTS, INPUT_TOKENS, OUTPUT_TOKENS)
DIMENSION_TEXT = {
    REQUESTS: "requests per minute",
    INPUT_TOKENS: "input tokens per minute",
    OUTPUT_TOKENS: "output tokens per minute",
}
HEADER_PREFIX = "anthropic-ratelimit-"


class MonotonicClock(Protocol):
    """The part of `services._common.clock.Clock` this module needs."""

    def monotonic(self) -> float: ...

    def wall_us(self) -> int: ...


class TokenBucket:
    """A bucket of `capacity` tokens that refills continuously at `capacity / period_s` per second.

    Time is passed in (`now`, seconds on a monotonic scale), so the arithmetic is exact and
    testable. The level may go negative (a correction after the fact, or an oversized
    request); it never exceeds the capacity.
    """

    def __init__(self, capacity: float, now: float, period_s: float = 60.0) -> None:
        if capacity <= 0 or period_s <= 0:
            raise ValueError(f"a bucket needs a positive capacity and period, got {capacity}")
        self.capacity = float(capacity)
        self.period_s = period_s
        self._level = float(capacity)
        self._at = now

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self.capacity / self.period_s

    def level(self, now: float) -> float:
        """Tokens available at `now` (refilled since the last change, capped at capacity)."""
        if now > self._at:
            self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
            self._at = now
        return self._level

    def wait_s(self, n: float, now: float) -> float:
        """Seconds until `n` tokens can be taken (0 if now). A request larger than the
        capacity waits for a full bucket."""
        need = min(n, self.capacity)
        level = self.level(now)
        if level >= need:
            return 0.0
        return (need - level) / self.rate

    def try_take(self, n: float, now: float) -> bool:
        if self.wait_s(n, now) > 0:
            return False
        self._level -= n
        return True

    def force(self, n: float, now: float) -> None:
        """Take `n` (or give back a negative `n`) whatever the level: corrections after the fact."""
        self._level = min(self.capacity, self.level(now) - n)

    def cap_at(self, remaining: float, now: float) -> None:
        """Lower the level to `remaining` if it is above it (the server knows of use we do not)."""
        if self.level(now) > remaining:
            self._level = float(remaining)

    def resize(self, capacity: float, now: float) -> None:
        """Adopt a new limit, keeping the tokens already spent."""
        if capacity <= 0:
            raise ValueError(f"a bucket needs a positive capacity, got {capacity}")
        spent = self.capacity - self.level(now)
        self.capacity = float(capacity)
        self._level = self.capacity - spent

    def full_in_s(self, now: float) -> float:
        """Seconds until the bucket is full again (what the service's `-reset` header states)."""
        return max(0.0, (self.capacity - self.level(now)) / self.rate)


@dataclass(frozen=True)
class ModelLimits:
    """One model's (or model family's) per-minute limits; 0 means no limit on that dimension."""

    rpm: int = 0
    itpm: int = 0
    otpm: int = 0

    def by_dimension(self) -> dict[str, int]:
        return {REQUESTS: self.rpm, INPUT_TOKENS: self.itpm, OUTPUT_TOKENS: self.otpm}

    @classmethod
    def parse(cls, text: str) -> ModelLimits:
        """'RPM/ITPM/OTPM', e.g. '4000/2000000/400000' (0 for no limit)."""
        parts = text.split("/")
        try:
            values = [int(p.replace("_", "")) for p in parts]
        except ValueError:
            values = []
        if len(values) != 3 or min(values) < 0:
            raise ValueError(
                f"limits {text!r} must be RPM/ITPM/OTPM, three integers >= 0 (0: unlimited)"
            )
        return cls(*values)


def parse_limit_specs(specs: tuple[str, ...] | list[str]) -> dict[str, ModelLimits]:
    """('claude-haiku-5-5=4000/2000000/400000', ...) -> {model or family prefix: limits}."""
    out: dict[str, ModelLimits] = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"limit {spec!r} must look like MODEL=RPM/ITPM/OTPM")
        out[key.strip()] = ModelLimits.parse(value.strip())
    return out


class ModelBuckets:
    """The RPM, ITPM and OTPM buckets of one model (or family); a missing one is unlimited.

    `burst_s` is how many seconds of refill a bucket holds: 60 lets a whole minute's
    allowance go at once; less enforces the same per-minute rate over shorter intervals
    (the service may do so: 60 RPM may be enforced as 1 request per second).
    """

    def __init__(self, limits: ModelLimits, now: float, burst_s: float = 60.0) -> None:
        self.burst_s = burst_s
        self.buckets: dict[str, TokenBucket] = {
            dim: self.bucket(per_minute, now)
            for dim, per_minute in limits.by_dimension().items()
            if per_minute > 0
        }

    def bucket(self, per_minute: float, now: float) -> TokenBucket:
        return TokenBucket(per_minute * self.burst_s / 60.0, now, period_s=self.burst_s)

    def resize(self, dim: str, per_minute: float, now: float) -> TokenBucket:
        """Adopt a per-minute limit for `dim` (creating its bucket if it had none)."""
        bucket = self.buckets.get(dim)
        if bucket is None:
            bucket = self.buckets[dim] = self.bucket(per_minute, now)
        elif per_minute_of(bucket) != per_minute:
            bucket.resize(per_minute * self.burst_s / 60.0, now)
        return bucket

    def costs(self, input_tokens: float, output_tokens: float) -> dict[str, float]:
        return {REQUESTS: 1.0, INPUT_TOKENS: input_tokens, OUTPUT_TOKENS: output_tokens}

    def blocking(self, input_tokens: float, output_tokens: float, now: float) -> tuple[str, float]:
        """(the dimension that waits longest, its wait in seconds); ('', 0) when it fits now."""
        worst, wait = "", 0.0
        for dim, n in self.costs(input_tokens, output_tokens).items():
            bucket = self.buckets.get(dim)
            if bucket is not None:
                w = bucket.wait_s(n, now)
                if w > wait:
                    worst, wait = dim, w
        return worst, wait

    def take(self, input_tokens: float, output_tokens: float, now: float) -> None:
        for dim, n in self.costs(input_tokens, output_tokens).items():
            bucket = self.buckets.get(dim)
            if bucket is not None:
                bucket.force(n, now)

    def correct(self, input_delta: float, output_delta: float, now: float) -> None:
        """Debit (positive) or refund (negative) what the estimates got wrong."""
        for dim, n in ((INPUT_TOKENS, input_delta), (OUTPUT_TOKENS, output_delta)):
            bucket = self.buckets.get(dim)
            if bucket is not None and n:
                bucket.force(n, now)


def per_minute_of(bucket: TokenBucket) -> float:
    """The per-minute limit a bucket enforces (its refill rate), whatever its burst."""
    return bucket.rate * 60.0


# ---- the service's rate-limit headers ----


@dataclass(frozen=True)
class HeaderReading:
    """One dimension as a response reported it."""

    limit: int | None
    remaining: int | None
    reset_in_s: float | None
    """Seconds from when the response was read until the bucket is full again."""


def parse_rfc3339(text: str) -> float | None:
    """Seconds since the epoch, or None when `text` is not an RFC 3339 time."""
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def parse_ratelimit_headers(
    headers: Mapping[str, str], now_wall_s: float
) -> dict[str, HeaderReading]:
    """`anthropic-ratelimit-{requests,input-tokens,output-tokens}-{limit,remaining,reset}`.

    Header names are matched case-insensitively; a dimension with none of its headers is
    left out. `reset` is an RFC 3339 time; it becomes seconds from `now_wall_s`.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    out: dict[str, HeaderReading] = {}
    for dim in DIMENSIONS:
        raw = {
            part: lower.get(f"{HEADER_PREFIX}{dim}-{part}")
            for part in ("limit", "remaining", "reset")
        }
        if not any(raw.values()):
            continue
        reset_at = parse_rfc3339(raw["reset"]) if raw["reset"] else None
        out[dim] = HeaderReading(
            limit=_int_or_none(raw["limit"]),
            remaining=_int_or_none(raw["remaining"]),
            reset_in_s=None if reset_at is None else max(0.0, reset_at - now_wall_s),
        )
    return out


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def ratelimit_headers_of(headers: Mapping[str, str]) -> dict[str, str]:
    """Only the headers the buckets care about (rate limits and retry hints), lower-cased."""
    return {
        k.lower(): v
        for k, v in headers.items()
        if k.lower().startswith(HEADER_PREFIX) or k.lower() in ("retry-after", "retry-after-ms")
    }


# ---- admission control (the leader's side) ----


@dataclass
class Admission:
    """The answer of `AdmissionControl.try_admit`. Truthy when admitted.

    Keep an admitted one until the task's usage is known and pass it to `settle`.
    """

    admitted: bool
    model: str
    key: str
    """The limits entry (model or family prefix) it counts against; '' when unlimited."""
    input_tokens: int
    output_tokens: int
    wait_s: float = 0.0
    """When refused: seconds until it would fit (math.inf: never, as configured)."""
    reason: str = ""

    def __bool__(self) -> bool:
        return self.admitted


@dataclass
class _Waiting:
    dimension: str
    need: float
    free: float
    capacity: float
    until: float
    """Monotonic time at which it fits (as far as we know now)."""


@dataclass
class _Family:
    buckets: ModelBuckets
    paused_until: float = 0.0
    waiting: _Waiting | None = None
    admitted: int = 0
    refused: int = 0
    learned: dict[str, int] = field(default_factory=dict)


class AdmissionControl:
    """Admit LLM calls through per-model RPM/ITPM/OTPM buckets, as the leader's gate.

    Limits come from configuration (a model id or a family prefix, longest prefix wins) and
    from the headers agents report: a model with no configured limits gets buckets as soon
    as a response states them. Models with neither are admitted without limit.
    """

    def __init__(
        self,
        limits: Mapping[str, ModelLimits],
        clock: MonotonicClock,
        burst_s: float = 60.0,
        headroom: float = 0.0,
    ) -> None:
        """`headroom`: the fraction of every limit (configured or reported) left unused.

        The leader admits a call some milliseconds before the service counts it, and calls
        reach it in a slightly different order and spacing: admitting at exactly the limit
        would meet the service's bucket empty now and then. A few percent of headroom lets
        the service's bucket keep a little in hand for that jitter.
        """
        if not 0.0 <= headroom < 1.0:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        self.clock = clock
        self.burst_s = burst_s
        self.share = 1.0 - headroom
        now = clock.monotonic()
        self._families: dict[str, _Family] = {
            key: _Family(ModelBuckets(self._scaled(lim), now, burst_s))
            for key, lim in limits.items()
        }

    def _scaled(self, lim: ModelLimits) -> ModelLimits:
        return ModelLimits(
            *(math.ceil(v * self.share) if v else 0 for v in (lim.rpm, lim.itpm, lim.otpm))
        )

    def key(self, model: str) -> str:
        """The limits entry `model` counts against: itself or its longest configured prefix."""
        if model in self._families:
            return model
        best = ""
        for key in self._families:
            if model.startswith(key) and len(key) > len(best):
                best = key
        return best

    def try_admit(self, model: str, est_input_tokens: int, est_output_tokens: int) -> Admission:
        """Debit the buckets and admit, or refuse with the wait until it would fit.

        `est_output_tokens` should be the request's `max_tokens` (what the service debits
        at the start); `settle` corrects both estimates later.
        """
        key = self.key(model)
        ticket = Admission(False, model, key, est_input_tokens, est_output_tokens)
        family = self._families.get(key)
        if family is None:
            ticket.admitted = True
            return ticket
        now = self.clock.monotonic()
        if family.paused_until > now:
            ticket.wait_s = family.paused_until - now
            ticket.reason = f"{key}: the service answered 429; paused {ticket.wait_s:.1f} s more"
            family.waiting = _Waiting("retry-after", 0, 0, 0, family.paused_until)
            family.refused += 1
            return ticket
        dim, wait = family.buckets.blocking(est_input_tokens, est_output_tokens, now)
        if wait > 0:
            bucket = family.buckets.buckets[dim]
            need = ticket.input_tokens if dim == INPUT_TOKENS else est_output_tokens
            need = 1 if dim == REQUESTS else need
            family.waiting = _Waiting(dim, need, bucket.level(now), bucket.capacity, now + wait)
            family.refused += 1
            ticket.wait_s = wait
            ticket.reason = (
                f"{key}: waiting for {DIMENSION_TEXT[dim]} ({need:,.0f} needed, "
                f"{max(0.0, bucket.level(now)):,.0f} of {bucket.capacity:,.0f} free); "
                f"fits in {wait:.1f} s"
            )
            return ticket
        family.buckets.take(est_input_tokens, est_output_tokens, now)
        family.waiting = None
        family.admitted += 1
        ticket.admitted = True
        return ticket

    def settle(self, ticket: Admission, input_tokens: int, output_tokens: int) -> None:
        """Correct an admitted call's estimates with its real usage (0, 0 if it never ran)."""
        family = self._families.get(ticket.key) if ticket.admitted else None
        if family is None:
            return
        family.buckets.correct(
            input_tokens - ticket.input_tokens,
            output_tokens - ticket.output_tokens,
            self.clock.monotonic(),
        )

    def observe_headers(self, model: str, headers: Mapping[str, str], age_s: float = 0.0) -> None:
        """Follow what the service reports: adopt its limits, and never believe we have more
        left than it says (other clients of the account, or estimates that were too low).

        `age_s`: how long ago the headers were read. `remaining` is then credited with the
        refill since, which overstates what the service has left (our own admissions since
        also took some): the cap only bites when we believe in far more than the service
        does, never because a report took a while to arrive.
        """
        age_s = max(0.0, age_s)
        readings = parse_ratelimit_headers(headers, self.clock.wall_us() / 1e6 - age_s)
        if not readings:
            return
        now = self.clock.monotonic()
        key = self.key(model)
        family = self._families.get(key)
        if family is None:
            learned = {dim: r.limit for dim, r in readings.items() if r.limit}
            if not learned:
                return
            key = model
            family = self._families[key] = _Family(
                ModelBuckets(
                    self._scaled(
                        ModelLimits(
                            learned.get(REQUESTS, 0),
                            learned.get(INPUT_TOKENS, 0),
                            learned.get(OUTPUT_TOKENS, 0),
                        )
                    ),
                    now,
                    self.burst_s,
                )
            )
        for dim, reading in readings.items():
            bucket = family.buckets.buckets.get(dim)
            if reading.limit and reading.limit > 0:
                bucket = family.buckets.resize(dim, math.ceil(reading.limit * self.share), now)
                family.learned[dim] = reading.limit
            if bucket is not None and reading.remaining is not None:
                bucket.cap_at(reading.remaining + bucket.rate * age_s, now)

    def observe_retry_after(self, model: str, seconds: float) -> None:
        """A 429 said to wait: admit nothing more for this model's limits until then."""
        key = self.key(model)
        family = self._families.get(key)
        if family is None or not math.isfinite(seconds) or seconds <= 0:
            return
        family.paused_until = max(family.paused_until, self.clock.monotonic() + seconds)

    def done_waiting(self, model: str) -> None:
        """Nothing of this model waits any more (its queued tasks were cancelled, say)."""
        family = self._families.get(self.key(model))
        if family is not None:
            family.waiting = None

    def why_waiting(self) -> list[str]:
        """One line per model family that refused its last request, for `agentmesh status`."""
        now = self.clock.monotonic()
        lines = []
        for key, family in sorted(self._families.items()):
            w = family.waiting
            if w is None:
                continue
            left = max(0.0, w.until - now)
            if w.dimension == "retry-after":
                lines.append(f"{key}: paused after a 429 (retry-after), {left:.1f} s left")
            else:
                lines.append(
                    f"{key}: waiting for {DIMENSION_TEXT[w.dimension]} "
                    f"({w.need:,.0f} needed, {max(0.0, w.free):,.0f} of {w.capacity:,.0f} free "
                    f"when last tried); fits in about {left:.1f} s"
                )
        return lines

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per family: each bucket's free tokens and per-minute limit, plus admitted/refused counts."""
        now = self.clock.monotonic()
        out: dict[str, dict[str, float]] = {}
        for key, family in self._families.items():
            row: dict[str, float] = {"admitted": family.admitted, "refused": family.refused}
            for dim, bucket in family.buckets.buckets.items():
                row[f"{dim}_free"] = bucket.level(now)
                row[f"{dim}_limit"] = per_minute_of(bucket)
            out[key] = row
        return out
