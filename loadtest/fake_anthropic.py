"""A SIMULATED Anthropic Messages API on 127.0.0.1, for tests and load tests. Not Claude.

It speaks enough of `POST /v1/messages` for the official `anthropic` SDK: the JSON reply
and the SSE stream (message_start, content_block_start/delta/stop, message_delta with
usage, message_stop), `usage`, the `anthropic-ratelimit-*` headers on every reply, and
errors in the API's shape (400, 401, 429 with `retry-after`, 500, 529). Replies are
generated words that start with "[simulated]".

Account limits are enforced like the real service: per model (or family prefix, '*' for
any model) token buckets for requests, input tokens and output tokens per minute that
refill continuously; the output bucket is debited by `max_tokens` when a request starts
and corrected by the real output when it ends (services/_common/ratelimit.py, the same
buckets the leader's admission control uses). A request that does not fit gets 429 with
`retry-after` in whole seconds, rounded up, as the real service sends it.

Faults on demand, for the next requests in order (`script`) or at random (`--fault-rate`):
  ok | 429[:SECONDS] | 529 | 500 | 400 | 401 | malformed (a 200 whose body is not valid
  JSON / SSE) | drop (close the connection without answering) | drop_mid (close in the
  middle of a stream) | stream_error (an `overloaded_error` event after a 200) | stall
  (never answer; wait for the client to go away)

Run: `python -m loadtest.fake_anthropic --port 8765 --limits '*=600/200000/60000'`, then
`ANTHROPIC_BASE_URL=http://127.0.0.1:8765 ANTHROPIC_API_KEY=any ...`. Control and
counters: `POST /_fake/script {"outcomes": ["429:1", "ok"]}`, `GET /_fake/stats`,
`POST /_fake/reset`. On SIGTERM/SIGINT it prints its counters as JSON and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import math
import random
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services._common.ratelimit import (
    DIMENSION_TEXT,
    HEADER_PREFIX,
    ModelBuckets,
    ModelLimits,
    parse_limit_specs,
    per_minute_of,
)
from services.agent_pool.executors import parse_latency

SERVER_NAME = "agentmesh-fake-anthropic (SIMULATED, not Claude)"
MAX_HEADER_BYTES = 65_536
MAX_BODY_BYTES = 32 * 1024 * 1024
OUTCOMES = (
    "ok",
    "429",
    "529",
    "500",
    "400",
    "401",
    "malformed",
    "drop",
    "drop_mid",
    "stream_error",
    "stall",
)
WORDS = [
    "mesh",
    "agents",
    "coordinate",
    "tasks",
    "through",
    "leases",
    "claims",
    "and",
    "fenced",
    "writes",
    "while",
    "the",
    "leader",
    "admits",
    "calls",
    "within",
    "the",
    "account",
    "limits",
    "and",
    "every",
    "result",
    "is",
    "recorded",
    "once",
]
ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    529: "Overloaded",
}


@dataclass
class FakeConfig:
    latency_ms: str = "lognormal:300:0.5"
    """Time to the first byte of a reply: fixed:MS, uniform:LO:HI or lognormal:MEDIAN:SIGMA."""
    output_tokens: str = "uniform:20:120"
    """Output tokens per reply, drawn the same way and capped at the request's max_tokens."""
    tokens_per_s: float = 0.0
    """Streaming pace of output tokens (0: the whole reply at once after the latency)."""
    limits: dict[str, ModelLimits] = field(default_factory=dict)
    """Account limits per model id or prefix ('*': any model); none: unlimited."""
    fault_rates: dict[str, float] = field(default_factory=dict)
    """Outcome → probability per request (e.g. {'529': 0.01}), when no script is queued."""
    burst_s: float = 60.0
    """Seconds of refill each bucket holds: 60 lets a minute's allowance go at once; 1
    enforces the per-minute rate per second (as the service says it may)."""
    retry_after_ms_header: bool = False
    """Also send `retry-after-ms` (the precise wait) next to the whole-second `retry-after`."""
    seed: int | None = None


@dataclass
class Stats:
    simulated: bool = True
    requests: int = 0
    """POST /v1/messages received (every HTTP attempt)."""
    status: collections.Counter[str] = field(default_factory=collections.Counter)
    rate_limited: int = 0
    """Answered 429 because a bucket was empty (scripted 429s are in status only)."""
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    succeeded: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    disconnects: int = 0
    """Clients that went away before their reply was complete (cancelled or timed out)."""
    in_flight: int = 0
    max_in_flight: int = 0
    first_request_wall_s: float = 0.0
    last_reply_wall_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["status"] = dict(self.status)
        doc["faults"] = dict(self.faults)
        return doc


