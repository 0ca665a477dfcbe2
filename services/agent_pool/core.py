"""The agent pool's core: a pool of agents that spawns them (in batches or waves), keeps a
warm reserve, stops, drains and replaces them, and reconnects them all when the pool's
lease is renewed.

No gRPC here: each agent's streams live in the agent (agent.py), where agents are
published is a port (`AgentRegistry`), and time comes from the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from protos.agentmesh.v1 import agent_pool_pb2 as ppb
from protos.agentmesh.v1 import health_pb2 as hpb
from services._common.clock import Clock
from services._common.errors import InvalidArgumentError
from services.agent_pool.config import PoolConfig
from services.coordinator import limits

if TYPE_CHECKING:
    from services.agent_pool.agent import Agent

log = logging.getLogger(__name__)

MAX_SPAWN = limits.SPAWN_MAX
MAX_CAPACITY = 1000
WELCOME_TIMEOUT_S = 30.0
"""How long a spawn waits for its agents' welcomes before it answers with what is ready."""
DEFAULT_WAVE_SIZE = 10


class AgentRegistry(Protocol):
    """Where the pool's agents are published while they live (etcd: agents/<id> and
    their voting keys, on the pool's lease)."""

    async def register(self, agents: Sequence[Agent]) -> None: ...

    async def deregister(self, agent_ids: Sequence[str]) -> None: ...


class Voters(Protocol):
    """Each agent's vote stream to the consensus service (voter.py)."""

    def start(self, agent: Agent) -> None: ...

    def stop(self, agent_id: str) -> None: ...


@dataclass(frozen=True)
class Spawned:
    agents: list[Agent]
    from_warm: int
    elapsed_s: float


@dataclass(frozen=True)
class WaveProgress:
    wave: int
    started: int
    ready: int
    failed: int
    elapsed_s: float


def check_count(count: int) -> None:
    if not 1 <= count <= MAX_SPAWN:
        raise InvalidArgumentError(f"count {count} is out of range: use 1-{MAX_SPAWN}")


REPLY_BYTES = limits.LIST_PAGE_BYTES
"""A SpawnAgents reply lists every agent started: it must fit a default client's 4 MiB
receive limit, like a page of ListAgents."""


