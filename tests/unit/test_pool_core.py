"""The agent pool's core with a fake clock and no sockets: spawning in batches, waves and
from the warm reserve, stopping (graceful or not), the health monitor's replacements,
and the reconnect after a new lease. Agents are real `Agent`s whose coordinator is
never known, so they stay unconnected; a test welcomes them by hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import health_pb2 as hpb
from services._common.clock import FakeClock
from services._common.errors import InvalidArgumentError
from services._common.follow import Leader
from services.agent_pool.agent import Agent, PoolContext
from services.agent_pool.config import PoolConfig
from services.agent_pool.core import AgentPool


class Registry:
    def __init__(self) -> None:
        self.registered: list[list[str]] = []
        self.deregistered: list[list[str]] = []

    async def register(self, agents: Sequence[Agent]) -> None:
        self.registered.append([a.agent_id for a in agents])

    async def deregister(self, agent_ids: Sequence[str]) -> None:
        self.deregistered.append(list(agent_ids))


class Voters:
    def __init__(self) -> None:
        self.streams: set[str] = set()

    def start(self, agent: Agent) -> None:
        self.streams.add(agent.agent_id)

    def stop(self, agent_id: str) -> None:
        self.streams.discard(agent_id)


class Pool:
    def __init__(self, **cfg: Any) -> None:
        self.clock = FakeClock()
        cfg.setdefault("kinds", ("echo", "sleep"))
        self.cfg = PoolConfig(pool_id="p", **cfg)
        coordinator = Leader(None, "coordinator", self.clock)  # type: ignore[arg-type]
        context = PoolContext(
            pool_id="p",
            lease_id=lambda: 7,
            coordinator=coordinator,
            executors={},
            task_timeout_s=10.0,
            clock=self.clock,
        )
        self.registry = Registry()
        self.voters = Voters()
        self.core = AgentPool(
            self.cfg,
            "p",
            self.clock,
            make_agent=lambda agent_id, template: Agent(agent_id, context, template),
            registry=self.registry,
            voters=self.voters,
            executor_kinds=("echo", "sleep"),
        )

    def runs(self) -> dict[str, asyncio.Task[None]]:
        return dict(self.core._runs)


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    made = Pool()
    yield made
    await made.core.close()


def welcome(agent: Agent) -> None:
    agent._on_message(cpb.CoordinatorMessage(welcome=cpb.Welcome(coordinator_id="c", term=1)))


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_a_spawn_waits_for_welcomes_on_the_clock_then_answers_with_what_is_ready(
    pool: Pool,
) -> None:
    spawn = asyncio.ensure_future(pool.core.spawn(3, 0, None, timeout_s=30.0))
    await settle()
    agents = list(pool.core.agents.values())
    assert len(agents) == 3
    await pool.clock.advance(0.25)
    welcome(agents[0])
    await pool.clock.advance(29.0)
    assert not spawn.done()  # the others may still come
    await pool.clock.advance(1.0)
    spawned = await spawn
    assert [a.agent_id for a in spawned.agents] == ["p-a0001", "p-a0002", "p-a0003"]
    assert 30.0 <= spawned.elapsed_s <= 30.25  # the clock's, not the machine's
    assert [a.state for a in spawned.agents] == [
        ppb.AGENT_STATE_READY,
        ppb.AGENT_STATE_STARTING,
        ppb.AGENT_STATE_STARTING,
    ]
    assert spawned.agents[0].spawn_ms == pytest.approx(250.0)
    assert pool.registry.registered == [["p-a0001", "p-a0002", "p-a0003"]]
    assert pool.voters.streams == {"p-a0001", "p-a0002", "p-a0003"}
    assert pool.core.count_changed.is_set()


async def test_a_spawn_in_batches_starts_the_next_batch_once_the_last_is_welcomed(
    pool: Pool,
) -> None:
    spawn = asyncio.ensure_future(pool.core.spawn(5, 2, None))
    await settle()
    assert list(pool.core.agents) == ["p-a0001", "p-a0002"]
    for agent in list(pool.core.agents.values()):
        welcome(agent)
    await settle()
    assert len(pool.core.agents) == 4
    for agent in list(pool.core.agents.values()):
        welcome(agent)
    await settle()
    welcome(pool.core.agents["p-a0005"])
    spawned = await asyncio.wait_for(spawn, 1)
    assert len(spawned.agents) == 5
    assert pool.registry.registered == [["p-a0001", "p-a0002"], ["p-a0003", "p-a0004"], ["p-a0005"]]


async def test_warm_agents_are_handed_out_first_and_the_reserve_is_refilled() -> None:
    pool = Pool(warm=2)
    try:
        pool.core.refill_warm()
        warm = {a.agent_id for a in pool.core.warm}
        assert warm == {"p-a0001", "p-a0002"}
        assert all(a.state == ppb.AGENT_STATE_WARM for a in pool.core.warm)
        spawn = asyncio.ensure_future(pool.core.spawn(3, 0, None, timeout_s=1.0))
        await settle()
        await pool.clock.advance(1.0)
        spawned = await spawn
        assert spawned.from_warm == 2
        assert warm < {a.agent_id for a in spawned.agents}
        assert len(pool.core.warm) == 2  # refilled with new agents
        assert not warm & {a.agent_id for a in pool.core.warm}
        # a template asks for agents unlike the warm ones: none is taken
        spawn = asyncio.ensure_future(
            pool.core.spawn(1, 0, ppb.AgentTemplate(kinds=["echo"]), timeout_s=1.0)
        )
        await settle()
        await pool.clock.advance(1.0)
        assert (await spawn).from_warm == 0
    finally:
        await pool.core.close()


async def test_a_template_asking_for_what_the_pool_cannot_give_is_refused(pool: Pool) -> None:
    with pytest.raises(InvalidArgumentError, match=r"template.kinds \['gpu'\] have no executor"):
        await pool.core.spawn(1, 0, ppb.AgentTemplate(kinds=["gpu"]))
    with pytest.raises(InvalidArgumentError, match="template.capacity must be 1-1000"):
        await pool.core.spawn(1, 0, ppb.AgentTemplate(capacity=1001))
    with pytest.raises(InvalidArgumentError, match="count 0 is out of range"):
        await pool.core.spawn(0, 0, None)
    assert pool.core.agents == {}
    merged = pool.core.template(ppb.AgentTemplate(roles=["coder"], capacity=4))
    assert (list(merged.roles), list(merged.kinds), merged.capacity) == (
        ["coder"],
        ["echo", "sleep"],  # the pool's default, kept
        4,
    )


async def test_waves_sleep_on_the_clock_between_them_and_report_each(pool: Pool) -> None:
    seen: list[Any] = []

    async def consume() -> None:
        async for progress in pool.core.spawn_waves(5, 2, 3.0, None):
            seen.append(progress)

    waves = asyncio.ensure_future(consume())
    for _ in range(3):
        await settle()
        for agent in pool.core.agents.values():
            if not agent.welcomed.is_set():
                welcome(agent)
        await settle()
        await pool.clock.advance(3.0)
    await asyncio.wait_for(waves, 1)
    assert [(p.wave, p.started, p.ready, p.failed) for p in seen] == [
        (1, 2, 2, 0),
        (2, 4, 4, 0),
        (3, 5, 5, 0),
    ]
    assert [p.elapsed_s for p in seen] == [0.0, 3.0, 6.0]


async def test_a_bad_wave_request_spawns_nothing(pool: Pool) -> None:
    with pytest.raises(InvalidArgumentError, match="wave_size 9 is out of range"):
        async for _ in pool.core.spawn_waves(4, 9, 0.0, None):
            pass
    with pytest.raises(InvalidArgumentError, match="wave_interval_s"):
        async for _ in pool.core.spawn_waves(4, 2, float("nan"), None):
            pass
    assert pool.core.agents == {}


async def start(pool: Pool, count: int) -> list[Agent]:
    spawn = asyncio.ensure_future(pool.core.spawn(count, 0, None, timeout_s=1.0))
    await settle()
    for agent in pool.core.agents.values():
        welcome(agent)
    return (await asyncio.wait_for(spawn, 1)).agents


async def test_stop_by_count_stops_the_last_started_and_unpublishes_them(pool: Pool) -> None:
    agents = await start(pool, 4)
    runs = pool.runs()
    pool.core.count_changed.clear()
    stopped = await pool.core.stop([], 2, graceful=False)
    assert stopped == ["p-a0003", "p-a0004"]
    assert list(pool.core.agents) == ["p-a0001", "p-a0002"]
    assert pool.registry.deregistered == [["p-a0003", "p-a0004"]]
    assert pool.voters.streams == {"p-a0001", "p-a0002"}
    assert agents[3].state == ppb.AGENT_STATE_STOPPED
    await settle()
    assert runs["p-a0004"].cancelled()
    assert not runs["p-a0001"].done()
    assert pool.core.count_changed.is_set()


async def test_stopping_an_unknown_agent_stops_none(pool: Pool) -> None:
    await start(pool, 2)
    with pytest.raises(InvalidArgumentError, match="1 agent ids are not in this pool"):
        await pool.core.stop(["p-a0001", "nobody"], 0, graceful=False)
    assert list(pool.core.agents) == ["p-a0001", "p-a0002"]
    assert pool.registry.deregistered == []


async def test_a_graceful_stop_waits_for_held_work_up_to_the_grace() -> None:
    pool = Pool(grace_s=2.0)
    try:
        (agent,) = await start(pool, 1)
        work = asyncio.ensure_future(asyncio.Event().wait())
        agent.running["t1"] = (5, work)  # a task in flight
        stop = asyncio.ensure_future(pool.core.stop(["p-a0001"], 0, graceful=True))
        await settle()
        assert agent.draining
        await pool.clock.advance(1.9)
        assert not stop.done()
        await pool.clock.advance(0.2)
        assert await asyncio.wait_for(stop, 1) == ["p-a0001"]
        await settle()
        assert work.cancelled()  # what outlived the grace is stopped with the agent
    finally:
        await pool.core.close()


async def test_a_graceful_stop_ends_as_soon_as_held_work_is_reported(pool: Pool) -> None:
    (agent,) = await start(pool, 1)
    agent.unacked["t1"] = cpb.AgentMessage()
    stop = asyncio.ensure_future(pool.core.stop(["p-a0001"], 0, graceful=True))
    await pool.clock.advance(0.1)
    assert not stop.done()
    del agent.unacked["t1"]  # the coordinator acknowledged the result
    await pool.clock.advance(0.05)
    assert await asyncio.wait_for(stop, 1) == ["p-a0001"]


async def test_drain_tells_every_agent_to_take_nothing_new(pool: Pool) -> None:
    agents = await start(pool, 2)
    for agent in agents:
        agent._outbox = asyncio.Queue()
    assert pool.core.drain("maintenance") == 2
    for agent in agents:
        assert agent.draining
        assert agent.state == ppb.AGENT_STATE_DRAINING
        assert agent._outbox is not None
        assert agent._outbox.get_nowait().draining.reason == "maintenance"


async def test_a_replacement_is_like_the_agent_it_replaces_and_votes_too(pool: Pool) -> None:
    spawn = asyncio.ensure_future(
        pool.core.spawn(1, 0, ppb.AgentTemplate(roles=["coder"]), timeout_s=1.0)
    )
    await settle()
    await pool.clock.advance(1.0)
    (old,) = (await spawn).agents
    directive = hpb.HealthDirective(replace=hpb.ReplaceAgent(reason="hung"))
    pool.core.on_health_directive(old.agent_id, directive)
    await settle()
    assert list(pool.core.agents) == ["p-a0002"]
    new = pool.core.agents["p-a0002"]
    assert list(new.template.roles) == ["coder"]
    assert pool.core.replaces == {"p-a0002": "p-a0001"}
    assert pool.voters.streams == {"p-a0002"}
    assert pool.registry.deregistered == [["p-a0001"]]
    assert pool.registry.registered[-1] == ["p-a0002"]


async def test_a_drain_order_retires_the_agent_for_good(pool: Pool) -> None:
    await start(pool, 2)
    pool.core.on_health_directive("p-a0001", hpb.HealthDirective(drain=hpb.DrainAgent(reason="x")))
    await settle()
    assert list(pool.core.agents) == ["p-a0002"]
    pool.core.on_health_directive("gone", hpb.HealthDirective(drain=hpb.DrainAgent(reason="x")))
    await settle()
    assert list(pool.core.agents) == ["p-a0002"]


async def test_rejoin_republishes_every_agent_and_reconnects_it(pool: Pool) -> None:
    await start(pool, 3)
    before = pool.runs()
    work = asyncio.ensure_future(asyncio.Event().wait())
    pool.core.agents["p-a0002"].running["t1"] = (9, work)
    await pool.core.rejoin()
    # each old session has unwound before its agent connects again: two live sessions of
    # one agent shared its outbox, and the old one's exit cleared it (results went nowhere)
    assert all(before[a].done() for a in before)
    await settle()
    assert pool.registry.registered[-1] == ["p-a0001", "p-a0002", "p-a0003"]
    after = pool.runs()
    assert all(before[a].cancelled() for a in before)
    assert all(not after[a].done() for a in after)
    assert not work.done()  # the work goes on; its result goes out on the new stream
    work.cancel()


async def test_close_stops_whatever_still_runs(pool: Pool) -> None:
    await start(pool, 2)
    runs = pool.runs()
    await pool.core.close()
    assert pool.core.agents == {}
    assert all(r.cancelled() for r in runs.values())