class _Gone(Exception):
    """The client closed its connection."""


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class FakeAnthropic:
    """The server. `await start()`, use `url`, `script(...)`, `stats`; `await stop()`."""

    def __init__(self, cfg: FakeConfig | None = None) -> None:
        self.cfg = cfg or FakeConfig()
        self.rng = random.Random(self.cfg.seed)
        self.stats = Stats()
        self.log: collections.deque[tuple[float, str, int]] = collections.deque(maxlen=100_000)
        """(monotonic arrival, outcome, status) of recent requests."""
        self._script: collections.deque[str] = collections.deque()
        self._buckets: dict[str, ModelBuckets] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.port = 0
        self._latency = parse_latency(self.cfg.latency_ms)
        self._outputs = parse_latency(self.cfg.output_tokens)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> str:
        self._server = await asyncio.start_server(
            self._serve_conn, "127.0.0.1", port, limit=MAX_HEADER_BYTES
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._conns):
                task.cancel()
            await asyncio.gather(*self._conns, return_exceptions=True)
            await self._server.wait_closed()

    def script(self, *outcomes: str) -> None:
        """Queue the outcomes of the next requests (then back to normal)."""
        for outcome in outcomes:
            if outcome.split(":")[0] not in OUTCOMES:
                raise ValueError(f"unknown outcome {outcome!r}; use one of {OUTCOMES}")
            self._script.append(outcome)

    def reset(self) -> None:
        self.stats = Stats()
        self.log.clear()
        self._script.clear()
        self._buckets.clear()

    # ---- HTTP/1.1, just enough ----

    async def _serve_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    return
                if not await self._route(request, reader, writer):
                    return
        except (_Gone, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        except asyncio.CancelledError:
            return
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _route(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False to close the connection."""
        if req.path == "/v1/messages" and req.method == "POST":
            return await self._messages(req, reader, writer)
        if req.path == "/v1/messages/count_tokens" and req.method == "POST":
            doc = _json_or_none(req.body)
            if not isinstance(doc, dict):
                return await self._error(writer, 400, "body must be a JSON object")
            return await _respond(writer, 200, {"input_tokens": count_input_tokens(doc)})
        if req.path == "/_fake/stats" and req.method == "GET":
            return await _respond(writer, 200, self.stats.as_dict())
        if req.path == "/_fake/script" and req.method == "POST":
            doc = _json_or_none(req.body)
            try:
                self.script(*doc["outcomes"])  # type: ignore[index]
            except (TypeError, KeyError, ValueError) as err:
                return await self._error(writer, 400, f'use {{"outcomes": [...]}}: {err}')
            return await _respond(writer, 200, {"queued": len(self._script)})
        if req.path == "/_fake/reset" and req.method == "POST":
            self.reset()
            return await _respond(writer, 200, {"reset": True})
        return await self._error(writer, 404, f"{req.method} {req.path} is not simulated here")

    async def _error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> bool:
        body = {
            "type": "error",
            "error": {"type": ERRORS.get(status, "api_error"), "message": f"(simulated) {message}"},
            "request_id": _request_id(),
        }
        return await _respond(writer, status, body, headers)

    # ---- the Messages API ----

    def _next_outcome(self) -> str:
        if self._script:
            return self._script.popleft()
        for outcome, p in self.cfg.fault_rates.items():
            if p > 0 and self.rng.random() < p:
                return outcome
        return "ok"

    def _bucket_key(self, model: str) -> str:
        best = ""
        for key in self.cfg.limits:
            if key != "*" and model.startswith(key) and len(key) > len(best):
                best = key
        return best or ("*" if "*" in self.cfg.limits else "")

    def _model_buckets(self, model: str) -> ModelBuckets | None:
        key = self._bucket_key(model)
        if not key:
            return None
        if key not in self._buckets:
            self._buckets[key] = ModelBuckets(
                self.cfg.limits[key], time.monotonic(), self.cfg.burst_s
            )
        return self._buckets[key]

    def _limit_headers(self, buckets: ModelBuckets | None) -> dict[str, str]:
        if buckets is None:
            return {}
        now, wall = time.monotonic(), time.time()
        out = {}
        for dim, bucket in buckets.buckets.items():
            reset = datetime.fromtimestamp(wall + bucket.full_in_s(now), UTC)
            out[f"{HEADER_PREFIX}{dim}-limit"] = str(round(per_minute_of(bucket)))
            out[f"{HEADER_PREFIX}{dim}-remaining"] = str(max(0, math.floor(bucket.level(now))))
            out[f"{HEADER_PREFIX}{dim}-reset"] = reset.strftime("%Y-%m-%dT%H:%M:%SZ")
        return out

    async def _messages(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        stats = self.stats
        stats.requests += 1
        if not stats.first_request_wall_s:
            stats.first_request_wall_s = time.time()
        if not (req.headers.get("x-api-key") or req.headers.get("authorization")):
            return await self._answer_error(
                writer, 401, "no x-api-key header: set ANTHROPIC_API_KEY (any value here)", "ok"
            )
        doc = _json_or_none(req.body)
        problem = validate_messages_request(doc)
        if problem:
            return await self._answer_error(writer, 400, problem, "ok")
        assert isinstance(doc, dict)
        model, max_tokens, stream = doc["model"], doc["max_tokens"], bool(doc.get("stream"))
        outcome = self._next_outcome()
        kind, _, arg = outcome.partition(":")
        buckets = self._model_buckets(model)
        headers = self._limit_headers(buckets)
        if kind in ("400", "401", "500", "529"):
            stats.faults[kind] += 1
            return await self._answer_error(
                writer, int(kind), f"injected {kind} for this request", outcome, headers
            )
        if kind == "429":
            stats.faults[kind] += 1
            return await self._answer_error(
                writer,
                429,
                "injected rate limit",
                outcome,
                {**headers, **self._retry_after(float(arg or 1))},
            )
        if kind == "drop":
            stats.faults[kind] += 1
            self.log.append((time.monotonic(), outcome, 0))
            return False
        if kind == "stall":
            stats.faults[kind] += 1
            self.log.append((time.monotonic(), outcome, 0))
            return await self._until_gone(reader)

        input_tokens = count_input_tokens(doc)
        if buckets is not None:
            now = time.monotonic()
            dim, wait = buckets.blocking(input_tokens, max_tokens, now)
            if wait > 0:
                stats.rate_limited += 1
                limit = round(per_minute_of(buckets.buckets[dim]))
                return await self._answer_error(
                    writer,
                    429,
                    f"this request would exceed the rate limit for your organization of "
                    f"{limit:,} {DIMENSION_TEXT[dim]} for {model}",
                    "rate_limited",
                    {**headers, **self._retry_after(wait)},
                )
            buckets.take(input_tokens, max_tokens, now)
            headers = self._limit_headers(buckets)

        self.log.append((time.monotonic(), outcome, 200))
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        output_tokens = max(1, min(max_tokens, round(self._draw(self._outputs))))
        try:
            if await _sleep_or_gone(reader, self._draw(self._latency) / 1000):
                stats.disconnects += 1
                return False
            msg_id = f"msg_sim_{uuid.uuid4().hex[:20]}"
            text = self._text(output_tokens)
            if kind == "malformed":
                stats.faults[kind] += 1
                return await self._malformed(writer, stream, headers)
            if not stream and kind == "drop_mid":
                stats.faults[kind] += 1
                return False
            if not stream and kind == "stream_error":
                stats.faults[kind] += 1
                return await self._answer_error(writer, 529, "Overloaded", outcome, headers)
            if not stream:
                body = _message(msg_id, model, text, input_tokens, output_tokens)
                await _respond(writer, 200, body, headers)
            elif not await self._stream(
                reader, writer, msg_id, model, text, input_tokens, output_tokens, headers, kind
            ):
                stats.disconnects += kind == "ok"
                return False
            stats.succeeded += 1
            stats.status["200"] += 1
            stats.input_tokens += input_tokens
            stats.output_tokens += output_tokens
            stats.last_reply_wall_s = time.time()
            return True
        finally:
            stats.in_flight -= 1
            if buckets is not None:
                # the output bucket held max_tokens; it keeps only what was generated
                buckets.correct(0, output_tokens - max_tokens, time.monotonic())

    async def _answer_error(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        message: str,
        outcome: str,
        headers: dict[str, str] | None = None,
    ) -> bool:
        self.stats.status[str(status)] += 1
        self.log.append((time.monotonic(), outcome, status))
        return await self._error(writer, status, message, headers)

    def _retry_after(self, wait_s: float) -> dict[str, str]:
        out = {"retry-after": str(max(1, math.ceil(wait_s)))}
        if self.cfg.retry_after_ms_header:
            out["retry-after-ms"] = str(max(1, math.ceil(wait_s * 1000)))
        return out

    def _draw(self, dist: tuple[str, float, float]) -> float:
        kind, a, b = dist
        if kind == "fixed":
            return a
        if kind == "uniform":
            return self.rng.uniform(a, b)
        return a * math.exp(self.rng.gauss(0.0, b))

    def _text(self, tokens: int) -> str:
        words = ["[simulated]"] + [WORDS[(i * 7) % len(WORDS)] for i in range(tokens - 1)]
        return " ".join(words)

    async def _until_gone(self, reader: asyncio.StreamReader) -> bool:
        self.stats.in_flight += 1
        try:
            await _sleep_or_gone(reader, math.inf)
            self.stats.disconnects += 1
            return False
        finally:
            self.stats.in_flight -= 1

    async def _malformed(
        self, writer: asyncio.StreamWriter, stream: bool, headers: dict[str, str]
    ) -> bool:
        if stream:
            await _start_chunked(writer, 200, {**headers, "content-type": "text/event-stream"})
            await _chunk(writer, b'event: message_start\ndata: {"type": "message_start", "mess\n\n')
            await _chunk(writer, b"")
        else:
            body = b'{"id": "msg_sim_broken", "type": "message", "content": [{"type": "te'
            await _write_head(
                writer, 200, {**headers, "content-type": "application/json"}, len(body)
            )
            writer.write(body)
            await writer.drain()
        self.stats.status["200-malformed"] += 1
        return True

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        msg_id: str,
        model: str,
        text: str,
        input_tokens: int,
        output_tokens: int,
        headers: dict[str, str],
        kind: str,
    ) -> bool:
        """Send the reply as SSE; False if the client went away (or a drop was asked for)."""
        await _start_chunked(
            writer,
            200,
            {**headers, "content-type": "text/event-stream", "cache-control": "no-cache"},
        )
        start = _message(msg_id, model, "", input_tokens, 1)
        start["content"], start["stop_reason"] = [], None
        await _event(writer, "message_start", {"type": "message_start", "message": start})
        if kind == "stream_error":
            self.stats.faults[kind] += 1
            await _event(
                writer,
                "error",
                {
                    "type": "error",
                    "error": {"type": "overloaded_error", "message": "(simulated) Overloaded"},
                },
            )
            await _chunk(writer, b"")
            return True
        await _event(
            writer,
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        words = text.split(" ")
        per_event = 8
        pace = per_event / self.cfg.tokens_per_s if self.cfg.tokens_per_s > 0 else 0.0
        for i in range(0, len(words), per_event):
            piece = (" " if i else "") + " ".join(words[i : i + per_event])
            await _event(
                writer,
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
            if kind == "drop_mid":
                self.stats.faults[kind] += 1
                return False
            if pace and await _sleep_or_gone(reader, pace):
                return False
        await _event(writer, "content_block_stop", {"type": "content_block_stop", "index": 0})
        await _event(
            writer,
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
        await _event(writer, "message_stop", {"type": "message_stop"})
        await _chunk(writer, b"")
        return True


# ---- request parsing and token counting ----


def validate_messages_request(doc: Any) -> str:
    """'' if `doc` is a request this server can answer, else what is wrong (a 400)."""
    if not isinstance(doc, dict):
        return "the body must be a JSON object"
    if not isinstance(doc.get("model"), str) or not doc["model"]:
        return "model: field required"
    mt = doc.get("max_tokens")
    if isinstance(mt, bool) or not isinstance(mt, int) or mt < 1:
        return "max_tokens: must be an integer >= 1"
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: at least one message is required"
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("user", "assistant")
            or "content" not in m
        ):
            return f"messages.{i}: each message needs a role (user or assistant) and content"
    return ""


def count_input_tokens(doc: dict[str, Any]) -> int:
    """The simulated tokenizer: 4 bytes of text per token, plus a little per message."""
    size = len(json.dumps(doc.get("system", ""))) + len(json.dumps(doc.get("tools", [])))
    messages = doc.get("messages", [])
    for m in messages if isinstance(messages, list) else []:
        content = m.get("content", "") if isinstance(m, dict) else ""
        size += len(content.encode()) if isinstance(content, str) else len(json.dumps(content))
    return math.ceil(size / 4) + 4 * len(messages) + 4


def _message(
    msg_id: str, model: str, text: str, input_tokens: int, output_tokens: int
) -> dict[str, Any]:
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _request_id() -> str:
    return f"req_sim_{uuid.uuid4().hex[:20]}"


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if err.partial.strip():
            raise
        return None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _ = lines[0].split(" ", 2)
    except ValueError:
        raise ConnectionError(f"bad request line {lines[0]!r}") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
            if len(body) > MAX_BODY_BYTES:
                raise ConnectionError("body too large")
    else:
        length = int(headers.get("content-length", "0") or 0)
        if length > MAX_BODY_BYTES:
            raise ConnectionError("body too large")
        body = bytearray(await reader.readexactly(length))
    return _Request(method, target.split("?")[0], headers, bytes(body))


async def _write_head(
    writer: asyncio.StreamWriter, status: int, headers: dict[str, str], length: int | None
) -> None:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}"]
    base = {
        "server": SERVER_NAME,
        "date": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()),
        "request-id": _request_id(),
        "connection": "keep-alive",
    }
    base.update(headers)
    if length is None:
        base["transfer-encoding"] = "chunked"
    else:
        base["content-length"] = str(length)
    lines += [f"{k}: {v}" for k, v in base.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: Any, headers: dict[str, str] | None = None
) -> bool:
    data = json.dumps(body).encode()
    await _write_head(
        writer, status, {"content-type": "application/json", **(headers or {})}, len(data)
    )
    writer.write(data)
    await writer.drain()
    return True


async def _start_chunked(
    writer: asyncio.StreamWriter, status: int, headers: dict[str, str]
) -> None:
    await _write_head(writer, status, headers, None)
    await writer.drain()


async def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()


async def _event(writer: asyncio.StreamWriter, name: str, data: dict[str, Any]) -> None:
    await _chunk(writer, f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())


async def _sleep_or_gone(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Wait `seconds`; True as soon as the client closes its side (it will send nothing
    else while it waits for this reply: HTTP/1.1 without pipelining)."""
    if seconds <= 0 and not reader.at_eof():
        return False
    read = asyncio.ensure_future(reader.read(1))
    try:
        done, _ = await asyncio.wait({read}, timeout=None if math.isinf(seconds) else seconds)
        return read in done
    finally:
        if not read.done():
            read.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await read


# ---- command line ----


def parse_fault_rates(specs: list[str]) -> dict[str, float]:
    out = {}
    for spec in specs:
        outcome, sep, p = spec.partition("=")
        if not sep or outcome.split(":")[0] not in OUTCOMES:
            raise ValueError(
                f"--fault-rate {spec!r}: use OUTCOME=PROBABILITY, OUTCOME in {OUTCOMES}"
            )
        out[outcome] = float(p)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.fake_anthropic",
        description="A SIMULATED Anthropic Messages API on 127.0.0.1 (not Claude), for tests and load tests.",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one, printed)"
    )
    parser.add_argument(
        "--latency-ms", default=FakeConfig.latency_ms, help="time to first byte distribution"
    )
    parser.add_argument(
        "--output-tokens", default=FakeConfig.output_tokens, help="output tokens distribution"
    )
    parser.add_argument(
        "--tokens-per-s", type=float, default=0.0, help="streaming pace (0: all at once)"
    )
    parser.add_argument(
        "--limits",
        action="append",
        default=[],
        help="MODEL_OR_PREFIX=RPM/ITPM/OTPM account limits ('*' for any model); repeatable",
    )
    parser.add_argument(
        "--burst-s",
        type=float,
        default=60.0,
        help="seconds of refill a bucket holds (60: a minute's allowance at once; 1: per second)",
    )
    parser.add_argument(
        "--fault-rate", action="append", default=[], help="OUTCOME=P, e.g. 529=0.01"
    )
    parser.add_argument("--retry-after-ms", action="store_true", help="also send retry-after-ms")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--duration-s", type=float, default=0.0, help="stop after this long (0: until signalled)"
    )
    parser.add_argument("--stats-file", default="", help="write the counters as JSON here on exit")
    args = parser.parse_args(argv)
    cfg = FakeConfig(
        latency_ms=args.latency_ms,
        output_tokens=args.output_tokens,
        tokens_per_s=args.tokens_per_s,
        limits=parse_limit_specs(args.limits),
        fault_rates=parse_fault_rates(args.fault_rate),
        burst_s=args.burst_s,
        retry_after_ms_header=args.retry_after_ms,
        seed=args.seed,
    )
    asyncio.run(_serve(cfg, args.port, args.duration_s, args.stats_file))


async def _serve(cfg: FakeConfig, port: int, duration_s: float, stats_file: str) -> None:
    server = FakeAnthropic(cfg)
    await server.start(port)
    print(
        f"SIMULATED Anthropic Messages API (not Claude) listening on {server.url} "
        f"limits={ {k: asdict(v) for k, v in cfg.limits.items()} or 'none' }",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), duration_s if duration_s > 0 else None)
    await server.stop()
    doc = json.dumps(server.stats.as_dict(), indent=2)
    if stats_file:
        Path(stats_file).write_text(doc + "\n")  # noqa: ASYNC240 - once, at exit
    print(doc, flush=True)


if __name__ == "__main__":
    main()
