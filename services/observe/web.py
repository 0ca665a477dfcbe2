"""`agentmesh dashboard`: a read-only web page of the swarm, served by the standard
library's HTTP server.

The HTTP server runs in threads of its own; the cluster is read on the asyncio loop
(collector, reader, model), and a request reaches it only through `run_coroutine_threadsafe`
with a deadline. Nothing here writes to the cluster: the reader has no method that could.

Every query parameter is checked (unknown, repeated or malformed ones are a 400 with a
message); every value shown in HTML is escaped; the pages carry a Content-Security-Policy
that allows only this origin's own script and style, so even an unescaped value could
not run code. Bound to loopback (the default), requests must name a loopback host, which
stops a DNS-rebinding page from reading the dashboard through a visitor's browser.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import datetime as dt
import html
import ipaddress
import json
import logging
import re
import threading
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

import grpc

from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import Clock, SystemClock
from services.cli_format import bytes_view, duration, local_time
from services.observe.collector import READ_ERRORS, Collector, MeshReader, describe
from services.observe.model import STATE_NAMES, SwarmModel, state_name

log = logging.getLogger(__name__)

ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
"""Task and agent ids, as the coordinator accepts them."""
KIND_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_FIELDS = 16
CALL_TIMEOUT_S = 8.0
"""How long a request waits for the cluster (the reader's own deadlines are shorter)."""
STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
DASH = "—"


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the dashboard on this machine."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class BadRequest(Exception):
    """A request the dashboard refuses with 400; the message says what to fix."""


# ---------------------------------------------------------------- query parameters


def _task_id(value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise BadRequest("must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return value


def _agent_id(value: str) -> str:
    if value and not ID_RE.fullmatch(value):
        raise BadRequest("must be 1-128 characters of A-Z a-z 0-9 . _ -")
    return value


def _kind(value: str) -> str:
    if value and not KIND_RE.fullmatch(value):
        raise BadRequest("must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def _state(value: str) -> str:
    if not value:
        return ""
    name = value.upper().removeprefix("TASK_STATE_")
    if name not in STATE_NAMES:
        raise BadRequest(f"must be one of {', '.join(STATE_NAMES)}")
    return name


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not re.fullmatch(r"[0-9]{1,7}", value) or not low <= int(value) <= high:
            raise BadRequest(f"must be a whole number from {low} to {high}")
        return int(value)

    return parse


def _page_token(value: str) -> str:
    # a page token is the last task id of the previous page
    if value and not ID_RE.fullmatch(value):
        raise BadRequest("must be the next_page_token of a previous page")
    return value


TASK_PARAMS: dict[str, Callable[[str], Any]] = {"id": _task_id}
LIST_PARAMS: dict[str, Callable[[str], Any]] = {
    "state": _state,
    "kind": _kind,
    "agent": _agent_id,
    "limit": _int_in(1, 1000),
    "page_token": _page_token,
}
SNAPSHOT_PARAMS: dict[str, Callable[[str], Any]] = {"points": _int_in(0, 100_000)}


def parse_query(query: str, allowed: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    """The query's parameters, each checked by its parser. Unknown, repeated and
    malformed parameters raise BadRequest naming the parameter."""
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_FIELDS
        )
    except ValueError:
        raise BadRequest(f"too many query parameters (at most {MAX_FIELDS})") from None
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name not in allowed:
            known = ", ".join(allowed) or "none"
            raise BadRequest(f"unknown parameter {name[:40]!r}; this page takes: {known}")
        if name in out:
            raise BadRequest(f"parameter {name!r} is given twice")
        if len(value) > 256:
            raise BadRequest(f"parameter {name!r} is longer than 256 characters")
        try:
            out[name] = allowed[name](value)
        except BadRequest as err:
            raise BadRequest(f"{name}: {err}") from None
    return out


# ---------------------------------------------------------------- views of a task


def _time_view(us: int, created_us: int, tz: dt.tzinfo | None) -> dict[str, Any] | None:
    if not us:
        return None
    return {
        "us": us,
        "local": local_time(us, tz),
        "since_created": f"+{duration(us - created_us)}" if created_us and us != created_us else "",
    }


def _bytes_json(data: bytes) -> dict[str, Any]:
    kind, shown = bytes_view(data)
    return {"size": len(data), "as": kind, "shown": shown}


def task_view(task: tpb.Task, tz: dt.tzinfo | None = None) -> dict[str, Any]:
    """A task for people (and for /api/task): states by name, local dates, bytes as text
    or base64 (the rules of `agentmesh task get`)."""
    spec = task.spec
    created = task.created_at_us
    took = None
    if created and task.finished_at_us:
        took = duration(task.finished_at_us - created)
    return {
        "task_id": task.task_id,
        "state": state_name(task.state),
        "kind": spec.kind,
        "priority": spec.priority,
        "role": spec.role,
        "required_labels": dict(sorted(spec.required_labels.items())),
        "metadata": dict(sorted(spec.metadata.items())),
        "attempts": task.attempts,
        "max_attempts": spec.max_attempts,
        "agent_id": task.agent_id,
        "term": task.term,
        "claim_token": task.claim_token,
        "last_error": task.last_error,
        "usage": {
            "input_tokens": task.usage.input_tokens,
            "output_tokens": task.usage.output_tokens,
            "cost_usd": task.usage.cost_usd,
        },
        "payload": _bytes_json(spec.payload),
        "result": _bytes_json(task.result),
        "payload_b64": base64.b64encode(spec.payload).decode("ascii")[:100_000],
        "times": {
            "created": _time_view(created, 0, tz),
            "assigned": _time_view(task.assigned_at_us, created, tz),
            "received": _time_view(task.received_at_us, created, tz),
            "finished": _time_view(task.finished_at_us, created, tz),
            "not_before": _time_view(task.not_before_us, created, tz)
            if task.state == tpb.TASK_STATE_QUEUED
            else None,
        },
        "took": took,
    }


def task_row(task: tpb.Task, tz: dt.tzinfo | None = None) -> dict[str, Any]:
    """A task as one line of a list."""
    return {
        "task_id": task.task_id,
        "state": state_name(task.state),
        "kind": task.spec.kind,
        "priority": task.spec.priority,
        "attempts": task.attempts,
        "agent_id": task.agent_id,
        "last_error": task.last_error[:200],
        "created": local_time(task.created_at_us, tz) if task.created_at_us else "",
        "finished": local_time(task.finished_at_us, tz) if task.finished_at_us else "",
    }


# ---------------------------------------------------------------- HTML


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str) -> str:
    """A whole page around `body` (which must already be escaped)."""
    return (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · agentmesh</title>"
        '<link rel=stylesheet href="/static/dashboard.css"></head><body>'
        '<header class=top><a class=brand href="/">agentmesh</a>'
        '<form class=search action="/task" method=get>'
        '<input name=id placeholder="task id" maxlength=128 required aria-label="task id">'
        "<button>open task</button></form>"
        '<form class=search action="/tasks" method=get>'
        + _state_select("")
        + '<input name=kind placeholder="kind" maxlength=64 aria-label="kind">'
        "<button>list</button></form></header>"
        f"<main>{body}</main></body></html>\n"
    )


def _state_select(selected: str) -> str:
    options = ['<option value="">any state</option>'] + [
        f'<option value="{esc(s)}"{" selected" if s == selected else ""}>{esc(s)}</option>'
        for s in STATE_NAMES
    ]
    return f'<select name=state aria-label="state">{"".join(options)}</select>'


def error_page(status: int, message: str) -> str:
    reason = HTTPStatus(status).phrase
    return page(
        f"{status} {reason}",
        f"<h1>{status} {esc(reason)}</h1><p class=error id=error-message>{esc(message)}</p>"
        '<p><a href="/">back to the dashboard</a></p>',
    )


def _dl(rows: list[tuple[str, str]]) -> str:
    return (
        "<table class=fields>"
        + "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _bytes_html(name: str, view: Mapping[str, Any]) -> str:
    if not view["size"]:
        return f"<h2>{esc(name)}</h2><p class=muted>(empty)</p>"
    size = f"{view['size']:,} byte{'s' if view['size'] != 1 else ''}"
    return (
        f"<h2>{esc(name)} <span class=muted>({esc(size)}, {esc(view['as'])})</span></h2>"
        f'<pre id="task-{esc(name)}" class=bytes>{esc(view["shown"])}</pre>'
    )


def task_page(view: Mapping[str, Any], history: list[Mapping[str, Any]]) -> str:
    """One task: the record (state, attempts, agent, times, payload, result) and the
    changes this dashboard saw."""
    attempts = str(view["attempts"]) + (
        f" of {view['max_attempts']}" if view["max_attempts"] else ""
    )
    agent = view["agent_id"]
    rows: list[tuple[str, str]] = [
        (
            "state",
            f'<span class="state s-{esc(view["state"])}" id=task-state>{esc(view["state"])}</span>',
        ),
        ("kind", esc(view["kind"])),
        ("priority", esc(view["priority"])),
        ("attempts", esc(attempts)),
        (
            "agent",
            f'<a href="/tasks?agent={esc(urllib.parse.quote(agent))}">{esc(agent)}</a>'
            if agent
            else DASH,
        ),
        ("term", esc(view["term"] or DASH)),
    ]
    if view["role"]:
        rows.append(("role", esc(view["role"])))
    if view["required_labels"]:
        rows.append(
            ("labels", esc(", ".join(f"{k}={v}" for k, v in view["required_labels"].items())))
        )
    if view["metadata"]:
        rows.append(("metadata", esc(", ".join(f"{k}={v}" for k, v in view["metadata"].items()))))
    for name in ("created", "assigned", "received", "finished", "not_before"):
        t = view["times"][name]
        if t:
            extra = (
                f" <span class=muted>{esc(t['since_created'])}</span>" if t["since_created"] else ""
            )
            rows.append((name.replace("_", " "), f"{esc(t['local'])}{extra}"))
    if view["took"]:
        rows.append(("took", esc(view["took"] + " in all")))
    usage = view["usage"]
    if usage["input_tokens"] or usage["output_tokens"] or usage["cost_usd"]:
        rows.append(
            (
                "usage",
                esc(
                    f"{usage['input_tokens']:,} tokens in, {usage['output_tokens']:,} out, "
                    f"${usage['cost_usd']:.4f}"
                ),
            )
        )
    if view["last_error"]:
        rows.append(("last error", f"<span class=error>{esc(view['last_error'])}</span>"))
    body = [
        f"<h1>task <code id=task-id>{esc(view['task_id'])}</code></h1>",
        _dl(rows),
        _bytes_html("payload", view["payload"]),
    ]
    if view["result"]["size"] or view["state"] == "SUCCEEDED":
        body.append(_bytes_html("result", view["result"]))
    body.append("<h2>history seen by this dashboard</h2>")
    if history:
        body.append(
            "<table class=list id=task-history><tr><th>seen at</th><th>change</th><th>agent</th>"
            "<th>attempt</th><th>error</th></tr>"
        )
        for h in history:
            change = "progress" if h["progress"] else f"{h['from'] or 'new'} → {h['to']}"
            body.append(
                f"<tr><td>{esc(local_time(h['seen_at_us']))}</td><td>{esc(change)}</td>"
                f"<td>{esc(h['agent_id'] or DASH)}</td><td>{esc(h['attempts'])}</td>"
                f"<td class=error>{esc(h['error'])}</td></tr>"
            )
        body.append("</table>")
    else:
        body.append(
            "<p class=muted>none: the task changed before this dashboard started, or while its "
            "events stream was down. The times above come from the task's record.</p>"
        )
    return page(f"task {view['task_id']}", "".join(body))


def tasks_page(
    rows: Sequence[Mapping[str, Any]], filters: Mapping[str, Any], next_token: str
) -> str:
    """A list of tasks (ListTasks), with a link to the next page."""
    described = ", ".join(f"{k} {v}" for k, v in filters.items() if k != "page_token" and v)
    body = [f"<h1>tasks{esc(' · ' + described) if described else ''}</h1>"]
    if not rows:
        body.append(
            "<p class=muted id=tasks-empty>"
            + ("no task matches among those looked at so far" if next_token else "no task matches")
            + "</p>"
        )
    else:
        body.append(_task_table(rows, "task-list"))
    if next_token:
        nxt = {k: v for k, v in filters.items() if v and k != "page_token"}
        nxt["page_token"] = next_token
        body.append(f'<p><a href="/tasks?{esc(urllib.parse.urlencode(nxt))}">next page</a></p>')
    return page("tasks", "".join(body))


def _task_table(rows: Sequence[Mapping[str, Any]], table_id: str) -> str:
    out = [
        f"<table class=list id={esc(table_id)}><tr><th>task</th><th>state</th><th>kind</th>"
        "<th>prio</th><th>attempts</th><th>agent</th><th>finished</th><th>last error</th></tr>"
    ]
    for r in rows:
        link = f"/task?id={urllib.parse.quote(r['task_id'])}"
        out.append(
            f'<tr><td><a href="{esc(link)}">{esc(r["task_id"])}</a></td>'
            f'<td><span class="state s-{esc(r["state"])}">{esc(r["state"])}</span></td>'
            f"<td>{esc(r['kind'])}</td><td>{esc(r['priority'])}</td><td>{esc(r['attempts'])}</td>"
            f"<td>{esc(r['agent_id'] or DASH)}</td><td>{esc(r['finished'] or DASH)}</td>"
            f"<td class=error>{esc(r['last_error'])}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


# ---------------------------------------------------------------- the app


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


class DashboardApp:
    """Routes a GET to a response. Called from the HTTP server's threads; whatever
    touches the cluster or the model runs on `loop` (through `on_loop`).

    Args:
        loop: the event loop that owns the reader and the model.
        reader: the read-only cluster client.
        model: the swarm model the collector fills.
        allowed_hosts: Host header values accepted (empty: any).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        reader: MeshReader,
        model: SwarmModel,
        allowed_hosts: frozenset[str] = frozenset(),
    ) -> None:
        self.loop = loop
        self.reader = reader
        self.model = model
        self.allowed_hosts = allowed_hosts

    def on_loop(self, make: Callable[[], Awaitable[Any]]) -> Any:
        future = asyncio.run_coroutine_threadsafe(_call(make), self.loop)
        try:
            return future.result(timeout=CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the cluster did not answer within {CALL_TIMEOUT_S:g} s") from None

    def handle(self, method: str, target: str, host: str) -> Response:
        """The response to one request; never raises (a bug is a 500 that says so)."""
        try:
            if self.allowed_hosts and host.lower() not in self.allowed_hosts:
                raise BadRequest(
                    "this dashboard answers only to a loopback host name (127.0.0.1, localhost, [::1])"
                )
            if method not in ("GET", "HEAD"):
                return self._error(405, "the dashboard is read-only: GET only", api=True)
            url = urllib.parse.urlsplit(target)
            return self._route(url.path, url.query)
        except BadRequest as err:
            return self._error(400, str(err), api=target.startswith("/api/"))
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code == grpc.StatusCode.NOT_FOUND:
                return self._error(404, describe(err), api=target.startswith("/api/"))
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                return self._error(400, describe(err), api=target.startswith("/api/"))
            return self._error(
                503, f"the cluster did not answer: {describe(err)}", api=target.startswith("/api/")
            )
        except READ_ERRORS as err:
            return self._error(
                503, f"the cluster did not answer: {describe(err)}", api=target.startswith("/api/")
            )
        except Exception:  # a bug: logged here, never shown to the browser as a trace
            log.exception("dashboard request failed", extra={"target": target[:200]})
            return self._error(
                500, "internal error (see the dashboard's log)", api=target.startswith("/api/")
            )

    def _route(self, path: str, query: str) -> Response:
        if path in ("/", "/index.html"):
            parse_query(query, {})
            return Response(200, _asset("index.html"))
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if name not in STATIC:
                return self._error(404, "no such file", api=True)
            parse_query(query, {})
            return Response(
                200, _asset(name), STATIC[name] + "; charset=utf-8", {"Cache-Control": "no-cache"}
            )
        if path == "/healthz":
            parse_query(query, {})
            return Response(200, b"ok\n", "text/plain; charset=utf-8")
        if path == "/api/snapshot":
            args = parse_query(query, SNAPSHOT_PARAMS)
            points = args.get("points", 300)

            async def snap() -> bytes:
                return json.dumps(self.model.snapshot(points=points)).encode()

            return self._json_bytes(self.on_loop(snap))
        if path in ("/api/tasks", "/tasks"):
            args = parse_query(query, LIST_PARAMS)
            rows, token = self._list(args)
            if path == "/tasks":
                return Response(200, tasks_page(rows, args, token).encode())
            return self._json({"tasks": rows, "next_page_token": token})
        if path in ("/api/task", "/task"):
            args = parse_query(query, TASK_PARAMS)
            if "id" not in args:
                raise BadRequest("id is required (a task id)")
            task_id = args["id"]
            task: tpb.Task = self.on_loop(lambda: self.reader.get(task_id))

            async def history() -> list[dict[str, Any]]:
                return self.model.history(task_id)

            seen = self.on_loop(history)
            view = task_view(task)
            if path == "/task":
                return Response(200, task_page(view, seen).encode())
            return self._json({"task": view, "history": seen})
        return self._error(404, f"no page at {path[:200]}", api=path.startswith("/api/"))

    def _list(self, args: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
        states = [tpb.TaskState.Value("TASK_STATE_" + args["state"])] if args.get("state") else []
        resp = self.on_loop(
            lambda: self.reader.list_tasks(
                states=states,
                kind=args.get("kind", ""),
                agent_id=args.get("agent", ""),
                page_size=args.get("limit", 50),
                page_token=args.get("page_token", ""),
            )
        )
        return [task_row(t) for t in resp.tasks], str(resp.next_page_token)

    def _json(self, doc: Any) -> Response:
        return self._json_bytes(json.dumps(doc).encode())

    @staticmethod
    def _json_bytes(body: bytes) -> Response:
        return Response(200, body, "application/json", {"Cache-Control": "no-store"})

    @staticmethod
    def _error(status: int, message: str, api: bool) -> Response:
        if api:
            body = json.dumps({"error": message, "status": status}).encode()
            return Response(status, body, "application/json")
        return Response(status, error_page(status, message).encode())


async def _call(make: Callable[[], Awaitable[Any]]) -> Any:
    return await make()


def _asset(name: str) -> bytes:
    return resources.files("services.observe").joinpath("static", name).read_bytes()


class _Handler(BaseHTTPRequestHandler):
    server_version = "agentmesh-dashboard"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # a slow or silent client gives up its thread after this long
    timeout = 15

    def _serve(self) -> None:
        app: DashboardApp = self.server.app  # type: ignore[attr-defined]
        resp = app.handle(self.command, self.path, self.headers.get("Host", ""))
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.content_type)
        self.send_header("Content-Length", str(len(resp.body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    do_GET = _serve
    do_HEAD = _serve
    do_POST = _serve
    do_PUT = _serve
    do_DELETE = _serve
    do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("http " + format, *args)


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """Host header values a loopback-bound dashboard answers to (empty: any)."""
    if not is_loopback(host):
        return frozenset()
    names = ("127.0.0.1", "localhost", "[::1]")
    return frozenset({*names, *(f"{n}:{port}" for n in names)})


class DashboardServer:
    """The HTTP server in a thread of its own, in front of a DashboardApp."""

    def __init__(self, app: DashboardApp, host: str, port: int) -> None:
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = app  # type: ignore[attr-defined]
        self.port = int(self.httpd.server_address[1])
        self.host = host
        # shutdown() waits for the serve loop's next poll: keep stopping quick
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.1,), name="dashboard-http", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self) -> None:
        self._thread.start()

    async def stop(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.httpd.shutdown)
        self.httpd.server_close()


async def serve_dashboard(
    *,
    host: str,
    port: int,
    etcd: str | None,
    coordinator: str | None,
    cluster: str,
    group_by: str = "pool",
    on_ready: Callable[[str], None] = print,
    clock: Clock | None = None,
) -> None:
    """Run the dashboard until SIGTERM or SIGINT."""
    from services._common.grpcserver import stop_event

    clock = clock or SystemClock()
    stop = stop_event()
    reader = MeshReader(etcd=etcd, coordinator=coordinator, cluster=cluster)
    model = SwarmModel(clock, cluster=cluster, group_by=group_by)
    from services.health.feed import HealthFeed

    collector = Collector(reader, model, clock, feeds=[HealthFeed()])
    app = DashboardApp(asyncio.get_running_loop(), reader, model)
    server = DashboardServer(app, host, port)
    app.allowed_hosts = allowed_hosts(host, server.port)
    server.start()
    on_ready(server.url)
    follow = asyncio.ensure_future(collector.run())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({follow, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if follow.done():
            follow.result()  # a bug in the collector: surface it
    finally:
        stopping.cancel()
        follow.cancel()
        await asyncio.gather(follow, stopping, return_exceptions=True)
        await server.stop()
        await collector.close()
        await reader.close()
