"""The one retry policy of LLM calls: which failures to retry, and how long to wait.

Retried: 429 (rate limit), 529 (overloaded), other 5xx, 408/409, connection errors (refused,
reset, dropped mid-stream), read timeouts and malformed responses. Not retried: the 4xx
that the request itself caused (400, 401, 403, 404, 413, 422 ...), since sending it again
gives the same answer. The server's `x-should-retry` header, when present, decides.

Waits: the server's `retry-after-ms` / `retry-after` when it gives one (never less,
up to 20% more so that the agents it told the same thing do not return in step);
otherwise exponential backoff with full jitter. The SDK's own retries are off
(`max_retries=0`), so every HTTP attempt is counted once, here.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import anthropic
import httpx2
import pydantic
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

# Error types a streamed response may carry in an `event: error` after a 200.
RETRYABLE_ERROR_TYPES = frozenset(
    {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}
)
RETRYABLE_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class Verdict:
    retry: bool
    what: str
    """Short description for the task's error: '429 rate_limit_error: ...'."""
    status: int = 0
    retry_after_s: float | None = None
    headers: Mapping[str, str] | None = None


def retry_after_s(
    headers: Mapping[str, str] | None, now_wall_s: float | None = None
) -> float | None:
    """Seconds the server asked to wait: `retry-after-ms`, else `retry-after` (seconds or a date)."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    try:
        if "retry-after-ms" in lower:
            return max(0.0, float(lower["retry-after-ms"]) / 1000)
    except ValueError:
        pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(raw)
    if parsed is None:
        return None
    now = time.time() if now_wall_s is None else now_wall_s
    return max(0.0, email.utils.mktime_tz(parsed) - now)


def classify(err: BaseException, now_wall_s: float | None = None) -> Verdict:
    """Whether another attempt may succeed, and what to tell the task's owner
    (`now_wall_s`: the time a retry-after date counts from; default: now)."""
    if isinstance(err, anthropic.APIStatusError):
        headers = dict(err.response.headers)
        status = err.status_code
        etype = err.type or _error_type(err.body) or ""
        message = err.api_message or _short(err.message)
        what = f"{status} {etype}: {message}".replace("  ", " ")
        should = headers.get("x-should-retry")
        if should in ("true", "false"):
            retry = should == "true"
        elif status == 200:  # an error event in the middle of a stream
            retry = etype in RETRYABLE_ERROR_TYPES
            what = f"stream error {etype}: {message}"
        else:
            retry = status in RETRYABLE_STATUS or status >= 500
        return Verdict(retry, what, status, retry_after_s(headers, now_wall_s), headers)
    if isinstance(err, anthropic.APITimeoutError | httpx2.TimeoutException):
        return Verdict(True, "the API did not answer in time (read timeout)")
    if isinstance(err, anthropic.APIConnectionError | httpx2.TransportError):
        cause = err.__cause__ or err
        return Verdict(
            True,
            f"connection to the API failed or dropped: {type(cause).__name__}: {_short(str(cause))}",
        )
    if isinstance(
        err,
        json.JSONDecodeError
        | pydantic.ValidationError
        | anthropic.APIResponseValidationError
        | httpx2.DecodingError,
    ):
        return Verdict(
            True, f"the API sent a malformed response: {type(err).__name__}: {_short(str(err))}"
        )
    return Verdict(False, f"{type(err).__name__}: {_short(str(err))}")


def _error_type(body: object) -> str | None:
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("type"), str):
            return str(inner["type"])
    return None


def _short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 20.0
    retry_after_max_s: float = 60.0
    retry_after_spread: float = 0.2
    """Up to this fraction is added to a retry-after, to spread the agents that got it."""

    def wait_s(self, attempt: int, verdict: Verdict, rng: random.Random) -> float:
        """Seconds before attempt `attempt + 1`, after attempt `attempt` failed with `verdict`."""
        if verdict.retry_after_s is not None:
            return verdict.retry_after_s * (1.0 + rng.uniform(0.0, self.retry_after_spread))
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        return rng.uniform(0.0, ceiling)

    def retrying(
        self,
        sleep: Callable[[float], Awaitable[None]],
        rng: random.Random,
        on_retry: Callable[[int, Verdict, float], None] | None = None,
        wall_s: Callable[[], float] | None = None,
    ) -> AsyncRetrying:
        """A tenacity loop: `async for attempt in policy.retrying(...): with attempt: ...`.

        Gives up (re-raising the last error) after max_attempts, on an error not worth
        retrying, or when the server asks for a wait longer than retry_after_max_s.
        `wall_s` is the clock a retry-after date is read against (default: the system's).
        """

        def classified(err: BaseException) -> Verdict:
            return classify(err, None if wall_s is None else wall_s())

        def should_retry(err: BaseException) -> bool:
            verdict = classified(err)
            if not verdict.retry:
                return False
            ra = verdict.retry_after_s
            return ra is None or ra <= self.retry_after_max_s

        def wait(state: RetryCallState) -> float:
            err = state.outcome.exception() if state.outcome else None
            verdict = classified(err) if err else Verdict(True, "")
            seconds = self.wait_s(state.attempt_number, verdict, rng)
            if on_retry is not None:
                on_retry(state.attempt_number, verdict, seconds)
            return seconds

        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait,
            retry=retry_if_exception(should_retry),
            sleep=sleep,
            reraise=True,
        )
