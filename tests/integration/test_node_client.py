"""The Node.js client in clients/node against a live cluster: the contract works from
another language, through the protos alone.

As a client it must find the leader from a standby's pointer, submit (single and batch),
watch tasks to their end and read them back with the bytes intact. As an agent it must
take an etcd lease of its own, follow a standby's redirect, run tasks no Python agent
can, report them with the claim token, stop on a cancel, and see a forged or replayed
claim token refused by the coordinator.

Skipped without node and npm (failed under CI, where they are part of the image).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd import Etcd
from services.client import MeshClient
from services.cluster import LocalCluster

pytestmark = pytest.mark.integration

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
CLI = NODE_DIR / "agentmesh.js"
S = tpb.TaskState
TERMINAL = {S.TASK_STATE_SUCCEEDED, S.TASK_STATE_CANCELLED, S.TASK_STATE_DEAD_LETTER}
# Bounds that only catch a hang: each awaited step normally takes milliseconds to a second.
HANG_S = 30.0
# Under the first test's 120 s limit; setup.sh has normally installed the modules already.
NPM_CI_TIMEOUT_S = 90
# Only these coordinator kinds exist in the agent test; the Python pool runs `noop` only,
# so `upper`, `echo` and `sleep` tasks can succeed only on the Node agent.
AGENT_ENV = {
    "AGENTMESH_KINDS": "noop",
    "AGENTMESH_TASK_KINDS": "echo,sleep,noop,llm,fail,upper",
}


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {message}", pytrace=False)
    pytest.skip(message)


def _modules_match_lock() -> bool:
    """Whether clients/node/node_modules holds exactly the versions package-lock.json pins."""
    lock = json.loads((NODE_DIR / "package-lock.json").read_text())
    for path, entry in lock.get("packages", {}).items():
        if not path.startswith("node_modules/") or entry.get("optional"):
            continue
        try:
            installed = json.loads((NODE_DIR / path / "package.json").read_text())
        except (OSError, ValueError):
            return False
        if installed.get("version") != entry.get("version"):
            return False
    return True


def _ensure_modules(npm: str) -> None:
    """`npm ci` in clients/node unless the locked modules are there already (setup.sh
    installs them). A file lock keeps parallel test runs from installing at once."""
    if _modules_match_lock():
        return
    # one lock per checkout, the same in every process (str hashes are salted per process)
    digest = hashlib.sha1(str(NODE_DIR).encode()).hexdigest()[:12]
    lock_path = Path(tempfile.gettempdir()) / f"agentmesh-npm-ci-{digest}.lock"
    with open(lock_path, "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        if _modules_match_lock():
            return
        try:
            proc = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_CI_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            _missing(f"`npm ci` in {NODE_DIR} took over {NPM_CI_TIMEOUT_S} s")
            return
        if proc.returncode != 0:
            _missing(
                f"`npm ci` in {NODE_DIR} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
            )


@dataclass(frozen=True)
class NodeCli:
    node: str

    def argv(self, *args: str) -> list[str]:
        return [self.node, str(CLI), *args]


def _env() -> dict[str, str]:
    # the test passes every endpoint as a flag; nothing may leak in from the caller's shell
    return {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}


@pytest.fixture(scope="module")
def node_cli() -> NodeCli:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        _missing("node and npm are not installed (bash scripts/setup.sh system installs them)")
    assert node
    assert npm
    _ensure_modules(npm)
    return NodeCli(node)


async def run_node(
    cli: NodeCli, *args: str, timeout_s: float = HANG_S
) -> tuple[int, list[dict[str, Any]], str]:
    """Run one client command with --json; returns (exit code, JSON events, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *cli.argv(*args, "--json"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    assert proc.returncode is not None
    return proc.returncode, events, err.decode()


async def roles(c: LocalCluster) -> tuple[str, str]:
    """(leader endpoint, a standby's endpoint)."""
    async with MeshClient(etcd=c.etcd_endpoint, timeout_s=3.0) as client:
        leader = (await client.status()).leader_endpoint
    standbys = [e for e in c.coordinator_endpoints if e != leader]
    assert leader in c.coordinator_endpoints, (leader, c.coordinator_endpoints)
    assert len(standbys) == 1, standbys
    return leader, standbys[0]


async def until(check: Callable[[], Any], what: str, timeout_s: float = HANG_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.05)


def test_node_unit_tests(node_cli: NodeCli) -> None:
    """The Node client's own unit tests (retry rules, leader following, ack bookkeeping)."""
    files = sorted(str(p) for p in (NODE_DIR / "test").glob("*.test.js"))
    assert files
    proc = subprocess.run(
        [node_cli.node, "--test", *files],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.timeout(120)
async def test_node_client_follows_the_leader_submits_and_watches(
    cluster: Any, node_cli: NodeCli
) -> None:
    c: LocalCluster = await cluster(agents=2, pools=1, coordinators=2)
    leader, standby = await roles(c)
    at_standby = ["--coordinator", standby]

    # a batch of 20, submitted at the standby: the client must end up at the leader
    text = "héllo from node ✓"
    echoes = ["submit", *at_standby, "--kind", "echo", "--payload", text, "--wait"]
    code, events, err = await run_node(node_cli, *echoes, "--count", "20")
    assert code == 0, (events, err)
    submitted = [e for e in events if e["event"] == "submitted"]
    finished = [e["task"] for e in events if e["event"] == "finished"]
    (summary,) = [e for e in events if e["event"] == "summary"]
    assert len(submitted) == 20, events
    assert all(e["created"] for e in submitted), events
    assert len(finished) == 20, events
    assert {t["task_id"] for t in finished} == {e["task"]["task_id"] for e in submitted}
    for task in finished:
        assert task["state"] == "SUCCEEDED", task
        assert task["result"]["text"] == text, task
    assert summary["endpoint"] == leader, summary
    assert summary["redirects"] >= 1, summary
    assert summary["states"] == {"SUCCEEDED": 20}, summary

    # 30 more as messages of one SubmitStream call, also at the standby; then the same
    # ids again, which the stream answers as replays
    for round_ in ("new", "replay"):
        code, events, err = await run_node(
            node_cli, *echoes, "--count", "30", "--task-id", "node-stream", "--stream"
        )
        assert code == 0, (round_, events, err)
        submitted = [e for e in events if e["event"] == "submitted"]
        (summary,) = [e for e in events if e["event"] == "summary"]
        assert [e["task"]["task_id"] for e in submitted] == [f"node-stream-{i}" for i in range(30)]
        assert all(e["created"] is (round_ == "new") for e in submitted), (round_, events)
        assert summary["states"] == {"SUCCEEDED": 30}, summary
        assert summary["endpoint"] == leader, summary
        assert summary["redirects"] >= 1, summary

    # one task through Submit with a payload that is not UTF-8, then WatchTask and GetTask
    raw = bytes([0, 0xFF, 0xFE, 0x80]) + "ü".encode()
    b64 = "AP/+gMO8"
    code, events, err = await run_node(
        node_cli,
        "submit",
        *at_standby,
        "--kind",
        "echo",
        "--payload-base64",
        b64,
        "--task-id",
        "node-single",
    )
    assert code == 0, (events, err)
    assert events[0]["task"]["task_id"] == "node-single", events
    assert events[0]["created"], events

    code, events, err = await run_node(node_cli, "watch", "node-single", *at_standby)
    assert code == 0, (events, err)
    (final,) = [e["task"] for e in events if e["event"] == "finished"]
    assert final["state"] == "SUCCEEDED", final
    assert final["result"]["base64"] == b64, final
    assert "text" not in final["result"], final  # not UTF-8: shown as base64 only

    code, events, err = await run_node(node_cli, "get", "node-single", *at_standby)
    assert code == 0, (events, err)
    assert events[0]["task"]["state"] == "SUCCEEDED", events
    assert events[0]["endpoint"] == leader, events
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        stored = await client.get("node-single")
    assert stored.spec.payload == raw, stored
    assert stored.result == raw, stored

    # resubmitting the same task id is idempotent: the existing task comes back
    code, events, err = await run_node(
        node_cli,
        "submit",
        *at_standby,
        "--kind",
        "echo",
        "--payload",
        "other",
        "--task-id",
        "node-single",
    )
    assert code == 0, (events, err)
    assert events[0]["created"] is False, events
    assert events[0]["task"]["payload"]["base64"] == b64, events

    code, events, err = await run_node(
        node_cli, "list", *at_standby, "--kind", "echo", "--limit", "1000"
    )
    assert code == 0, (events, err)
    listed = [e["task"] for e in events if e["event"] == "task"]
    assert len(listed) == 20 + 30 + 1, listed  # the batch, the stream, the single one
    assert all(t["state"] == "SUCCEEDED" for t in listed), listed

    # an error that retrying cannot fix comes back at once, with its code
    code, events, err = await run_node(node_cli, "get", "no-such-task", *at_standby)
    assert code == 1, (events, err)
    assert "NOT_FOUND" in err, err
    assert "    at " not in err, err  # a message, not a JS stack trace


STREAMED = 6000
# a SubmitStream holds at most this many requests read but unanswered (limits.py): only
# those can have an unknown outcome when the leader dies, and come back as replays
STREAM_PENDING = 1000


@pytest.mark.timeout(150)
async def test_node_stream_through_a_killed_leader_loses_and_doubles_nothing(
    cluster: Any, node_cli: NodeCli
) -> None:
    """SIGKILL the leader while one `submit --stream` call is sending 6,000 tasks: the
    client sends what was unanswered again on a new stream to the next leader. Every
    task ends up in etcd once and runs to SUCCEEDED, and every answer reaches stdout
    (about 2 MB of JSON through a pipe)."""
    c: LocalCluster = await cluster(agents=4, pools=1, coordinators=2)
    leader, standby = await roles(c)
    leader_name = f"coordinator-{c.coordinator_endpoints.index(leader) + 1}"
    args = ["submit", "--coordinator", standby, "--kind", "noop", "--stream"]
    args += ["--count", str(STREAMED), "--task-id", "node-kill"]
    sending = asyncio.ensure_future(run_node(node_cli, *args, timeout_s=60))
    async with etcd_client(c.etcd_endpoint) as etcd:
        prefix = etcd.key("tasks") + b"/"

        async def a_quarter_stored() -> int:
            count = int((await etcd.range(prefix, count_only=True)).count)
            return count if count >= STREAMED // 4 else 0

        try:
            # kill once a quarter is in etcd: the stream has answered some and owes the rest
            written = await until(a_quarter_stored, "a quarter of the tasks in etcd")
            assert written < STREAMED, "the stream ended before the kill; make it longer"
            c.kill(leader_name, signal.SIGKILL)
            code, events, err = await sending
        finally:
            if not sending.done():
                sending.cancel()
        assert code == 0, (events[-3:], err[-2000:])
        summary = events[-1] if events else {}
        assert summary.get("event") == "summary", f"stdout ended early: {len(events)} lines"
        submitted = [e for e in events if e["event"] == "submitted"]
        ids = [f"node-kill-{i}" for i in range(STREAMED)]
        assert [e["task"]["task_id"] for e in submitted] == ids
        assert summary["stream_retries"] >= 1, (summary, err[-2000:])
        assert "stream interrupted" in err, err[-2000:]
        assert summary["endpoint"] not in (leader, ""), summary
        # a replay (created false) can only be a request whose answer the kill lost
        replays = [e["task"]["task_id"] for e in submitted if not e["created"]]
        assert len(replays) <= STREAM_PENDING, len(replays)

        async def all_succeeded() -> bool:
            states = {
                t.task_id: t.state
                for t in [tpb.Task.FromString(kv.value) async for kv in etcd.scan(prefix)]
            }
            assert sorted(states) == sorted(ids)  # none lost, none extra
            return all(s == S.TASK_STATE_SUCCEEDED for s in states.values())

        await until(all_succeeded, "every streamed task to succeed", timeout_s=60)


class AgentProcess:
    """The Node agent as a subprocess whose JSON events are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.stderr = b""
        self._reader = asyncio.ensure_future(self._read())
        self._err_reader = asyncio.ensure_future(self._read_err())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            if line.strip():
                self.events.append(json.loads(line))

    async def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = await self.proc.stderr.read()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    async def stop(self) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 15)
        finally:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(self._reader, self._err_reader), 5)


@contextlib.asynccontextmanager
async def node_agent(cli: NodeCli, *args: str) -> AsyncIterator[AgentProcess]:
    proc = await asyncio.create_subprocess_exec(
        *cli.argv("agent", "--json", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    agent = AgentProcess(proc)
    try:
        yield agent
    finally:
        await agent.stop()


@contextlib.asynccontextmanager
async def etcd_client(endpoint: str) -> AsyncIterator[Etcd]:
    etcd = Etcd(endpoint, prefix="/agentmesh/default/")
    try:
        yield etcd
    finally:
        await etcd.close()


@pytest.mark.timeout(120)
async def test_node_agent_runs_tasks_reports_with_claims_and_is_fenced(
    cluster: Any, node_cli: NodeCli
) -> None:
    c: LocalCluster = await cluster(agents=1, pools=1, coordinators=2, env=AGENT_ENV)
    leader, standby = await roles(c)
    agent_id = "node-agent-1"
    async with (
        etcd_client(c.etcd_endpoint) as etcd,
        MeshClient(etcd=c.etcd_endpoint) as client,
        node_agent(
            node_cli,
            "--etcd",
            c.etcd_endpoint,
            "--coordinator",
            standby,
            "--agent-id",
            agent_id,
            "--kinds",
            "echo,upper,sleep",
            "--capacity",
            "4",
            "--probe-fencing",
        ) as agent,
    ):

        async def connected() -> bool:
            return any(a.agent_id == agent_id for a in (await client.agents()).agents)

        await until(connected, "the Node agent to connect to the leader")

        async def welcomed() -> bool:  # the leader lists it at its hello, before the welcome
            return bool(agent.of("welcome"))

        await until(welcomed, "the Node agent to print its welcome")
        # pointed at the standby, it was redirected and welcomed by the leader
        assert agent.of("redirect")[0]["leader_endpoint"] == leader, agent.events
        assert agent.of("welcome")[-1]["endpoint"] == leader, agent.events
        (lease,) = {int(e["lease_id"]) for e in agent.of("lease")}
        registered = await etcd.get(etcd.key("agents", agent_id))
        assert registered is not None
        assert int(registered.lease) == lease, registered
        assert await etcd.ttl(lease) > 0

        # tasks only the Node agent can run: `upper` has no Python executor at all, and the
        # pool here runs `noop` only, so `echo` can succeed only on the Node agent as well
        payloads = {f"node-upper-{i}": f"task {i}: grüße" for i in range(10)}
        specs = [
            tpb.TaskSpec(task_id=i, kind="upper", payload=p.encode()) for i, p in payloads.items()
        ]
        binary = bytes(range(256))
        specs.append(tpb.TaskSpec(task_id="node-echo-bin", kind="echo", payload=binary))
        resp = await client.submit_batch(specs)
        assert all(r.created for r in resp.results)

        async def all_terminal() -> dict[str, tpb.Task] | None:
            tasks = {s.task_id: await client.get(s.task_id) for s in specs}
            return tasks if all(t.state in TERMINAL for t in tasks.values()) else None

        tasks = await until(all_terminal, "the Node agent's tasks to finish")
        for task_id, payload in payloads.items():
            t = tasks[task_id]
            assert t.state == S.TASK_STATE_SUCCEEDED, t
            assert t.result == payload.upper().encode(), t  # the Node agent's output, not b"FORGED"
            assert t.agent_id == agent_id, t
            assert t.attempts == 1, t
        bin_task = tasks["node-echo-bin"]
        assert (bin_task.state, bin_task.result, bin_task.agent_id) == (
            S.TASK_STATE_SUCCEEDED,
            binary,
            agent_id,
        ), bin_task

        # every accepted result carried the claim token the task was assigned with (an
        # accepted ack may come up to ACK_RIDE_S after its task finished: it waits for a ride)
        def acked() -> bool:
            return {e["task_id"] for e in agent.of("ack") if e["accepted"]} >= set(tasks)

        await until(acked, "the acks of every result")
        assigned = {e["task_id"]: e["claim_token"] for e in agent.of("assign")}
        accepted = {e["task_id"]: e["claim_token"] for e in agent.of("ack") if e["accepted"]}
        for task_id, task in tasks.items():
            assert accepted[task_id] == assigned[task_id] == str(task.claim_token), task_id

        # fencing: a result with a forged token, and the real one replayed after it counted,
        # are both refused (and neither changed the stored result, checked above)
        await until(lambda: len(agent.of("fencing")) >= 2 * len(specs), "the fencing probes' acks")
        forged = [e for e in agent.of("fencing") if e["probe"] == "forged"]
        replayed = [e for e in agent.of("fencing") if e["probe"] == "replay"]
        assert {e["task_id"] for e in forged} == {e["task_id"] for e in replayed} == set(tasks)
        for e in forged + replayed:
            assert e["accepted"] is False, e
            assert e["reason"], e

        # a cancel reaches the Node agent, which stops the work and reports nothing
        await client.submit(
            tpb.TaskSpec(task_id="node-long", kind="sleep", payload=b'{"ms": 60000}')
        )
        await until(
            lambda: any(e["task_id"] == "node-long" for e in agent.of("assign")),
            "node-long assigned",
        )
        cancelled = await client.cancel("node-long", "test cancels")
        assert cancelled.state == S.TASK_STATE_CANCELLED, cancelled
        await until(
            lambda: any(e["task_id"] == "node-long" for e in agent.of("cancel")),
            "the cancel to reach the agent",
        )
        assert not any(e["task_id"] == "node-long" for e in agent.of("report")), agent.events

        code = await agent.stop()
        assert code == 0, agent.stderr.decode()[-2000:]
        assert agent.of("stopped"), agent.events

        # a clean stop leaves the stream and revokes the lease (so its registration goes too)
        async def gone() -> bool:
            return not any(a.agent_id == agent_id for a in (await client.agents()).agents)

        await until(gone, "the Node agent to leave the leader")
        assert await etcd.ttl(lease) == -1
        assert await etcd.get(etcd.key("agents", agent_id)) is None


@pytest.mark.timeout(120)
async def test_node_submit_wait_leaves_watchers_for_the_dashboards(
    cluster: Any, node_cli: NodeCli
) -> None:
    """`submit --wait` once opened 64 WatchTask streams, the coordinator's whole watcher
    budget: with a dashboard or `agentmesh status` connected it died on RESOURCE_EXHAUSTED."""
    c: LocalCluster = await cluster(agents=2, pools=1, coordinators=1)
    async with contextlib.AsyncExitStack() as stack:
        # eight live views of the cluster, each holding a WatchEvents stream as they do
        viewers = [
            await stack.enter_async_context(MeshClient(etcd=c.etcd_endpoint)) for _ in range(8)
        ]
        streams = [v.watch_events() for v in viewers]
        reads = [asyncio.ensure_future(anext(s)) for s in streams]
        stack.push_async_callback(_cancel_all, reads, streams)
        code, events, err = await run_node(
            node_cli,
            "submit",
            *("--etcd", c.etcd_endpoint, "--kind", "sleep", "--payload", '{"ms": 100}'),
            *("--count", "70", "--wait"),
            timeout_s=90,
        )
        assert code == 0, (err[-2000:], events[-3:])
        (summary,) = [e for e in events if e["event"] == "summary"]
        assert summary["states"] == {"SUCCEEDED": 70}, summary
        # the viewers' streams kept going (each saw a task's event, none was refused)
        assert all(r.done() and r.exception() is None for r in reads), reads


async def _cancel_all(reads: list[asyncio.Future[Any]], streams: list[Any]) -> None:
    for read in reads:
        read.cancel()
    await asyncio.gather(*reads, return_exceptions=True)
    for stream in streams:
        await stream.aclose()
