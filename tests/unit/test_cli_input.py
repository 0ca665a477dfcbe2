"""Client commands refuse a number they cannot send with a one-line usage error (exit 2)
before they connect: no traceback, no 15 s of retries, no memory filled first."""

from __future__ import annotations

import asyncio
import gc
import itertools
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from typer.testing import CliRunner

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd_server import free_port
from services import cli
from services.cli import common as cli_common
from services.cli import tasks as cli_tasks


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["submit", "--kind", "echo", "--max-attempts", "-1"], "--max-attempts -1 is out of range"),
        (
            ["submit", "--kind", "echo", "--max-attempts", "101"],
            "--max-attempts 101 is out of range",
        ),
        (["submit", "--kind", "noop", "--count", "100001"], "--count 100001 is out of range"),
        (["tasks", "--limit", "-1"], "--limit -1 is out of range: use 1 to 1000"),
        (["tasks", "--limit", "0"], "--limit 0 is out of range: use 1 to 1000"),
        (["decisions", "--limit", "-1"], "--limit -1 is out of range: use 1 to 1000"),
        (["propose", "x", "--quorum", "-1"], "--quorum -1 is out of range"),
        (["propose", "x", "--max-faulty", "-1"], "--max-faulty -1 is out of range"),
        (["propose", "x", "--timeout-s", "nan"], "--timeout-s nan is out of range"),
        (["propose", "x", "--timeout-s", "inf"], "--timeout-s inf is out of range"),
        (["propose", "x", "--timeout-s", "1e10"], "--timeout-s 1e+10 is out of range"),
    ],
)
def test_a_number_out_of_range_is_a_usage_error(
    args: list[str], said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nobody listens there: a command that got as far as connecting fails with exit 1
    monkeypatch.setattr(cli_common, "CLIENT_RETRY_S", 0.3)
    result = CliRunner().invoke(cli.app, [*args, "--etcd", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert said in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


class FakeMesh:
    """A MeshClient with two connected echo/sleep agents, one of them a coder on a GPU."""

    def __init__(self) -> None:
        self.submitted: list[tpb.TaskSpec] = []

    async def __aenter__(self) -> FakeMesh:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def agents(self) -> cpb.ListAgentsResponse:
        return cpb.ListAgentsResponse(
            agents=[
                cpb.AgentStatus(agent_id="a1", kinds=["echo", "sleep"]),
                cpb.AgentStatus(
                    agent_id="a2", kinds=["echo"], roles=["coder"], labels={"gpu": "1"}
                ),
            ]
        )

    async def submit(self, spec: tpb.TaskSpec) -> cpb.SubmitResponse:
        self.submitted.append(spec)
        return cpb.SubmitResponse(task=tpb.Task(task_id="t-1", spec=spec), created=True)

    async def submit_batch(self, specs: list[tpb.TaskSpec]) -> cpb.SubmitBatchResponse:
        self.submitted.extend(specs)
        return cpb.SubmitBatchResponse(
            results=[
                cpb.SubmitResponse(task=tpb.Task(task_id=f"t-{i}"), created=True)
                for i, _ in enumerate(specs)
            ]
        )


@pytest.mark.parametrize(
    ("args", "note"),
    [
        (
            ["--kind", "llm", "--payload", '{"prompt": "hi"}'],
            "note: no connected agent runs kind 'llm': 1 task(s) stay QUEUED until one "
            "connects (an agent pool started with --kinds llm and ANTHROPIC_API_KEY)",
        ),
        (
            ["--kind", "sleep", "--role", "coder", "--count", "3"],
            "note: no connected agent runs kind 'sleep' with role 'coder': 3 task(s) stay "
            "QUEUED until one connects",
        ),
        (
            ["--kind", "echo", "--label", "gpu=2"],
            "note: no connected agent runs kind 'echo' and label gpu=2: 1 task(s) stay "
            "QUEUED until one connects",
        ),
        (["--kind", "echo", "--role", "coder", "--label", "gpu=1"], ""),
        (["--kind", "sleep", "--count", "2"], ""),
    ],
)
def test_submit_says_when_no_connected_agent_can_run_the_tasks(
    args: list[str], note: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task nobody can run stays QUEUED without a word: `submit --kind llm` on a
    cluster whose pools run no llm agent (no ANTHROPIC_API_KEY) printed 'created QUEUED',
    and `--wait` then waited for ever."""
    mesh = FakeMesh()
    monkeypatch.setattr(cli_tasks, "mesh_client", lambda *_: mesh)
    result = CliRunner().invoke(cli.app, ["submit", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    assert mesh.submitted, "the tasks are still submitted"
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert notes == ([note] if note else []), result.output


def unavailable() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        "etcd at 127.0.0.1:1 does not answer; is the cluster running?",
    )


class StoppedMesh:
    """A cluster stopped while `submit --wait` waits: the events stream and the poll that
    backs it up both fail, the stream's read first."""

    def __init__(self) -> None:
        self.polled = asyncio.Event()

    async def watch_events(self) -> AsyncIterator[tpb.TaskEvent]:
        await self.polled.wait()
        raise unavailable()
        yield tpb.TaskEvent()  # an async generator, like MeshClient's

    async def submit_batch(self, specs: list[tpb.TaskSpec]) -> cpb.SubmitBatchResponse:
        return cpb.SubmitBatchResponse(
            results=[
                cpb.SubmitResponse(
                    task=tpb.Task(task_id=s.task_id, state=tpb.TASK_STATE_QUEUED), created=True
                )
                for s in specs
            ]
        )

    async def get(self, task_id: str) -> tpb.Task:
        self.polled.set()
        await asyncio.sleep(0.05)  # the stream's read fails meanwhile
        raise unavailable()


def test_a_wait_cut_short_by_a_stopped_cluster_prints_no_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`submit --wait` while the cluster stopped said 'error: UNAVAILABLE: etcd ... does
    not answer' (exit 1) and then 'Task exception was never retrieved' with a traceback:
    the events stream's pending read had failed too, and nobody took its error."""
    ticks = itertools.count(step=10.0)  # every poll of the wait is due at once
    monkeypatch.setattr(cli_tasks, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    specs = [tpb.TaskSpec(task_id=f"t-{i}", kind="sleep") for i in range(3)]
    with pytest.raises(grpc.aio.AioRpcError):
        asyncio.run(cli_tasks.submit_and_wait(StoppedMesh(), specs, wait=True))
    gc.collect()  # where an unretrieved task error is reported
    assert "exception was never retrieved" not in caplog.text, caplog.text


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "cannot be read: Is a directory"),
        (b"", "holds no TaskSpec"),
        (b"\n  \n", "holds no TaskSpec"),
        (b"\xff\xfe{}\n", "cannot be read: 'utf-8' codec can't decode"),
    ],
)
def test_a_file_with_no_tasks_in_it_is_a_usage_error(
    content: bytes | None, said: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`submit --file DIR` and a file that is not UTF-8 ended in a traceback
    (IsADirectoryError, UnicodeDecodeError); an empty file submitted nothing, said
    nothing and exited 0."""
    monkeypatch.setattr(cli_common, "CLIENT_RETRY_S", 0.3)
    path = tmp_path
    if content is not None:
        path = tmp_path / "tasks.jsonl"
        path.write_bytes(content)
    args = ["submit", "--file", str(path), "--etcd", f"127.0.0.1:{free_port()}"]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert said in " ".join(result.output.split()), result.output


@pytest.mark.timeout(60)
def test_status_json_of_a_cluster_that_is_not_there_exits_1() -> None:
    """`status --once` exits 1 when etcd does not answer; `status --json` printed a
    snapshot of errors and exited 0, so a script could not tell."""
    endpoint = f"127.0.0.1:{free_port()}"
    result = CliRunner().invoke(cli.app, ["status", "--json", "--etcd", endpoint])
    assert result.exit_code == 1, (result.output, result.exception)
    said = " ".join(result.output.split())
    assert f"error: nothing could be read: UNAVAILABLE: etcd at {endpoint} does not answer" in said
    assert '"errors": {' in result.output  # the snapshot is still printed


def test_ids_in_tables_are_never_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a pipe (80 columns) or a narrow terminal rich shrank `agentmesh tasks` and
    `agentmesh agents` by cutting every column, ids included: 'k-110330a…' and
    'pool-1-…' are ids no next command (`task get`) can use."""
    from services.cli import agents as cli_agents

    task_id = "k-110330a1b2c3d4e5f60718293a4b5c6d"
    listed = cpb.ListTasksResponse(
        tasks=[
            tpb.Task(
                task_id=task_id,
                spec=tpb.TaskSpec(kind="sleep"),
                state=tpb.TASK_STATE_DEAD_LETTER,
                agent_id="pool-1-a0001",
                last_error="sleep payload must be JSON like {'ms': 50}",
            )
        ]
    )
    monkeypatch.setattr(cli_tasks, "call", lambda coro: coro.close() or listed)
    out = CliRunner().invoke(cli.app, ["tasks"]).output
    assert task_id in out, out

    agent = cpb.AgentStatus(
        agent_id="pool-12-a0001", pool_id="pool-12", kinds=["echo", "fail", "noop", "sleep"]
    )
    connected = cpb.ListAgentsResponse(agents=[agent] * 2)
    monkeypatch.setattr(cli_agents, "call", lambda coro: coro.close() or connected)
    out = CliRunner().invoke(cli.app, ["agents"]).output
    assert "pool-12-a0001" in out, out


@pytest.mark.parametrize("timeout_s", ["-1", "nan", "0"])
def test_health_check_refuses_a_deadline_it_cannot_keep(timeout_s: str) -> None:
    """`health check HOST:PORT --timeout-s -1` (or nan, or 0) said 'DEADLINE_EXCEEDED' as
    if the service had not answered (with 0 a live one sometimes answered SERVING)."""
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()  # accepts, never answers
        target = f"127.0.0.1:{listening.getsockname()[1]}"
        result = CliRunner().invoke(cli.app, ["health", "check", target, "--timeout-s", timeout_s])
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"--timeout-s {timeout_s} is out of range" in result.output
