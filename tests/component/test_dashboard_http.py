"""The dashboard's HTTP side, in process on a free port, over a fake read-only cluster:
what each endpoint answers, that bad input is a 400 with a message (never a trace),
that what it echoes is escaped, and that it writes nothing."""

from __future__ import annotations

import asyncio
import inspect
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.clock import FakeClock
from services.observe.collector import MeshReader
from services.observe.model import SwarmModel
from services.observe.web import DashboardApp, DashboardServer, allowed_hosts

S = tpb.TaskState
EVIL = "<script>alert(1)</script>"


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class FakeReader:
    """The reads the dashboard makes, from a dict of tasks; records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.tasks = {
            "done-1": tpb.Task(
                task_id="done-1",
                spec=tpb.TaskSpec(kind="echo", payload=EVIL.encode()),
                state=S.TASK_STATE_SUCCEEDED,
                attempts=1,
                agent_id="a1",
                result=b"\x00\xffbinary",
                created_at_us=1_795_900_000_000_000,
                finished_at_us=1_795_900_000_250_000,
            ),
            "dead-1": tpb.Task(
                task_id="dead-1",
                spec=tpb.TaskSpec(kind="fail"),
                state=S.TASK_STATE_DEAD_LETTER,
                attempts=3,
                last_error=f"boom {EVIL}",
            ),
        }
        self.fail_with: BaseException | None = None

    async def get(self, task_id: str) -> tpb.Task:
        self.calls.append(("get", {"task_id": task_id}))
        if self.fail_with is not None:
            raise self.fail_with
        if task_id not in self.tasks:
            raise rpc_error(grpc.StatusCode.NOT_FOUND, f"task {task_id!r} does not exist")
        return self.tasks[task_id]

    async def list_tasks(
        self,
        states: Sequence[int] = (),
        kind: str = "",
        agent_id: str = "",
        page_size: int = 100,
        page_token: str = "",
    ) -> cpb.ListTasksResponse:
        self.calls.append(("list", {"states": list(states), "kind": kind, "page_size": page_size}))
        if self.fail_with is not None:
            raise self.fail_with
        out = [t for t in self.tasks.values() if not states or t.state in states]
        return cpb.ListTasksResponse(tasks=out[:page_size], next_page_token="")


@pytest.fixture
async def dashboard() -> AsyncIterator[tuple[DashboardServer, FakeReader, SwarmModel]]:
    reader = FakeReader()
    model = SwarmModel(FakeClock(start=1_795_900_000.0))
    model.apply_status(
        cpb.ClusterStatus(leader_id="c1", leader_endpoint="127.0.0.1:5000", term=7, queue_depth=3)
    )
    app = DashboardApp(asyncio.get_running_loop(), reader, model)  # type: ignore[arg-type]
    server = DashboardServer(app, "127.0.0.1", 0)
    app.allowed_hosts = allowed_hosts("127.0.0.1", server.port)
    server.start()
    try:
        yield server, reader, model
    finally:
        await server.stop()


async def fetch(
    server: DashboardServer, path: str, method: str = "GET", host: str | None = None
) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers), from a thread: the app answers on this test's loop."""

    def go() -> tuple[int, str, dict[str, str]]:
        req = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}", method=method)
        if host is not None:
            req.add_header("Host", host)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read().decode(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), dict(err.headers)

    return await asyncio.to_thread(go)


async def test_index_and_assets_are_served_with_a_strict_policy(dashboard: Any) -> None:
    server, _, _ = dashboard
    code, body, headers = await fetch(server, "/")
    assert code == 200
    assert 'id="leader-endpoint"' in body or "id=leader-endpoint" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        code, body, headers = await fetch(server, f"/static/{asset}")
        assert code == 200
        assert headers["Content-Type"].startswith(kind)
    code, _, _ = await fetch(server, "/static/../web.py")
    assert code == 404
    # nothing on the page comes from elsewhere
    _, page, _ = await fetch(server, "/")
    assert "http://" not in page.replace("http://www.w3.org", "")
    assert "https://" not in page


async def test_snapshot_is_the_models_json(dashboard: Any) -> None:
    server, _, _ = dashboard
    code, body, headers = await fetch(server, "/api/snapshot?points=5")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["Cache-Control"] == "no-store"
    snap = json.loads(body)
    assert (snap["leader"]["endpoint"], snap["leader"]["term"], snap["queue"]["depth"]) == (
        "127.0.0.1:5000",
        7,
        3,
    )
    assert len(snap["throughput"]["series"]) <= 5


async def test_task_page_shows_the_record_escaped(dashboard: Any) -> None:
    server, _, model = dashboard
    model.apply_event(
        tpb.TaskEvent(task=dashboard[1].tasks["done-1"], previous_state=S.TASK_STATE_RUNNING)
    )
    code, body, _ = await fetch(server, "/task?id=done-1")
    assert code == 200
    assert EVIL not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body  # the payload, as text
    assert "AP9iaW5hcnk=" in body  # the binary result, as base64
    assert "SUCCEEDED" in body
    assert "250 ms in all" in body
    assert "RUNNING → SUCCEEDED" in body  # the history this dashboard saw
    code, body, _ = await fetch(server, "/api/task?id=done-1")
    doc = json.loads(body)
    assert doc["task"]["payload"] == {"size": len(EVIL), "as": "text", "shown": EVIL}
    assert doc["task"]["result"]["as"] == "base64"
    assert [h["to"] for h in doc["history"]] == ["SUCCEEDED"]