class AgentPool:
    """The agents of one pool.

    Args:
        cfg: the pool's config (defaults of the agents, warm reserve, grace, faults).
        pool_id: the pool's id; agents are <pool_id>-a<n>.
        clock: injected time.
        make_agent: builds an agent (not started) from its id and template.
        registry: where agents are published.
        voters: each agent's vote stream.
        executor_kinds: the kinds this pool can run (a template may only ask for these).
    """

    def __init__(
        self,
        cfg: PoolConfig,
        pool_id: str,
        clock: Clock,
        *,
        make_agent: Callable[[str, ppb.AgentTemplate], Agent],
        registry: AgentRegistry,
        voters: Voters,
        executor_kinds: Collection[str],
    ) -> None:
        self.cfg = cfg
        self.pool_id = pool_id
        self.clock = clock
        self.make_agent = make_agent
        self.registry = registry
        self.voters = voters
        self.executor_kinds = frozenset(executor_kinds)
        self.defaults = ppb.AgentTemplate(
            roles=cfg.roles, labels=cfg.label_map(), kinds=cfg.kinds, capacity=cfg.capacity
        )
        self.agents: dict[str, Agent] = {}
        """The pool's live agents, in the order they started."""
        self.warm: list[Agent] = []
        """Agents made ahead of time (not connected), handed out first by a spawn."""
        self.flaky: set[str] = set()
        """Agents that fail every task (SIMULATED, cfg.flaky_agents)."""
        self.replaces: dict[str, str] = {}
        """A replacement's agent id → the agent it replaced."""
        self.count_changed = asyncio.Event()
        """Set whenever the number of agents may have changed (for the registration)."""
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._chores: set[asyncio.Task[None]] = set()
        self._seq = itertools.count(1)

    # ---- templates ----

    def template(self, t: ppb.AgentTemplate | None) -> ppb.AgentTemplate:
        """The pool's defaults with `t`'s fields over them; InvalidArgumentError naming
        the field when `t` asks for what the pool cannot give."""
        out = ppb.AgentTemplate()
        out.CopyFrom(self.defaults)
        if t is None:
            return out
        # the template becomes each agent's hello: the coordinator's limits apply
        limits.validate_template_fields("template", t.roles, t.labels, t.kinds)
        if t.roles:
            del out.roles[:]
            out.roles.extend(t.roles)
        if t.labels:
            out.labels.clear()
            out.labels.update(t.labels)
        if t.kinds:
            missing = [k for k in t.kinds if k not in self.executor_kinds]
            if missing:
                raise InvalidArgumentError(
                    f"template.kinds {missing} have no executor in this pool; "
                    f"use {sorted(self.executor_kinds)}"
                )
            del out.kinds[:]
            out.kinds.extend(t.kinds)
        if t.capacity:
            if t.capacity > MAX_CAPACITY:
                raise InvalidArgumentError(f"template.capacity must be 1-{MAX_CAPACITY}")
            out.capacity = t.capacity
        return out

    def check_reply(self, count: int, template: ppb.AgentTemplate | None) -> None:
        """InvalidArgumentError unless a reply listing `count` agents made from `template`
        fits REPLY_BYTES. Past it the caller got RESOURCE_EXHAUSTED from its own gRPC
        while every agent ran, and a retry started them all again."""
        check_count(count)
        largest = ppb.PoolAgent(
            agent_id=f"{self.pool_id}-a{10**9}",
            pool_id=self.pool_id,
            state=ppb.AGENT_STATE_RECONNECTING,
            spawn_ms=1.0,
            inflight=MAX_CAPACITY,
            completed=2**63,
            failed=2**63,
            template=self.template(template),
        )
        fit = REPLY_BYTES // (largest.ByteSize() + 4)  # + the field's tag and length
        if count > fit:
            raise InvalidArgumentError(
                f"count {count} is too large for this template: the reply lists each agent "
                f"with its template and would not fit {REPLY_BYTES // limits.MiB} MiB; use "
                f"count 1-{fit} (or SpawnWaves, whose progress carries counts only)"
            )

    # ---- starting agents ----

    def _new_agent(self, template: ppb.AgentTemplate) -> Agent:
        seq = next(self._seq)
        agent = self.make_agent(f"{self.pool_id}-a{seq:04d}", template)
        if seq <= self.cfg.flaky_agents:
            self.flaky.add(agent.agent_id)
        return agent

    async def _start(self, agents: list[Agent]) -> None:
        """Connect `agents`, publish them, and open their vote streams.

        Once they run, they are published and vote even if the caller goes (a SpawnAgents
        whose deadline passed mid-way): cut short, they took tasks unregistered (the health
        monitor never replaced them when their pool died) and without a key or a vote stream.
        """
        for agent in agents:
            self.agents[agent.agent_id] = agent
            self._runs[agent.agent_id] = asyncio.ensure_future(agent.run())
        self.count_changed.set()
        await asyncio.shield(self._chore(self._publish(agents)))

    async def _publish(self, agents: list[Agent]) -> None:
        await self.registry.register(agents)
        for agent in agents:
            if agent.agent_id in self.agents:  # not stopped meanwhile
                self.voters.start(agent)

    async def spawn(
        self,
        count: int,
        batch_size: int,
        template: ppb.AgentTemplate | None,
        timeout_s: float = WELCOME_TIMEOUT_S,
        *,
        replaces: str = "",
    ) -> Spawned:
        """Start `count` agents, `batch_size` at a time (0: all at once); each batch waits
        (up to `timeout_s`) until its agents are welcomed. Warm agents go first when no
        template is given.

        `replaces`: the one agent started replaces that agent (the health monitor's
        order). An order sent again (its reply lost, a new active monitor) gets the
        replacement started already, not a second one."""
        check_count(count)
        merged = self.template(template)
        if replaces:
            limits.check_id("replaces", replaces)
            if count != 1:
                raise InvalidArgumentError(
                    f"count {count} with replaces: an agent is replaced by one agent (count 1)"
                )
            done = [a for a, old in self.replaces.items() if old == replaces and a in self.agents]
            if done:
                return Spawned([self.agents[done[0]]], 0, 0.0)
        t0 = self.clock.monotonic()
        batch = batch_size or count
        started: list[Agent] = []
        from_warm = 0
        for first in range(0, count, batch):
            wave = []
            for _ in range(min(batch, count - first)):
                if self.warm and template is None:
                    agent = self.warm.pop()
                    agent.requested_at = self.clock.monotonic()
                    from_warm += 1
                else:
                    agent = self._new_agent(merged)
                if replaces:
                    self.replaces[agent.agent_id] = replaces  # its first heartbeat says so
                wave.append(agent)
            await self._start(wave)
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(
                    asyncio.gather(*(a.welcomed.wait() for a in wave)), timeout_s
                )
            started.extend(wave)
        self.refill_warm()
        return Spawned(started, from_warm, self.clock.monotonic() - t0)

    async def spawn_waves(
        self,
        count: int,
        wave_size: int,
        interval_s: float,
        template: ppb.AgentTemplate | None,
    ) -> AsyncIterator[WaveProgress]:
        """Spawn `count` agents in waves of `wave_size` (0: 10), `interval_s` apart; say
        how far it got after each wave. Everything is checked before the first wave: a
        bad request spawns nothing."""
        check_count(count)
        if wave_size > count:
            raise InvalidArgumentError(
                f"wave_size {wave_size} is out of range: use 1-count ({count}); 0: 10"
            )
        limits.check_finite("wave_interval_s", interval_s, 0.0, limits.WAVE_INTERVAL_S_MAX)
        self.template(template)
        size = wave_size or DEFAULT_WAVE_SIZE
        t0 = self.clock.monotonic()
        started = ready = failed = 0
        for wave, first in enumerate(range(0, count, size), start=1):
            spawned = await self.spawn(min(size, count - first), 0, template)
            started += len(spawned.agents)
            ok = sum(a.welcomed.is_set() for a in spawned.agents)
            ready += ok
            failed += len(spawned.agents) - ok
            yield WaveProgress(wave, started, ready, failed, self.clock.monotonic() - t0)
            if first + size < count:
                await self.clock.sleep(interval_s)

    def refill_warm(self) -> None:
        while len(self.warm) < self.cfg.warm:
            agent = self._new_agent(self.defaults)
            agent.state = ppb.AGENT_STATE_WARM
            self.warm.append(agent)

    async def boot(self) -> None:
        """Start the agents the config asks for at boot (or just the warm reserve)."""
        if not self.cfg.agents:
            self.refill_warm()
            return
        spawned = await self.spawn(self.cfg.agents, self.cfg.batch_size, None)
        log.info(
            "agents started",
            extra={
                "ready": sum(a.welcomed.is_set() for a in spawned.agents),
                "requested": self.cfg.agents,
                "elapsed_ms": round(spawned.elapsed_s * 1000, 1),
            },
        )

    # ---- stopping agents ----

    async def stop(self, agent_ids: Sequence[str], count: int, graceful: bool) -> list[str]:
        """Stop the agents named (or the `count` started last), after letting them finish
        what they hold (bounded by the grace) if `graceful`. Returns their ids."""
        if agent_ids:  # an id given twice stops its agent once, in its first place
            chosen = list(dict.fromkeys(agent_ids))
        else:
            chosen = list(self.agents)[-count:] if count else []
        unknown = [a for a in chosen if a not in self.agents]
        if unknown:
            raise InvalidArgumentError(
                f"{len(unknown)} agent ids are not in this pool, e.g. "
                + ", ".join(limits.quote(a) for a in unknown[:3])
            )
        # a stop once begun is carried out as asked whatever happens to its caller: a
        # graceful one cut short by the caller's deadline killed the held tasks (they ran
        # again elsewhere) instead of letting them finish
        await asyncio.shield(self._chore(self._stop(chosen, graceful)))
        return chosen

    async def _stop(self, chosen: list[str], graceful: bool) -> None:
        try:
            if graceful:
                draining = [self.agents[a] for a in chosen if a in self.agents]
                await asyncio.gather(*(a.drain(self.cfg.grace_s) for a in draining))
        finally:
            # whatever happened above, every chosen agent stops and its record goes
            for agent_id in chosen:
                self._forget(agent_id)
            self.count_changed.set()
            await self.registry.deregister(chosen)

    def _forget(self, agent_id: str) -> None:
        agent = self.agents.pop(agent_id, None)
        if agent is None:
            return
        run = self._runs.pop(agent_id, None)
        if run is not None:
            run.cancel()
        self.voters.stop(agent_id)
        self.replaces.pop(agent_id, None)
        for _, work in agent.running.values():
            work.cancel()
        agent.state = ppb.AGENT_STATE_STOPPED

    def drain(self, reason: str) -> int:
        """Tell every agent to take nothing new (they keep running what they hold)."""
        for agent in self.agents.values():
            agent.start_draining(reason)
        return len(self.agents)

    async def drain_all(self) -> None:
        """Shutdown: every agent finishes what it holds (bounded by the grace) and stops."""
        await self.stop(list(self.agents), 0, graceful=True)

    # ---- the health monitor's orders ----

    def on_health_directive(self, agent_id: str, directive: hpb.HealthDirective) -> None:
        body = directive.WhichOneof("body")
        if body == "replace":
            self._chore(self.replace(agent_id, directive.replace.reason))
        elif body == "drain":
            self._chore(self.retire(agent_id, directive.drain.reason))

    def _chore(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)
        return task

    async def replace(self, agent_id: str, reason: str) -> None:
        """Stop the agent now (the coordinator requeues what it held when its stream
        closes) and start a fresh one like it: the pool keeps its size."""
        agent = self.agents.get(agent_id)
        if agent is None:
            return
        log.warning(
            "replacing an agent on the health monitor's order",
            extra={"agent": agent_id, "reason": reason},
        )
        await self.stop([agent_id], 0, graceful=False)
        new = self._new_agent(agent.template)
        self.replaces[new.agent_id] = agent_id
        await self._start([new])

    async def retire(self, agent_id: str, reason: str) -> None:
        """Drain the agent and stop it for good (it was replaced elsewhere)."""
        if agent_id not in self.agents:
            return
        log.warning(
            "retiring an agent on the health monitor's order",
            extra={"agent": agent_id, "reason": reason},
        )
        with contextlib.suppress(InvalidArgumentError):
            await self.stop([agent_id], 0, graceful=True)

    # ---- the pool's lease ----

    async def rejoin(self) -> None:
        """The pool has a new lease (the old one, and every claim on it, is gone): publish
        every agent on it and reconnect them all, so their hellos carry it. What they run
        keeps running and is reported on the new streams."""
        await self.registry.register(list(self.agents.values()))
        old = {agent_id: self._runs[agent_id] for agent_id in self.agents}
        for run in old.values():
            run.cancel()
        # every old session unwinds before its agent connects again: two sessions of one
        # agent would share (and the old one clear) its outbox
        await asyncio.gather(*old.values(), return_exceptions=True)
        for agent_id, agent in self.agents.items():
            if self._runs.get(agent_id) is old.get(agent_id):
                self._runs[agent_id] = asyncio.ensure_future(agent.run())

    async def close(self) -> None:
        """Cancel whatever still runs (after `drain_all`, only what started meanwhile)."""
        leftover = [*self._chores, *self._runs.values()]
        for agent_id in list(self.agents):
            self._forget(agent_id)
        for task in leftover:
            task.cancel()
        await asyncio.gather(*leftover, return_exceptions=True)
