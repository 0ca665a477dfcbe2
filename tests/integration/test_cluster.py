"""A whole cluster as real processes (etcd, coordinator, agent pools): what users rely on.

Every task acknowledged by Submit reaches exactly one terminal state, whatever is
killed along the way; a result is accepted only with the current claim token; the
operator tools (grpcurl, the `agentmesh` CLI) work against a running cluster.

Figures printed here (run with -s to see them) are observations, not assertions:
timing targets are measured by the load-test harness.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import coordinator_pb2_grpc as cpb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry.etcd import Etcd
from registry.etcd_server import free_port
from services.client import MeshClient
from services.cluster import LocalCluster

pytestmark = pytest.mark.integration

# kind llm: no pool agent in these tests runs it; its payload is checked at submit
LLM_PAYLOAD = b'{"prompt": "hello"}'

S = tpb.TaskState
QUEUED, ASSIGNED, RUNNING = S.TASK_STATE_QUEUED, S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING
SUCCEEDED, CANCELLED, DEAD_LETTER = (
    S.TASK_STATE_SUCCEEDED,
    S.TASK_STATE_CANCELLED,
    S.TASK_STATE_DEAD_LETTER,
)
TERMINAL = {SUCCEEDED, CANCELLED, DEAD_LETTER}
HELD = {ASSIGNED, RUNNING}

# Bounds that only catch a hang; the awaited things normally take milliseconds to seconds.
HANG_S = 30.0
# After the last expected event: how long a duplicate completion is given to show up.
SETTLE_S = 0.5

VENV_BIN = Path(sys.executable).parent
GRPCURL = VENV_BIN / "grpcurl"


def state_name(state: int) -> str:
    return S.Name(state).removeprefix("TASK_STATE_")


def sleep_specs(prefix: str, count: int, ms: int) -> list[tpb.TaskSpec]:
    payload = json.dumps({"ms": ms}).encode()
    return [
        tpb.TaskSpec(task_id=f"{prefix}-{i:04d}", kind="sleep", payload=payload)
        for i in range(count)
    ]


async def submit_all(client: MeshClient, specs: list[tpb.TaskSpec], batch: int = 250) -> None:
    """Submit in batches; every spec must be acknowledged as a new task."""
    for i in range(0, len(specs), batch):
        resp = await client.submit_batch(specs[i : i + batch])
        assert all(r.created for r in resp.results), "a fresh task id was reported as existing"


async def list_all(client: MeshClient, prefix: str = "") -> dict[str, tpb.Task]:
    """Every task (whose id starts with `prefix`), through ListTasks paging."""
    out: dict[str, tpb.Task] = {}
    seen: set[str] = set()
    token = ""
    for _ in range(1000):
        resp = await client.list(page_size=1000, page_token=token)
        for task in resp.tasks:
            assert task.task_id not in seen, f"ListTasks returned {task.task_id} twice"
            seen.add(task.task_id)
            if task.task_id.startswith(prefix):
                out[task.task_id] = task
        token = resp.next_page_token
        if not token:
            return out
    raise AssertionError("ListTasks paging did not end")


async def wait_all_terminal(
    client: MeshClient, ids: Iterable[str], timeout_s: float, prefix: str = ""
) -> dict[str, tpb.Task]:
    """Poll ListTasks until every id is terminal; returns their records."""
    want = set(ids)
    deadline = time.monotonic() + timeout_s
    while True:
        tasks = await list_all(client, prefix)
        pending = {i for i in want if i not in tasks or tasks[i].state not in TERMINAL}
        if not pending:
            return {i: tasks[i] for i in want}
        if time.monotonic() > deadline:
            sample = sorted(pending)[:5]
            states = {i: state_name(tasks[i].state) if i in tasks else "MISSING" for i in sample}
            raise AssertionError(
                f"{len(pending)} tasks not terminal after {timeout_s}s, e.g. {states}"
            )
        await asyncio.sleep(0.2)


class EventRecorder:
    """A WatchEvents stream read in the background, each event stamped on arrival.

    A raw stream, not MeshClient.watch_events: that one reconnects by itself and
    could miss events in between, which would hide a doubled completion.
    """

    def __init__(self, call: Any) -> None:
        self.call = call
        self.events: list[tuple[float, tpb.TaskEvent]] = []
        self.succeeded: collections.Counter[str] = collections.Counter()
        self.error: BaseException | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def open(cls, client: MeshClient) -> EventRecorder:
        """Open the stream and return once the server has subscribed it: a probe task's
        completion must come through, so no later change can slip by unseen."""
        stub = await client.stub()
        recorder = cls(stub.WatchEvents(cpb.WatchEventsRequest()))
        deadline = time.monotonic() + HANG_S
        while True:
            # a fresh probe each time: one finished before the subscription is never seen
            probe = f"probe-{uuid.uuid4().hex[:12]}"
            await client.submit(tpb.TaskSpec(task_id=probe, kind="noop"))
            try:
                await recorder.until(lambda p=probe: recorder.succeeded[p] > 0, 1.0)
                return recorder
            except TimeoutError:
                if time.monotonic() > deadline:
                    await recorder.close()
                    raise

    async def _read(self) -> None:
        try:
            async for event in self.call:
                self.events.append((time.monotonic(), event))
                if event.task.state == SUCCEEDED:
                    self.succeeded[event.task.task_id] += 1
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # noqa: BLE001 - reported by until()
            self.error = err
            self._changed.set()

    async def until(self, done: Callable[[], bool], timeout_s: float) -> None:
        """Wait until `done()`; TimeoutError after `timeout_s`, AssertionError if the stream broke."""
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.error is not None:
                raise AssertionError(f"the WatchEvents stream broke: {self.error!r}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"not done after {timeout_s}s ({len(self.events)} events seen)")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)


async def run_command(
    *argv: str | Path, env: dict[str, str] | None = None, timeout_s: float = 60
) -> tuple[int, str, str]:
    """Run a command; (exit code, stdout, stderr). Kills it if it outlives `timeout_s`."""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=full_env,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(
            f"{' '.join(map(str, argv))} did not finish within {timeout_s}s"
        ) from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def agentmesh_cmd() -> list[str]:
    script = VENV_BIN / "agentmesh"
    return [str(script)] if script.exists() else [sys.executable, "-m", "services.cli"]


# ---------------------------------------------------------------- throughput, exactly once


@pytest.mark.timeout(180)
async def test_1000_tasks_over_50_agents_each_succeed_exactly_once(cluster: Any) -> None:
    c: LocalCluster = await cluster(agents=50, pools=2)
    specs = sleep_specs("bulk", 1000, ms=5)
    ids = {s.task_id for s in specs}
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        events = await EventRecorder.open(client)
        try:
            t0 = time.monotonic()
            await submit_all(client, specs)
            await events.until(lambda: all(events.succeeded[i] for i in ids), 120)
            wall = time.monotonic() - t0
            await asyncio.sleep(SETTLE_S)  # let a (wrong) second completion arrive
            print(
                f"\n1,000 sleep(5 ms) tasks over 50 agents: {wall:.2f} s from first submit to last SUCCEEDED event"
            )

            doubled = {i: n for i, n in events.succeeded.items() if i in ids and n != 1}
            assert not doubled, (
                f"tasks with more than one SUCCEEDED event: {dict(list(doubled.items())[:10])}"
            )
            tasks = await list_all(client, "bulk-")
            assert set(tasks) == ids
            wrong = {
                i: (state_name(t.state), t.attempts)
                for i, t in tasks.items()
                if t.state != SUCCEEDED or t.attempts != 1
            }
            assert not wrong, (
                f"not SUCCEEDED on the first attempt: {dict(list(wrong.items())[:10])}"
            )
            # the output is the executor's, which says its work was simulated
            sample = await client.get("bulk-0007")
            assert json.loads(sample.result) == {"simulated": True, "slept_ms": 5.0}
            pools = {t.agent_id.rsplit("-a", 1)[0] for t in tasks.values()}
            assert pools == {"pool-1", "pool-2"}, "both pools should have taken work"
            assert all(
                t.finished_at_us >= t.assigned_at_us >= t.created_at_us > 0 for t in tasks.values()
            )
        finally:
            await events.close()


# ---------------------------------------------------------------- an agent pool killed


@pytest.mark.timeout(180)
async def test_agent_pool_killed_midrun_loses_no_task(cluster: Any) -> None:
    c: LocalCluster = await cluster(agents=40, pools=2)
    specs = sleep_specs("kill", 600, ms=100)
    ids = {s.task_id for s in specs}
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        events = await EventRecorder.open(client)
        try:
            await submit_all(client, specs)
            await events.until(lambda: sum(events.succeeded[i] > 0 for i in ids) >= 100, 60)
            killed_at = time.monotonic()
            c.kill("pool-1", signal.SIGKILL)
            await events.until(lambda: all(events.succeeded[i] for i in ids), 120)
            await asyncio.sleep(SETTLE_S)

            doubled = {i: n for i, n in events.succeeded.items() if i in ids and n != 1}
            assert not doubled, f"tasks completed twice: {dict(list(doubled.items())[:10])}"
            tasks = await list_all(client, "kill-")
            assert set(tasks) == ids
            not_ok = {i: state_name(t.state) for i, t in tasks.items() if t.state != SUCCEEDED}
            assert not not_ok, f"tasks lost with the pool: {dict(list(not_ok.items())[:10])}"

            # The killed pool's tasks: requeued after the kill while held by one of its agents.
            requeued: dict[str, float] = {}
            given_back: set[str] = set()  # requeued with its attempt handed back
            reassigned: dict[str, float] = {}
            for at, ev in events.events:
                t = ev.task
                if at < killed_at or t.task_id not in ids:
                    continue
                if (
                    t.state == QUEUED
                    and ev.previous_state in HELD
                    and t.agent_id.startswith("pool-1-")
                ):
                    requeued.setdefault(t.task_id, at)
                    if t.attempts == 0:
                        # its assignment committed after the agent had gone, so it never
                        # reached an agent: the coordinator does not count that attempt
                        given_back.add(t.task_id)
                elif t.state in HELD and t.task_id in requeued:
                    # HELD, not ASSIGNED: see test_watch_events_report_each_transition_as_it_happened
                    reassigned.setdefault(t.task_id, at)
            retried = {i for i, t in tasks.items() if t.attempts == 2}
            assert requeued, "the killed pool held no task: kill it earlier or give it more work"
            assert set(requeued) - given_back <= retried, (
                f"requeued after running on pool-1 but not counted: "
                f"{sorted(set(requeued) - given_back - retried)[:10]}"
            )
            assert all(t.attempts <= 2 for t in tasks.values())
            survivors = {i: tasks[i].agent_id for i in retried}
            assert all(a.startswith("pool-2-") for a in survivors.values()), (
                f"retries not run by survivors: {survivors}"
            )
            assert set(reassigned) == set(requeued)
            print(
                f"\npool-1 killed holding {len(requeued)} tasks: last one requeued "
                f"{max(requeued.values()) - killed_at:.3f} s after the kill, last one re-assigned to a "
                f"survivor {max(reassigned.values()) - killed_at:.3f} s after it "
                f"({len(retried)} tasks took 2 attempts)"
            )
            agents = await client.agents()
            assert agents.agents
            assert all(a.pool_id == "pool-2" for a in agents.agents), (
                "dead pool's agents still listed"
            )
        finally:
            await events.close()


# ---------------------------------------------------------------- claim tokens


class HandAgent:
    """A hand-written agent on a raw Connect stream, to say what the pool's agents never would.

    It advertises only kind `llm`, which no pool agent runs, so every `llm` task
    submitted goes to a hand-written agent. Use as `async with`: the stream is open
    and welcomed inside.
    """

    def __init__(
        self, endpoint: str, agent_id: str, lease_id: int, held: Iterable[tuple[str, int]] = ()
    ) -> None:
        self.hello = cpb.AgentHello(
            agent_id=agent_id,
            pool_id="hand",
            lease_id=lease_id,
            kinds=["llm"],
            capacity=1,
            held_claims=[cpb.ClaimRef(task_id=t, claim_token=n) for t, n in held],
        )
        self.channel = grpc.aio.insecure_channel(endpoint)
        self.call = cpb_grpc.CoordinatorStub(self.channel).Connect()
        # Read in the background: a read cancelled by a timeout would cancel the whole call.
        self.inbox: asyncio.Queue[cpb.CoordinatorMessage | None] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.call:
                self.inbox.put_nowait(msg)
        finally:
            self.inbox.put_nowait(None)

    async def __aenter__(self) -> HandAgent:
        await self.send(hello=self.hello)
        welcome = await self.expect("welcome")
        assert welcome.term > 0
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.call.cancel()
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()

    async def send(self, **body: Any) -> None:
        await self.call.write(cpb.AgentMessage(**body))

    async def report(self, task_id: str, token: int, output: bytes) -> cpb.ReportAck:
        await self.send(result=cpb.TaskResult(task_id=task_id, claim_token=token, output=output))
        ack: cpb.ReportAck = await self.expect("ack")
        assert (ack.task_id, ack.claim_token) == (task_id, token)
        return ack

    async def expect(self, body: str, timeout_s: float = 10.0) -> Any:
        """The next message, which must be of kind `body`."""
        msg = await asyncio.wait_for(self.inbox.get(), timeout_s)
        assert msg is not None, f"the coordinator closed the stream: {self.call.code()}"
        assert msg.WhichOneof("body") == body, f"expected {body}, got {msg}"
        return getattr(msg, body)

    async def quiet(self, for_s: float) -> None:
        """Nothing arrives for `for_s` seconds."""
        try:
            msg = await asyncio.wait_for(self.inbox.get(), for_s)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message: {msg}")


@contextlib.asynccontextmanager
async def agent_lease(c: LocalCluster) -> AsyncIterator[int]:
    """A live etcd lease for hand-written agents (hello needs one), revoked afterwards."""
    etcd = Etcd(c.etcd_endpoint, prefix="/agentmesh/default/")
    lease = await etcd.grant(60)  # outlives the test
    try:
        yield lease
    finally:
        with contextlib.suppress(Exception):
            await etcd.revoke(lease)
        await etcd.close()


async def held_state(client: MeshClient, task_id: str) -> tpb.Task:
    task = await client.get(task_id)
    assert task.state in HELD, f"{task_id} should still be held, is {state_name(task.state)}"
    assert task.result == b""
    return task


@pytest.mark.timeout(90)
async def test_forged_and_stale_claim_tokens_are_refused(cluster: Any) -> None:
    c: LocalCluster = await cluster(agents=2, pools=1)
    async with MeshClient(etcd=c.etcd_endpoint) as client, agent_lease(c) as lease:
        leader = (await client.status()).leader_endpoint
        async with HandAgent(leader, "hand-1", lease) as agent:
            await client.submit(tpb.TaskSpec(task_id="claimed-1", kind="llm", payload=LLM_PAYLOAD))
            task = (await agent.expect("assign")).task
            assert (task.task_id, task.agent_id, task.attempts) == ("claimed-1", "hand-1", 1)
            token = task.claim_token
            assert token > 0
            await agent.send(accepted=cpb.TaskAccepted(task_id="claimed-1", claim_token=token))

            ack = await agent.report("claimed-1", token + 1, b"forged")
            assert not ack.accepted
            assert "claim token" in ack.reason
            await held_state(client, "claimed-1")

            # the right token from an agent that does not hold the claim
            async with HandAgent(leader, "hand-2", lease) as other:
                ack = await other.report("claimed-1", token, b"foreign")
                assert not ack.accepted
            await held_state(client, "claimed-1")

            ack = await agent.report("claimed-1", token, b"real")
            assert ack.accepted, ack.reason
            done = await client.get("claimed-1")
            assert (state_name(done.state), done.result, done.attempts) == ("SUCCEEDED", b"real", 1)

            # the same (once valid) token again: a late duplicate must not complete it twice
            ack = await agent.report("claimed-1", token, b"again")
            assert not ack.accepted
            await agent.send(
                failure=cpb.TaskFailure(task_id="claimed-1", claim_token=token, error="late")
            )
            assert not (await agent.expect("ack")).accepted
            final = await client.get("claimed-1")
            assert (state_name(final.state), final.result, final.attempts) == (
                "SUCCEEDED",
                b"real",
                1,
            )


@pytest.mark.timeout(90)
async def test_result_of_a_reassigned_attempt_is_refused(cluster: Any) -> None:
    """An agent that lost its stream comes back with the result of an attempt that was
    meanwhile given to another agent: its token is stale and the task stays with the other."""
    c: LocalCluster = await cluster(agents=2, pools=1)
    async with MeshClient(etcd=c.etcd_endpoint) as client, agent_lease(c) as lease:
        leader = (await client.status()).leader_endpoint
        async with HandAgent(leader, "hand-1", lease) as first:
            await client.submit(tpb.TaskSpec(task_id="moved-1", kind="llm", payload=LLM_PAYLOAD))
            old = (await first.expect("assign")).task
        # hand-1's stream dropped: its claim is released at once, without waiting for a lease
        async with HandAgent(leader, "hand-2", lease) as second:
            new = (await second.expect("assign")).task
            assert (new.task_id, new.attempts) == ("moved-1", 2)
            assert new.claim_token > old.claim_token
            async with HandAgent(
                leader, "hand-1", lease, held=[("moved-1", old.claim_token)]
            ) as back:
                # the coordinator tells it the claim it still holds is void ...
                assert (await back.expect("cancel")).task_id == "moved-1"
                # ... and refuses its result
                ack = await back.report("moved-1", old.claim_token, b"stale")
                assert not ack.accepted
                held = await held_state(client, "moved-1")
                assert (held.agent_id, held.claim_token) == ("hand-2", new.claim_token)
            ack = await second.report("moved-1", new.claim_token, b"fresh")
            assert ack.accepted, ack.reason
        done = await client.get("moved-1")
        assert (state_name(done.state), done.result, done.agent_id) == (
            "SUCCEEDED",
            b"fresh",
            "hand-2",
        )


# Regression: CoordinatorCore.report() once freed the agent's slot before checking the
# claim token, so a refused report dropped a task the agent still held (over capacity
# afterwards, and not requeued when its stream dropped).


@pytest.mark.timeout(90)
async def test_refused_report_does_not_free_the_agents_slot(cluster: Any) -> None:
    """A capacity-1 agent that sent a refused report still runs its task: it must get
    nothing more until its real result is in."""
    c: LocalCluster = await cluster(agents=2, pools=1)
    async with MeshClient(etcd=c.etcd_endpoint) as client, agent_lease(c) as lease:
        leader = (await client.status()).leader_endpoint
        async with HandAgent(leader, "hand-1", lease) as agent:
            await client.submit_batch(
                [tpb.TaskSpec(task_id=f"busy-{n}", kind="llm", payload=LLM_PAYLOAD) for n in (1, 2)]
            )
            first = (await agent.expect("assign")).task
            await agent.quiet(0.5)  # capacity 1: the second one waits
            ack = await agent.report(first.task_id, first.claim_token + 1, b"forged")
            assert not ack.accepted
            await agent.quiet(1.0)  # still busy: no second assignment


@pytest.mark.timeout(90)
async def test_dropped_stream_requeues_a_task_after_a_refused_report(cluster: Any) -> None:
    """A dropped stream releases the agent's claims at once (DESIGN.md), also the claim of a
    task it had sent a refused report for; not only when its lease expires much later."""
    c: LocalCluster = await cluster(agents=2, pools=1)
    async with MeshClient(etcd=c.etcd_endpoint) as client, agent_lease(c) as lease:
        leader = (await client.status()).leader_endpoint
        async with HandAgent(leader, "hand-1", lease) as agent:
            await client.submit(tpb.TaskSpec(task_id="dropped-1", kind="llm", payload=LLM_PAYLOAD))
            task = (await agent.expect("assign")).task
            assert not (await agent.report(task.task_id, task.claim_token + 1, b"forged")).accepted
        # the stream is gone; the lease (60 s) lives on, as a pool process's would
        deadline = time.monotonic() + 5
        while (now := await client.get("dropped-1")).state in HELD and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert now.state == QUEUED, (
            f"still {state_name(now.state)} by {now.agent_id} 5 s after its agent left"
        )


# Both watch tests below make the watcher lag for certain: the client reads nothing while a
# task event of about 500 KB (the full view) waits for HTTP/2 flow control (a 64 KiB stream
# window, with the window auto-tuning off), so the coordinator's writer stays blocked on it.
# an llm payload (checked at submit) of nearly the 512 KiB limit
BIG_PAYLOAD = b'{"prompt": "' + b"x" * 500_000 + b'"}'
SLOW_READER = [("grpc.http2.bdp_probe", 0)]


async def read_until_probe(client: MeshClient, call: Any) -> None:
    """Read a WatchEvents stream until a fresh probe task's completion comes through: from
    then on the stream is subscribed. The pending read is never cancelled (that would end
    the call): a read that waits too long is awaited again after the next probe."""
    probes: set[str] = set()
    pending: asyncio.Future[Any] | None = None
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        probe = f"probe-{uuid.uuid4().hex[:12]}"
        probes.add(probe)
        await client.submit(tpb.TaskSpec(task_id=probe, kind="noop"))
        round_end = time.monotonic() + 1.0
        while (left := round_end - time.monotonic()) > 0:
            pending = pending or asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({pending}, timeout=left)
            if not done:
                break
            event, pending = pending.result(), None
            assert event is not grpc.aio.EOF, "the WatchEvents stream ended"
            if event.task.task_id in probes and event.task.state == SUCCEEDED:
                return
    raise AssertionError(f"no probe came through the WatchEvents stream in {HANG_S}s")


EVENT_SNAPSHOT_BUG = (
    "bug: CoordinatorCore.accepted() (services/coordinator/core.py) sets state RUNNING on the "
    "Task object it already published as the ASSIGNED event; watchers serialize events late "
    "(services/coordinator/servicer.py _events), so a lagging watcher sees QUEUED -> RUNNING"
)


@pytest.mark.timeout(90)
async def test_watch_events_report_each_transition_as_it_happened(cluster: Any) -> None:
    """A watcher that lags behind (a busy dashboard, the load test under a burst) still sees
    the assignment as ASSIGNED, then RUNNING: an event is the task as it was at that change."""
    c: LocalCluster = await cluster(agents=2, pools=1)
    async with MeshClient(etcd=c.etcd_endpoint) as client, agent_lease(c) as lease:
        leader = (await client.status()).leader_endpoint
        async with grpc.aio.insecure_channel(leader, options=SLOW_READER) as channel:
            call = cpb_grpc.CoordinatorStub(channel).WatchEvents(
                cpb.WatchEventsRequest(view=cpb.TASK_VIEW_FULL)
            )
            await read_until_probe(client, call)
            # from here on the watcher reads nothing until the task runs
            await client.submit(tpb.TaskSpec(task_id="lagged-1", kind="llm", payload=BIG_PAYLOAD))
            async with HandAgent(leader, "hand-1", lease) as agent:
                task = (await agent.expect("assign", timeout_s=HANG_S)).task
                assert task.task_id == "lagged-1"
                await agent.send(
                    accepted=cpb.TaskAccepted(task_id="lagged-1", claim_token=task.claim_token)
                )
                deadline = time.monotonic() + HANG_S
                while (await client.get("lagged-1")).state != RUNNING:
                    assert time.monotonic() < deadline, "the accepted message was ignored"
                    await asyncio.sleep(0.05)
                changes: list[tuple[str, str]] = []
                while len(changes) < 3:
                    event = await asyncio.wait_for(call.read(), HANG_S)
                    assert event is not grpc.aio.EOF
                    if event.task.task_id == "lagged-1":
                        changes.append(
                            (state_name(event.previous_state), state_name(event.task.state))
                        )
                call.cancel()
        assert changes == [
            ("UNSPECIFIED", "QUEUED"),
            ("QUEUED", "ASSIGNED"),
            ("ASSIGNED", "RUNNING"),
        ]


WATCH_TASK_SUBSCRIBES_LATE = (
    "bug: CoordinatorServicer.WatchTask (services/coordinator/servicer.py) subscribes only when "
    "it first iterates the lazy _events() generator, after sending the first event; a change in "
    "between is lost, so a watch whose task finished meanwhile never ends"
)


@pytest.mark.timeout(90)
async def test_watch_task_sees_the_end_of_a_task_that_finishes_as_the_watch_starts(
    cluster: Any,
) -> None:
    """WatchTask sends the task now, then every change until it is terminal: a completion
    while the first message is still on its way must not be lost (the watch would hang)."""
    c: LocalCluster = await cluster(agents=2, pools=1)
    async with MeshClient(etcd=c.etcd_endpoint) as client, agent_lease(c) as lease:
        leader = (await client.status()).leader_endpoint
        async with HandAgent(leader, "hand-1", lease) as agent:
            await client.submit(tpb.TaskSpec(task_id="watched-1", kind="llm", payload=BIG_PAYLOAD))
            task = (await agent.expect("assign", timeout_s=HANG_S)).task
            async with grpc.aio.insecure_channel(leader, options=SLOW_READER) as channel:
                call = cpb_grpc.CoordinatorStub(channel).WatchTask(
                    cpb.WatchTaskRequest(task_id="watched-1"), timeout=8
                )
                # the coordinator reads the task and starts sending it; the client does not
                # read yet, so that first message stays in flight
                await asyncio.sleep(1.0)
                ack = await agent.report("watched-1", task.claim_token, b"done")
                assert ack.accepted, ack.reason
                states = []
                with contextlib.suppress(grpc.aio.AioRpcError):
                    async for event in call:
                        states.append(state_name(event.task.state))
        assert states, "WatchTask sent nothing"
        assert states[-1] == "SUCCEEDED", f"the watch saw {states} and then hung until its deadline"


# ---------------------------------------------------------------- etcd outage


@pytest.mark.timeout(200)
async def test_etcd_restart_under_the_coordinator_loses_no_acknowledged_task(cluster: Any) -> None:
    c: LocalCluster = await cluster(agents=10, pools=2)
    specs = sleep_specs("outage", 80, ms=300)
    ids = {s.task_id for s in specs}
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        await submit_all(client, specs)
        deadline = time.monotonic() + HANG_S
        while True:
            before = await list_all(client, "outage-")
            done = sum(t.state == SUCCEEDED for t in before.values())
            if done >= 10 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        in_flight = {i for i, t in before.items() if t.state in HELD}
        queued = {i for i, t in before.items() if t.state == QUEUED}
        assert in_flight, "no task was in flight when etcd stopped"
        assert queued, "no task was queued when etcd stopped"
        leader = (await client.status()).leader_endpoint

    c.etcd.stop()
    stopped_at = time.monotonic()
    async with grpc.aio.insecure_channel(leader) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        # right after the stop (the coordinator still leads) and once its lease has lapsed
        for pause_s, task_id in ((0.0, "during-outage-1"), (3.0, "during-outage-2")):
            await asyncio.sleep(pause_s)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await stub.Submit(
                    cpb.SubmitRequest(spec=tpb.TaskSpec(task_id=task_id, kind="echo")), timeout=20
                )
            took = time.monotonic() - t0
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value
            assert took < 10, f"Submit took {took:.1f}s to fail while etcd was down"
            print(
                f"\nSubmit {pause_s:.0f} s into the etcd outage (leader was {leader}): "
                f"UNAVAILABLE after {took:.3f} s ({failed.value.details()})"
            )
    assert not c.dead(), f"services exited while etcd was down: {c.dead()}"

    c.etcd.start()
    print(f"etcd was down {time.monotonic() - stopped_at:.1f} s")
    restarted_at = time.monotonic()
    async with MeshClient(etcd=c.etcd_endpoint, retry_s=60) as client:
        # the refused submits can be made again (idempotent), and new ones work
        again = [
            tpb.TaskSpec(task_id=f"during-outage-{n}", kind="echo", payload=b"x") for n in (1, 2)
        ]
        after = [
            tpb.TaskSpec(task_id=f"after-outage-{n}", kind="echo", payload=b"y") for n in range(5)
        ]
        await client.submit_batch(again + after)
        first_ok = time.monotonic() - restarted_at
        print(f"submits accepted again {first_ok:.2f} s after etcd came back")
        want = ids | {s.task_id for s in again + after}
        tasks = await wait_all_terminal(client, want, timeout_s=90)
        wrong = {
            i: (state_name(t.state), t.last_error) for i, t in tasks.items() if t.state != SUCCEEDED
        }
        assert not wrong, (
            f"acknowledged tasks that did not succeed: {dict(list(wrong.items())[:10])}"
        )
        retried = sorted(i for i in in_flight if tasks[i].attempts > 1)
        print(
            f"all {len(want)} tasks SUCCEEDED {time.monotonic() - restarted_at:.2f} s after etcd came back; "
            f"{len(in_flight)} were in flight at the stop, {len(retried)} of them ran again"
        )
    assert not c.dead(), f"services exited: {c.dead()}"


STANDBY_NAMES_ITSELF = (
    "bug: services/coordinator/server.py CoordinatorNode._lead sets servicer.leader_endpoint to "
    "its own endpoint and never clears it on stepping down; during an etcd outage nothing "
    "updates it, so the ex-leader answers 'the leader is <itself>' (message and agentmesh-leader)"
)


@pytest.mark.timeout(90)
async def test_leader_rides_out_an_etcd_outage_without_pointing_clients_at_itself(
    cluster: Any,
) -> None:
    """etcd restores leases when it restarts, so a short outage is no reason to fail over:
    the leader keeps its term, answers UNAVAILABLE ("etcd is unreachable") meanwhile, and
    never sends clients (which follow the `agentmesh-leader` pointer) back to itself."""
    c: LocalCluster = await cluster(agents=2, pools=1)
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        before = await client.status()
    me = before.leader_endpoint
    c.etcd.stop()
    try:
        async with grpc.aio.insecure_channel(me) as channel:
            stub = cpb_grpc.CoordinatorStub(channel)
            for _ in range(3):  # across more than one lease TTL (2 s)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await stub.GetTask(cpb.GetTaskRequest(task_id="any"), timeout=5)
                err = failed.value
                assert err.code() == grpc.StatusCode.UNAVAILABLE, err
                assert "etcd is unreachable" in (err.details() or ""), err.details()
                pointed = dict(err.trailing_metadata() or ()).get("agentmesh-leader", "")
                assert pointed != me, f"it points clients at itself: {err.details()}"
                await asyncio.sleep(1.0)
    finally:
        c.etcd.start()
    async with MeshClient(etcd=c.etcd_endpoint, retry_s=30) as client:
        deadline = time.monotonic() + 20
        while True:
            try:
                after = await client.status()
                if after.leader_endpoint:
                    break
            except grpc.aio.AioRpcError:
                pass
            assert time.monotonic() < deadline, "no leader after etcd came back"
            await asyncio.sleep(0.2)
        assert (after.leader_endpoint, after.term) == (me, before.term)  # no needless failover
        (res,) = (
            await client.submit_batch([tpb.TaskSpec(task_id="after-outage", kind="echo")])
        ).results
        assert res.created


# ---------------------------------------------------------------- grpcurl


async def grpcurl(*args: str, timeout_s: float = 30) -> tuple[int, str]:
    code, out, err = await run_command(GRPCURL, "-max-time", "10", *args, timeout_s=timeout_s)
    return code, out + err


@pytest.mark.timeout(120)
async def test_grpcurl_lists_describes_and_calls_the_services(cluster: Any) -> None:
    c: LocalCluster = await cluster(agents=2, pools=1)
    async with MeshClient(etcd=c.etcd_endpoint) as client:
        status = await client.status()
    coordinator = status.leader_endpoint
    pools = [s.endpoint for s in status.services if s.kind == "agent-pool"]
    assert len(pools) == 1

    code, out = await grpcurl("-plaintext", coordinator, "list")
    assert code == 0, out
    services = set(out.split())
    assert {"agentmesh.v1.Coordinator", "grpc.health.v1.Health"} <= services, out
    assert any(s.startswith("grpc.reflection.") for s in services), out

    code, out = await grpcurl("-plaintext", coordinator, "describe", "agentmesh.v1.Coordinator")
    assert code == 0, out
    assert (
        "rpc Submit ( .agentmesh.v1.SubmitRequest ) returns ( .agentmesh.v1.SubmitResponse )" in out
    ), out
    assert "rpc Connect ( stream .agentmesh.v1.AgentMessage )" in out, out

    code, out = await grpcurl(
        "-plaintext",
        "-d",
        '{"spec": {"kind": "nope"}}',
        coordinator,
        "agentmesh.v1.Coordinator/Submit",
    )
    assert code != 0
    assert "Code: InvalidArgument" in out, out
    assert "'nope'" in out, f"the message should name the kind: {out}"
    assert "echo" in out, f"the message should list the known kinds: {out}"

    code, out = await grpcurl(
        "-plaintext",
        "-d",
        '{"spec": {"kind": "echo", "task_id": "curl-1", "payload": "aGk="}}',
        coordinator,
        "agentmesh.v1.Coordinator/Submit",
    )
    assert code == 0, out
    submitted = json.loads(out)  # grpcurl prints the proto field names
    assert submitted["task"]["task_id"] == "curl-1"
    assert submitted["created"] is True

    # the README's SubmitStream example: one answer per request, in order (a replay first)
    code, out = await grpcurl(
        "-plaintext",
        "-d",
        '{"spec": {"kind": "echo", "task_id": "curl-1"}}\n{"spec": {"kind": "echo", "task_id": "curl-2"}}',
        coordinator,
        "agentmesh.v1.Coordinator/SubmitStream",
    )
    assert code == 0, out
    answers, rest, decoder = [], out.strip(), json.JSONDecoder()
    while rest:
        answer, end = decoder.raw_decode(rest)
        answers.append((answer["task"]["task_id"], answer.get("created", False)))
        rest = rest[end:].strip()
    assert answers == [("curl-1", False), ("curl-2", True)], out

    code, out = await grpcurl(
        "-plaintext",
        "-d",
        '{"service": "agentmesh.v1.Coordinator"}',
        coordinator,
        "grpc.health.v1.Health/Check",
    )
    assert code == 0, out
    assert json.loads(out) == {"status": "SERVING"}

    code, out = await grpcurl("-plaintext", pools[0], "list")
    assert code == 0, out
    services = set(out.split())
    assert {"agentmesh.v1.AgentPool", "grpc.health.v1.Health"} <= services, out
    assert any(s.startswith("grpc.reflection.") for s in services), out
    code, out = await grpcurl(
        "-plaintext", "-d", "{}", pools[0], "agentmesh.v1.AgentPool/ListAgents"
    )
    assert code == 0, out
    listed = json.loads(out)
    assert listed["pool_id"] == "pool-1", out
    assert len(listed["agents"]) == 2, out


# ---------------------------------------------------------------- the CLI


@pytest.mark.timeout(150)
async def test_cli_end_to_end(cluster: Any, tmp_path: Path) -> None:
    c: LocalCluster = await cluster(agents=4, pools=2)
    cli = agentmesh_cmd()
    etcd = ["--etcd", c.etcd_endpoint]

    code, out, err = await run_command(
        *cli, "submit", *etcd, "--kind", "echo", "--payload", "hi", "--wait"
    )
    assert code == 0, out + err
    assert "submitted 1 tasks (1 new)" in out, out
    for shown in ("summary", "SUCCEEDED", "wall time", "throughput"):
        assert shown in out, out

    code, out, err = await run_command(*cli, "tasks", *etcd, "--json")
    assert code == 0, out + err
    listed = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(listed) == 1, out
    task_id = listed[0]["taskId"]
    assert listed[0]["state"] == "TASK_STATE_SUCCEEDED", listed

    code, out, err = await run_command(*cli, "tasks", *etcd, "--state", "succeeded")
    assert code == 0, out + err
    assert task_id in out, out
    assert "SUCCEEDED" in out, out

    code, out, err = await run_command(*cli, "task", "get", task_id, *etcd, "--json")
    assert code == 0, out + err
    got = json.loads(out)
    assert (got["taskId"], got["state"], got["result"]) == (
        task_id,
        "TASK_STATE_SUCCEEDED",
        "aGk=",
    )  # b"hi"
    code, out, err = await run_command(*cli, "task", "get", task_id, *etcd)
    assert code == 0, out + err
    readable = {line.split(None, 1)[0]: line for line in out.splitlines() if line.strip()}
    assert "SUCCEEDED" in readable["state"], out
    assert readable["result"].split()[1] == "hi", out  # text, not base64
    assert "took" in readable, out

    code, out, err = await run_command(*cli, "agents", *etcd)
    assert code == 0, out + err
    for shown in ("4 agents", "pool-1-a0001", "pool-2-a0001"):
        assert shown in out, out

    code, out, err = await run_command(*cli, "status", *etcd)
    assert code == 0, out + err
    for shown in ("coordinator-1", "4 connected", "agent-pool"):
        assert shown in out, out

    code, out, err = await run_command(*cli, "task", "get", "nope", *etcd)
    assert code != 0
    assert "NOT_FOUND" in err, out + err
    assert "'nope'" in err, out + err
    assert "Traceback" not in out + err

    code, out, err = await run_command(
        *cli,
        "up",
        "--agents",
        "2",
        "--data-dir",
        str(tmp_path / "up"),
        "--etcd-port",
        str(free_port()),
        "--port",
        str(free_port()),
        env={"AGENTMESH_ETCD_BIN": "/nonexistent"},
        timeout_s=60,
    )
    assert code != 0
    assert "apt-get install -y etcd-server" in err, out + err
    assert "AGENTMESH_ETCD_BIN" in err, out + err
    assert "Traceback" not in out + err