async def test_lists_filter_by_state_and_escape_errors(dashboard: Any) -> None:
    server, reader, _ = dashboard
    code, body, _ = await fetch(server, "/api/tasks?state=dead_letter&limit=5")
    assert code == 200
    doc = json.loads(body)
    assert [t["task_id"] for t in doc["tasks"]] == ["dead-1"]
    assert reader.calls[-1] == (
        "list",
        {"states": [S.TASK_STATE_DEAD_LETTER], "kind": "", "page_size": 5},
    )
    code, body, _ = await fetch(server, "/tasks?state=DEAD_LETTER")
    assert code == 200
    assert 'href="/task?id=dead-1"' in body
    assert EVIL not in body
    assert "boom &lt;script&gt;" in body


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/task", "id is required"),
        ("/task?id=", "id: must be 1-128 characters"),
        ("/task?id=%3Cscript%3E", "id: must be 1-128 characters"),
        ("/task?id=" + "a" * 129, "id: must be 1-128 characters"),
        ("/task?id=a&id=b", "given twice"),
        ("/task?id=a&x=1", "unknown parameter"),
        ("/tasks?state=BOGUS", "state: must be one of QUEUED"),
        ("/tasks?limit=0", "limit: must be a whole number from 1 to 1000"),
        ("/tasks?limit=1001", "limit: must be a whole number"),
        ("/tasks?limit=-1", "limit: must be a whole number"),
        ("/tasks?limit=1e3", "limit: must be a whole number"),
        ("/tasks?kind=%3Cb%3E", "kind: must be 1-64 characters"),
        ("/tasks?agent=a%20b", "agent: must be 1-128 characters"),
        ("/task?id=t-1%0A", "id: must be 1-128 characters"),
        ("/tasks?agent=a-1%0A", "agent: must be 1-128 characters"),
        ("/tasks?kind=echo%0A", "kind: must be 1-64 characters"),
        ("/tasks?page_token=t-1%0A", "page_token: must be the next_page_token"),
        ("/tasks?page_token=%00", "page_token: must be the next_page_token"),
        ("/api/snapshot?points=x", "points: must be a whole number"),
        ("/api/tasks?" + "&".join(f"p{i}=1" for i in range(20)), "too many query parameters"),
        ("/?debug=1", "unknown parameter"),
    ],
)
async def test_bad_input_is_a_400_that_says_what_to_fix(
    dashboard: Any, path: str, message: str
) -> None:
    server, reader, _ = dashboard
    code, body, _ = await fetch(server, path)
    assert code == 400
    assert message in body
    assert "Traceback" not in body
    assert "<script>" not in body
    assert reader.calls == []  # refused before the cluster is asked


async def test_an_unknown_parameter_name_is_echoed_escaped(dashboard: Any) -> None:
    server, _, _ = dashboard
    code, body, _ = await fetch(server, "/tasks?%3Cimg%20src%3Dx%3E=1")
    assert code == 400
    assert "<img" not in body
    assert "&lt;img src=x&gt;" in body


async def test_cluster_errors_become_status_codes_not_traces(dashboard: Any) -> None:
    server, reader, _ = dashboard
    code, body, _ = await fetch(server, "/api/task?id=nope")
    assert code == 404
    assert "does not exist" in json.loads(body)["error"]
    reader.fail_with = rpc_error(grpc.StatusCode.UNAVAILABLE, "no leader")
    code, body, _ = await fetch(server, "/task?id=done-1")
    assert code == 503
    assert "UNAVAILABLE: no leader" in body
    reader.fail_with = RuntimeError("a bug with a secret in it")
    code, body, _ = await fetch(server, "/api/tasks")
    assert code == 500
    assert json.loads(body)["error"] == "internal error (see the dashboard's log)"
    assert "secret" not in body


async def test_it_is_read_only_and_answers_only_loopback_names(dashboard: Any) -> None:
    server, reader, _ = dashboard
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        code, body, _ = await fetch(server, "/api/tasks", method=method)
        assert code == 405
        assert "read-only" in body
    assert reader.calls == []
    code, _, _ = await fetch(server, "/api/snapshot", host=f"localhost:{server.port}")
    assert code == 200
    # a DNS-rebinding page would send its own host name
    code, body, _ = await fetch(server, "/api/snapshot", host=f"evil.example:{server.port}")
    assert code == 400
    assert "loopback" in body


def test_the_reader_has_no_method_that_writes() -> None:
    public = {
        n for n, _ in inspect.getmembers(MeshReader, inspect.isfunction) if not n.startswith("_")
    }
    assert public == {"status", "agents", "list_tasks", "get", "open_events", "registry", "close"}
