"""The health monitor's core with a fake clock: every state transition, the latency
baseline and the predictive alert, hung work, each step of the breaker, the ejection
cap, and recovery with its escalation. No sockets; each test runs in milliseconds."""

from __future__ import annotations

from typing import Any

import pytest

from protos.agentmesh.v1 import health_pb2 as hpb
from services._common.clock import FakeClock
from services._common.errors import AlreadyExistsError, InvalidArgumentError
from services.health.config import HealthConfig
from services.health.core import (
    ALL,
    CLOSED,
    CRITICAL,
    DEGRADED,
    FAILED,
    HALF_OPEN,
    HEALTHY,
    NONE,
    ONE,
    OPEN,
    HealthCore,
    PoolInfo,
    Release,
    Replace,
    validate_heartbeat,
)

K = hpb.AlertKind


def config(**overrides: Any) -> HealthConfig:
    base: dict[str, Any] = dict(
        stall_limit_s=3.0,
        cancel_grace_s=1.0,
        ejection_base_s=10.0,
        ejection_max_s=60.0,
        predictive_window_s=5.0,
        baseline_min_samples=10,
    )
    base.update(overrides)
    return HealthConfig(**base)


class Agent:
    """One agent's stream to the core: what it sent, what it was told."""

    def __init__(
        self,
        core: HealthCore,
        clock: FakeClock,
        agent_id: str,
        registered: bool = True,
        **info: Any,
    ) -> None:
        self.core, self.clock, self.agent_id = core, clock, agent_id
        if registered:  # its pool registered it in etcd (agents/<id>)
            core.registered([agent_id])
        info.setdefault("pool_id", "pool-1")
        info.setdefault("capacity", 1)
        info.setdefault("kinds", ["sleep"])
        self.info = hpb.AgentInfo(**info)
        self.directives: list[hpb.HealthDirective | None] = []
        self.stream = 0
        self.seq = 0

    def connect(self, **fields: Any) -> None:
        self.stream = self.core.connect(self.hb(info=self.info, **fields), self.directives.append)
        self.beat(**fields)

    def hb(self, **fields: Any) -> hpb.Heartbeat:
        self.seq += 1
        fields.setdefault("sent_at_us", self.clock.wall_us())
        return hpb.Heartbeat(agent_id=self.agent_id, seq=self.seq, **fields)

    def beat(self, **fields: Any) -> None:
        self.core.heartbeat(self.stream, self.hb(**fields))

    def close(self) -> None:
        self.core.disconnect(self.agent_id, self.stream)

    def told(self, body: str) -> list[hpb.HealthDirective]:
        return [d for d in self.directives if d is not None and d.WhichOneof("body") == body]

    @property
    def view(self) -> Any:
        return self.core.agents[self.agent_id]


def task(task_id: str, token: int, started_us: int, progress_us: int = 0, timeout_s: float = 0):
    return hpb.TaskInFlight(
        task_id=task_id,
        claim_token=token,
        started_at_us=started_us,
        last_progress_at_us=progress_us,
        timeout_s=timeout_s,
    )


def ok(task_id: str = "t", ms: float = 100.0) -> hpb.TaskOutcome:
    return hpb.TaskOutcome(task_id=task_id, ok=True, latency_ms=ms)


def fail(task_id: str = "t", retryable: bool = True) -> hpb.TaskOutcome:
    return hpb.TaskOutcome(task_id=task_id, ok=False, error="boom", retryable=retryable)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **overrides: Any) -> HealthCore:
    core = HealthCore(config(**overrides), clock, term=7, node_id="health-1")
    core.set_pools([PoolInfo("pool-1", "127.0.0.1:1", 4), PoolInfo("pool-2", "127.0.0.1:2", 4)])
    return core


async def advance(clock: FakeClock, core: HealthCore, seconds: float, step: float = 0.1) -> None:
    """Move time on, ticking the core as the server's timer does."""
    t = 0.0
    while t < seconds - 1e-9:
        await clock.advance(step)
        core.tick()
        t += step


async def live(clock: FakeClock, core: HealthCore, agents: list[Agent], seconds: float) -> None:
    """Move time on while every agent heartbeats each second (nothing else they say)."""
    t = 0.0
    while t < seconds - 1e-9:
        step = min(1.0, seconds - t)
        await advance(clock, core, step, step=min(step, 0.1))
        for x in agents:
            x.beat()
        t += step


def kinds(core: HealthCore) -> set[int]:
    return {a.kind for a in core.alerts.values()}


# ---------------------------------------------------------------- states


async def test_silence_walks_healthy_degraded_critical_failed(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    a.connect()
    assert a.told("welcome")[0].welcome.term == 7
    seen = []
    core.subscribers.add(
        lambda e: seen.append(e.change.state) if e.WhichOneof("body") == "change" else None
    )
    await advance(clock, core, 1.9)
    assert a.view.state == HEALTHY
    await advance(clock, core, 0.2)
    assert a.view.state == DEGRADED
    assert core.record("a1") is not None  # a state change is stored
    await advance(clock, core, 3.0)
    assert a.view.state == CRITICAL
    core.take_actions()
    await advance(clock, core, 5.0)
    assert a.view.state == FAILED
    assert seen == [DEGRADED, CRITICAL, FAILED]
    assert core.record("a1").admission == NONE  # type: ignore[union-attr]
    actions = core.take_actions()
    release = [x for x in actions if isinstance(x, Release)]
    assert release
    assert release[0].claims == []
    assert not release[0].hung
    # the stream is still open (a frozen pool): the replacement goes through the pools
    replace = [x for x in actions if isinstance(x, Replace)]
    assert replace
    assert replace[0].own_pool
    assert replace[0].pool_id == "pool-1"
    assert core.summary().failed_declared == 1


async def test_heartbeats_bring_a_degraded_agent_back_and_delete_its_record(
    clock: FakeClock,
) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    a.connect()
    await advance(clock, core, 2.5)
    assert a.view.state == DEGRADED
    assert K.ALERT_KIND_STATE in kinds(core)
    a.beat()
    assert a.view.state == HEALTHY
    assert core.record("a1") is None
    assert "a1" in core.take_dirty()  # the record goes
    assert K.ALERT_KIND_STATE not in kinds(core)


async def test_a_lagging_event_loop_counts_as_a_slow_response(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    a.connect()
    a.beat(loop_lag_ms=5500)
    assert a.view.state == CRITICAL
    await clock.advance(1.0)
    a.beat(loop_lag_ms=3)
    assert a.view.state == HEALTHY


async def test_a_closed_stream_not_back_within_the_grace_is_failed(clock: FakeClock) -> None:
    core = make(clock, reconnect_grace_s=3.0)
    a, b = Agent(core, clock, "a1"), Agent(core, clock, "b1")
    a.connect()
    b.connect()
    a.close()
    b.close()
    await advance(clock, core, 1.0)
    b.connect()  # back within the grace
    await advance(clock, core, 1.0)
    b.beat()
    await advance(clock, core, 1.05)
    assert a.view.state == FAILED
    assert "closed" in a.view.reason
    assert b.view.state == HEALTHY
    # a pool that is gone: the replacement goes to another pool
    core.set_pools([PoolInfo("pool-2", "127.0.0.1:2", 4)])
    c = Agent(core, clock, "c1")
    c.connect()
    core.take_actions()
    c.close()
    await advance(clock, core, 3.1)
    (replace,) = [x for x in core.take_actions() if isinstance(x, Replace)]
    assert replace.pool_id == "pool-2"
    assert not replace.own_pool


async def test_a_stale_stream_of_a_reconnected_agent_is_ignored(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    a.connect()
    old = a.stream
    a.connect()  # a reconnect that raced the old stream
    assert None in a.directives  # the old stream is told to close
    core.disconnect("a1", old)  # the old stream ends afterwards: not a disconnect
    await advance(clock, core, 0.5)
    a.beat()
    await advance(clock, core, 6.0)  # past the reconnect grace; heartbeats stopped at 0.5 s
    assert a.view.state == CRITICAL  # silence, not "stream closed"


async def test_a_new_monitor_starts_every_timer_at_takeover(clock: FakeClock) -> None:
    core = make(clock, takeover_grace_s=5.0)
    degraded = hpb.AgentHealth(
        agent_id="r1",
        pool_id="pool-1",
        state=DEGRADED,
        reason="old",
        info=hpb.AgentInfo(pool_id="pool-1", capacity=1),
    )
    core.load([degraded], [("r1", "pool-1"), ("r2", "pool-1"), ("r3", "pool-1")])
    await advance(clock, core, 4.9)
    # not judged during the grace: nobody is marked worse for not having reconnected yet
    assert {v.agent_id: v.state for v in core.agents.values()} == {
        "r1": DEGRADED,
        "r2": HEALTHY,
        "r3": HEALTHY,
    }
    a = Agent(core, clock, "r2")
    a.connect()
    b = Agent(core, clock, "r1")
    b.connect()
    assert b.view.state == HEALTHY
    for _ in range(5):
        await advance(clock, core, 1.0)
        a.beat()
        b.beat()
    # r3 never came back: its silence counts from the takeover, so FAILED 10 s after it
    assert core.agents["r3"].state == CRITICAL
    await advance(clock, core, 0.2)
    a.beat()
    b.beat()
    assert core.agents["r3"].state == FAILED
    assert "none since this monitor took over" in core.agents["r3"].reason
    assert a.view.state == b.view.state == HEALTHY


async def test_a_loaded_ejection_keeps_its_remaining_time(clock: FakeClock) -> None:
    core = make(clock)
    rec = hpb.AgentHealth(
        agent_id="e1",
        state=HEALTHY,
        breaker=OPEN,
        ejections=1,
        ejected_until_us=clock.wall_us() + 3_000_000,
        info=hpb.AgentInfo(pool_id="pool-1", capacity=1),
    )
    core.load([rec], [])
    a = Agent(core, clock, "e1")
    a.connect()
    assert a.told("pause")  # told again on its new stream
    await advance(clock, core, 2.9)
    a.beat()
    assert a.view.breaker.state == OPEN
    await advance(clock, core, 0.2)
    assert a.view.breaker.state == HALF_OPEN


async def test_a_monitor_that_did_not_run_for_a_while_judges_nobody_for_it(
    clock: FakeClock,
) -> None:
    # SIGSTOP and SIGCONT, a blocked event loop: the agents kept heartbeating into
    # buffers the monitor did not read; their silence is its own
    core = make(clock, stall_limit_s=5.0)
    a, b = Agent(core, clock, "a1"), Agent(core, clock, "b1")
    start = clock.wall_us()
    a.connect(tasks=[task("t1", 3, start)])
    b.connect()
    await advance(clock, core, 0.5)
    b.close()  # its stream broke just before: its reconnect waits in the backlog too
    await clock.advance(12.0)  # past failed_after_s, reconnect_grace_s, stall_limit_s
    core.tick()  # the timer fires before the backlog is read
    assert {v.agent_id: v.state for v in core.agents.values()} == {"a1": HEALTHY, "b1": HEALTHY}
    assert not core.take_actions()
    assert not core.alerts
    assert core.summary().failed_declared == 0
    a.beat(tasks=[task("t1", 3, start, progress_us=clock.wall_us())])
    b.connect()
    assert not a.told("replace")
    assert not a.told("drain")
    # from then on it judges again: an agent that stays silent is FAILED on time
    await live(clock, core, [b], 10.2)
    assert a.view.state == FAILED
    assert b.view.state == HEALTHY


# ---------------------------------------------------------------- latency


async def test_baseline_follows_latency_and_a_sustained_rise_alerts(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    a.connect()
    for _ in range(30):
        await clock.advance(0.5)
        a.beat(outcomes=[ok(ms=100.0)])
    assert a.view.baseline_ms == pytest.approx(100.0)
    # a rise of 60 %: noticed once the recent average has climbed ...
    for _ in range(20):
        await clock.advance(0.5)
        a.beat(outcomes=[ok(ms=160.0)])
        if a.view.rise_since is not None:
            break
    assert a.view.rise_since is not None
    baseline = a.view.baseline_ms
    # ... and alerted only once it has lasted the window (5 s)
    for _ in range(9):
        await clock.advance(0.5)
        a.beat(outcomes=[ok(ms=160.0)])
        assert not a.view.latency_alert
    await clock.advance(0.5)
    a.beat(outcomes=[ok(ms=160.0)])
    assert a.view.latency_alert
    assert K.ALERT_KIND_PREDICTIVE in kinds(core)
    assert a.view.baseline_ms == baseline  # held still while the rise is judged
    assert a.view.state == HEALTHY  # predictive: before any state threshold
    for _ in range(6):
        await clock.advance(0.5)
        a.beat(outcomes=[ok(ms=100.0)])
    assert not a.view.latency_alert
    assert K.ALERT_KIND_PREDICTIVE not in kinds(core)


async def test_a_short_spike_raises_no_alert(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    a.connect()
    for _ in range(20):
        await clock.advance(0.5)
        a.beat(outcomes=[ok(ms=100.0)])
    for ms in (400.0, 400.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0, 100.0):
        await clock.advance(0.5)
        a.beat(outcomes=[ok(ms=ms)])
    assert not a.view.latency_alert


async def test_a_lasting_rise_becomes_the_new_baseline(clock: FakeClock) -> None:
    core = make(clock, rebaseline_after_s=20.0)
    a = Agent(core, clock, "a1")
    a.connect()
    for _ in range(20):
        await clock.advance(1.0)
        a.beat(outcomes=[ok(ms=100.0)])
    for _ in range(25):
        await clock.advance(1.0)
        a.beat(outcomes=[ok(ms=300.0)])
    assert not a.view.latency_alert
    assert a.view.baseline_ms == pytest.approx(300.0, rel=0.05)


# ---------------------------------------------------------------- hung work


async def test_a_task_without_progress_past_the_stall_limit_is_released(
    clock: FakeClock,
) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    start = clock.wall_us()
    a.connect(tasks=[task("t1", 42, start)])
    await advance(clock, core, 2.0)
    a.beat(tasks=[task("t1", 42, start)])
    assert not core.take_actions()
    await advance(clock, core, 1.0)
    (release,) = core.take_actions()
    assert isinstance(release, Release)
    assert release.hung
    assert release.claims == [("t1", 42)]
    assert "no progress" in release.reason
    assert K.ALERT_KIND_HUNG_TASK in kinds(core)
    core.release_done(release, [("t1", 42)])
    assert a.view.breaker.consecutive == 1  # a hung task counts against the agent
    assert core.summary().hung_released == 1
    await advance(clock, core, 0.5)
    a.beat(tasks=[task("t1", 42, start)])
    assert not core.take_actions()  # released once
    a.beat(tasks=[])  # the coordinator's cancel stopped it
    assert K.ALERT_KIND_HUNG_TASK not in kinds(core)


async def test_progress_keeps_a_long_task_alive(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    start = clock.wall_us()
    a.connect(tasks=[task("t1", 1, start)])
    for _ in range(10):
        await advance(clock, core, 1.0)
        a.beat(tasks=[task("t1", 1, start, progress_us=clock.wall_us() - 500_000)])
    assert not core.take_actions()


async def test_agent_and_monitor_clocks_may_disagree(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    skew = 3_600_000_000  # the agent's clock is an hour ahead
    start = clock.wall_us() + skew
    a.connect(tasks=[task("t1", 1, start)], sent_at_us=start)
    await advance(clock, core, 2.0)
    a.beat(tasks=[task("t1", 1, start)], sent_at_us=clock.wall_us() + skew)
    assert not core.take_actions()
    await advance(clock, core, 1.05)
    assert [x.claims for x in core.take_actions()] == [[("t1", 1)]]


async def test_a_task_past_its_deadline_is_hung(clock: FakeClock) -> None:
    core = make(clock, stall_limit_s=100.0, deadline_grace_s=1.0)
    a = Agent(core, clock, "a1")
    start = clock.wall_us()
    a.connect(tasks=[task("t1", 1, start, timeout_s=2.0)])
    for _ in range(4):
        await advance(clock, core, 0.9)
        # progressing, but past its deadline: the agent's own timeout did not fire
        a.beat(tasks=[task("t1", 1, start, progress_us=clock.wall_us(), timeout_s=2.0)])
    (release,) = core.take_actions()
    assert "deadline" in release.reason  # type: ignore[union-attr]


async def test_tasks_of_a_silent_agent_are_not_judged(clock: FakeClock) -> None:
    core = make(clock, failed_after_s=30.0)
    a = Agent(core, clock, "a1")
    a.connect(tasks=[task("t1", 1, clock.wall_us())])
    await advance(clock, core, 5.0)  # no heartbeat: its task view is stale
    assert not [x for x in core.take_actions() if isinstance(x, Release)]


async def test_a_released_task_that_keeps_running_gets_its_agent_replaced(
    clock: FakeClock,
) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    start = clock.wall_us()
    a.connect(tasks=[task("t1", 9, start)])
    await advance(clock, core, 3.0)
    a.beat(tasks=[task("t1", 9, start)])
    (release,) = core.take_actions()
    core.release_done(release, [("t1", 9)])  # type: ignore[arg-type]
    for _ in range(2):
        await advance(clock, core, 0.6)
        a.beat(tasks=[task("t1", 9, start)])  # the cancel did not stop it
    (replace,) = a.told("replace")
    assert "does not stop" in replace.replace.reason
    # its pool replaces it: the old agent leaves, the new one reports as its successor
    a.beat(leaving=True)
    assert "a1" not in core.agents
    b = Agent(core, clock, "a2", replaces="a1")
    b.connect()
    assert b.view.replaces == "a1"


async def test_a_task_whose_claim_had_moved_on_is_not_a_hang(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    start = clock.wall_us()
    a.connect(tasks=[task("t1", 5, start)])
    await advance(clock, core, 2.0)
    a.beat(tasks=[task("t1", 5, start)])
    await advance(clock, core, 1.0)
    (release,) = core.take_actions()
    core.release_done(release, [])  # type: ignore[arg-type]  # skipped: its lease had expired
    assert a.view.breaker.consecutive == 0
    assert K.ALERT_KIND_HUNG_TASK not in kinds(core)
    for _ in range(5):  # it lingers on the agent a while: no replacement for that
        await advance(clock, core, 1.0)
        a.beat(tasks=[task("t1", 5, start)])
    assert not a.told("replace")
    assert not core.take_actions()  # and no second release
    assert core.summary().hung_released == 0


async def test_a_failed_release_is_tried_again_after_a_pause(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    start = clock.wall_us()
    a.connect(tasks=[task("t1", 5, start)])
    await advance(clock, core, 2.0)
    a.beat(tasks=[task("t1", 5, start)])
    await advance(clock, core, 1.0)
    (release,) = core.take_actions()
    assert isinstance(release, Release)
    core.release_done(release, [], error="coordinator unreachable")
    a.beat(tasks=[task("t1", 5, start)])
    await advance(clock, core, 0.5)
    assert not core.take_actions()
    await advance(clock, core, 0.6)
    a.beat(tasks=[task("t1", 5, start)])
    assert [x.claims for x in core.take_actions()] == [[("t1", 5)]]


# ---------------------------------------------------------------- the breaker


async def test_breaker_opens_half_opens_closes_and_grows(clock: FakeClock) -> None:
    core = make(clock)
    agents = [Agent(core, clock, f"a{i}") for i in range(4)]
    for x in agents:
        x.connect()
    a = agents[0]
    a.beat(outcomes=[fail(f"t{i}") for i in range(4)])
    assert a.view.breaker.state == CLOSED
    a.beat(outcomes=[fail("t4")])
    assert a.view.breaker.state == OPEN
    assert a.view.admission == NONE
    assert core.record("a0").admission == NONE  # type: ignore[union-attr]
    assert a.told("pause")[0].pause.until_us == clock.wall_us() + 10_000_000
    assert K.ALERT_KIND_EJECTED in kinds(core)
    a.beat(outcomes=[fail("late")])  # work started before the ejection: ignored
    assert a.view.breaker.ejections == 1
    await live(clock, core, agents, 9.9)
    assert a.view.breaker.state == OPEN
    await advance(clock, core, 0.2)
    assert a.view.breaker.state == HALF_OPEN
    assert a.view.admission == ONE
    assert a.told("resume")[-1].resume.half_open
    assert "a0" in core.take_dirty()  # the record says ONE: the coordinator arms a trial
    await live(clock, core, agents, 10.0)
    assert "a0" in core.take_dirty()  # no outcome for a while: the record is written again
    a.beat(outcomes=[fail("trial")])  # failed on trial: ejected again, for longer
    assert a.view.breaker.state == OPEN
    assert a.view.breaker.ejections == 2
    assert a.view.breaker.open_until == pytest.approx(clock.monotonic() + 20.0)
    await live(clock, core, agents, 20.1)
    assert a.view.breaker.state == HALF_OPEN
    a.beat(outcomes=[ok("trial")])
    assert a.view.breaker.state == CLOSED
    assert a.view.admission == ALL
    assert not a.told("resume")[-1].resume.half_open
    assert K.ALERT_KIND_EJECTED not in kinds(core)
    assert core.record("a0") is not None  # the ejection count is remembered ...
    await live(clock, core, agents, 61.0)
    assert a.view.breaker.ejections == 1  # ... and decays while it behaves
    await live(clock, core, agents, 61.0)
    assert a.view.breaker.ejections == 0
    assert core.record("a0") is None


async def test_an_error_rate_over_the_threshold_opens_the_breaker(clock: FakeClock) -> None:
    core = make(clock, breaker_min_outcomes=10, breaker_error_rate=0.5)
    agents = [Agent(core, clock, f"a{i}") for i in range(4)]
    for x in agents:
        x.connect()
    a = agents[0]
    for i in range(4):
        a.beat(outcomes=[ok(f"o{i}"), fail(f"f{i}")])
    assert a.view.breaker.state == CLOSED  # 8 outcomes: not enough to judge a rate
    a.beat(outcomes=[ok("o9"), fail("f9")])
    assert a.view.breaker.state == OPEN
    assert "5 of 10" in a.view.reason


async def test_failures_that_are_the_tasks_fault_do_not_count(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a1")
    a.connect()
    a.beat(outcomes=[fail(f"t{i}", retryable=False) for i in range(20)])
    assert a.view.breaker.state == CLOSED


async def test_no_more_than_the_cap_is_ejected_at_once(clock: FakeClock) -> None:
    core = make(clock, max_ejected_share=0.5)
    agents = [Agent(core, clock, f"a{i}") for i in range(4)]
    for x in agents:
        x.connect()
    for x in agents[:3]:
        x.beat(outcomes=[fail(f"t{i}") for i in range(5)])
    states = [x.view.breaker.state for x in agents]
    assert states == [OPEN, OPEN, CLOSED, CLOSED]
    assert K.ALERT_KIND_EJECTION_CAP in kinds(core)
    assert agents[2].view.admission == ALL
    # once one comes back, the third can go
    await live(clock, core, agents, 10.1)
    agents[2].beat(outcomes=[fail("again")])
    assert agents[2].view.breaker.state == OPEN
    assert K.ALERT_KIND_EJECTION_CAP not in kinds(core)


# ---------------------------------------------------------------- recovery


async def test_replacements_that_keep_failing_escalate_after_three(clock: FakeClock) -> None:
    core = make(clock, reconnect_grace_s=1.0)
    agents = [Agent(core, clock, f"x{i}") for i in range(3)]
    for x in agents:
        x.connect()
    current = Agent(core, clock, "a0")
    current.connect()
    for n in range(1, 4):
        current.close()
        await advance(clock, core, 1.05)
        for x in agents:
            x.beat()
        assert current.view.state == FAILED
        replaces = [x for x in core.take_actions() if isinstance(x, Replace)]
        assert len(replaces) == 1, f"round {n}"
        core.replace_done(current.agent_id, f"a{n}")
        successor = Agent(core, clock, f"a{n}")
        successor.connect()
        assert successor.view.replaces == current.agent_id
        assert current.view.replaced_by == f"a{n}"
        current = successor
    # the third replacement fails within its probation too: no fourth, an escalation
    current.close()
    await advance(clock, core, 1.05)
    assert current.view.state == FAILED
    assert not [x for x in core.take_actions() if isinstance(x, Replace)]
    assert current.view.escalated
    assert K.ALERT_KIND_ESCALATION in kinds(core)
    assert core.record(current.agent_id).replacement_failures == 3  # type: ignore[union-attr]


async def test_a_replacement_that_survives_probation_resets_the_count(clock: FakeClock) -> None:
    core = make(clock, reconnect_grace_s=1.0, replace_probation_s=5.0)
    a = Agent(core, clock, "a0")
    a.connect()
    a.close()
    await advance(clock, core, 1.05)
    core.take_actions()
    b = Agent(core, clock, "a1", replaces="a0")
    b.connect()
    b.close()  # fails within its probation
    await advance(clock, core, 1.05)
    core.take_actions()
    c = Agent(core, clock, "a2", replaces="a1")
    c.connect()
    assert c.view.lineage_failures == 1
    for _ in range(6):
        await advance(clock, core, 1.0)
        c.beat()
    assert c.view.lineage_failures == 0


async def test_failed_replacement_orders_are_retried_then_escalated(clock: FakeClock) -> None:
    core = make(clock, reconnect_grace_s=1.0, replace_retry_s=2.0)
    core.set_pools([])
    a = Agent(core, clock, "a0")
    a.connect()
    a.close()
    await advance(clock, core, 1.05)
    assert a.view.lineage_failures == 1  # no pool to host it: a failed replacement
    await advance(clock, core, 2.0)
    assert a.view.lineage_failures == 2
    core.set_pools([PoolInfo("pool-9", "127.0.0.1:9")])
    await advance(clock, core, 2.0)
    (replace,) = [x for x in core.take_actions() if isinstance(x, Replace)]
    assert replace.pool_id == "pool-9"
    core.replace_failed("a0", "SpawnAgents: UNAVAILABLE")
    assert a.view.escalated
    await advance(clock, core, 5.0)
    assert not [x for x in core.take_actions() if isinstance(x, Replace)]


async def test_a_dead_pool_that_is_still_registered_is_skipped_at_once(
    clock: FakeClock,
) -> None:
    core = make(clock, reconnect_grace_s=1.0)
    a = Agent(core, clock, "a0", pool_id="pool-1")
    a.connect()
    a.close()
    await advance(clock, core, 1.05)
    (first,) = [x for x in core.take_actions() if isinstance(x, Replace)]
    assert first.pool_id == "pool-1"
    assert first.own_pool
    core.pool_unreachable("a0", "pool-1", "connection refused")
    (second,) = [x for x in core.take_actions() if isinstance(x, Replace)]
    assert second.pool_id == "pool-2"
    assert not second.own_pool
    assert a.view.lineage_failures == 0


async def test_a_replacement_that_never_reports_counts_as_failed(clock: FakeClock) -> None:
    core = make(clock, reconnect_grace_s=1.0, replace_timeout_s=5.0, replace_retry_s=1.0)
    a = Agent(core, clock, "a0")
    a.connect()
    a.close()
    await advance(clock, core, 1.05)
    assert len([x for x in core.take_actions() if isinstance(x, Replace)]) == 1
    core.replace_done("a0", "a9")  # the pool started it, but it never reports
    await advance(clock, core, 5.0)
    assert a.view.lineage_failures == 1
    await advance(clock, core, 1.1)
    assert len([x for x in core.take_actions() if isinstance(x, Replace)]) == 1


async def test_a_failed_agent_that_comes_back_after_its_replacement_is_drained(
    clock: FakeClock,
) -> None:
    core = make(clock)
    a = Agent(core, clock, "a0")
    a.connect()
    await advance(clock, core, 10.1)  # frozen: no heartbeat
    assert a.view.state == FAILED
    core.replace_done("a0", "a1")
    Agent(core, clock, "a1").connect()
    a.beat()  # it thawed
    (drain,) = a.told("drain")
    assert "replaced by a1" in drain.drain.reason
    assert a.view.state == FAILED
    a.beat(leaving=True)
    assert "a0" not in core.agents
    assert core.record("a0") is None


async def test_a_failed_agent_nothing_replaced_recovers(clock: FakeClock) -> None:
    core = make(clock, max_replacements=1)
    core.set_pools([])
    a = Agent(core, clock, "a0")
    a.connect()
    await advance(clock, core, 10.1)
    assert a.view.state == FAILED
    assert a.view.escalated
    a.beat()
    assert a.view.state == HEALTHY
    assert not a.view.escalated
    assert not core.alerts


async def test_a_pool_restart_reusing_an_id_is_a_new_agent(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "pool-1-a0001", incarnation="run-1")
    a.connect()
    await advance(clock, core, 10.1)
    assert a.view.state == FAILED
    b = Agent(core, clock, "pool-1-a0001", incarnation="run-2")
    b.connect()
    assert b.view.state == HEALTHY
    assert not b.told("drain")


async def test_another_incarnation_cannot_take_a_live_agents_id(clock: FakeClock) -> None:
    # as the coordinator's hello: a second process reporting under a live agent's id
    # (a copied --pool-id, a hostile client) is refused, instead of closing the real
    # agent's stream and speaking for it (a `leaving` from it wiped the agent's
    # record, and with it an ejection the coordinator enforced)
    core = make(clock, failed_after_s=30.0)
    real = Agent(core, clock, "pool-1-a0001", incarnation="run-1")
    real.connect()
    for i in range(3):  # under the ejection cap
        Agent(core, clock, f"pool-1-b{i}").connect()
    for _ in range(5):
        real.beat(outcomes=[fail()])
    assert real.view.breaker.state == OPEN
    core.take_dirty()
    for incarnation in ("run-2", ""):
        impostor = Agent(core, clock, "pool-1-a0001", pool_id="pool-9", incarnation=incarnation)
        with pytest.raises(AlreadyExistsError, match="'pool-1-a0001' reports already"):
            impostor.connect(leaving=True)
    assert None not in real.directives  # its stream stays
    assert real.view.info.pool_id == "pool-1"
    assert real.view.breaker.state == OPEN
    assert not core.take_dirty()  # its record stays
    # the same run reconnecting (it saw the break first) still takes over its stream
    again = Agent(core, clock, "pool-1-a0001", incarnation="run-1")
    again.connect()
    assert None in real.directives
    # a restarted pool (another run) takes the id once the old agent stopped answering
    await advance(clock, core, 2.1)
    assert again.view.state == DEGRADED
    restarted = Agent(core, clock, "pool-1-a0001", incarnation="run-3")
    restarted.connect()
    assert restarted.view.info.incarnation == "run-3"


async def test_only_a_registered_agent_is_replaced_through_a_pool(clock: FakeClock) -> None:
    # a Report stream under a made-up id, then gone: a pool must not start a real agent
    # for it (one stream each, and the pools grew without bound)
    core = make(clock)
    ghost = Agent(core, clock, "ghost-1", registered=False, pool_id="")
    real = Agent(core, clock, "pool-1-a0001")
    seen: list[hpb.HealthEvent] = []
    core.subscribers.add(seen.append)
    for a in (ghost, real):
        a.connect()
        a.close()
    await advance(clock, core, 5.1)
    assert ghost.view.state == real.view.state == FAILED
    replaced = [x.agent_id for x in core.take_actions() if isinstance(x, Replace)]
    assert replaced == ["pool-1-a0001"]
    (refused,) = [
        e.recovery for e in seen if e.recovery.agent_id == "ghost-1" and not e.recovery.ok
    ]
    assert "never registered" in refused.detail
    assert core.record("ghost-1").registered is False  # type: ignore[union-attr]
    assert core.record("pool-1-a0001").registered  # type: ignore[union-attr]
    # the next monitor trusts what the record says
    later = make(clock)
    later.load([core.record("pool-1-a0001"), core.record("ghost-1")], [])  # type: ignore[list-item]
    assert later.agents["pool-1-a0001"].registered
    assert not later.agents["ghost-1"].registered


async def test_an_agent_that_leaves_is_forgotten(clock: FakeClock) -> None:
    core = make(clock)
    a = Agent(core, clock, "a0")
    a.connect()
    a.beat(leaving=True)
    a.close()
    await advance(clock, core, 20.0)
    assert "a0" not in core.agents
    assert core.summary().failed_declared == 0


async def test_list_pages_in_agent_order_and_filters_states(clock: FakeClock) -> None:
    core = make(clock)
    for i in range(5):
        Agent(core, clock, f"a{i}").connect()
    page, token = core.page([], 2, "")
    assert [h.agent_id for h in page] == ["a0", "a1"]
    assert token == "a1"
    page, token = core.page([], 2, token)
    assert [h.agent_id for h in page] == ["a2", "a3"]
    page, token = core.page([], 2, token)
    assert [h.agent_id for h in page] == ["a4"]
    assert token == ""
    assert core.page([FAILED], 100, "") == ([], "")
    with pytest.raises(InvalidArgumentError):
        core.page([], 1001, "")


# ---------------------------------------------------------------- limits


def _valid() -> hpb.Heartbeat:
    return hpb.Heartbeat(
        agent_id="a1", sent_at_us=1, info=hpb.AgentInfo(capacity=1, kinds=["sleep"])
    )


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda h: setattr(h, "agent_id", ""), "agent_id"),
        (lambda h: setattr(h, "agent_id", "a/b"), "agent_id"),
        (lambda h: setattr(h, "agent_id", "a" * 129), "agent_id"),
        (lambda h: h.ClearField("info"), "info"),
        (lambda h: setattr(h.info, "capacity", 0), "info.capacity"),
        (lambda h: setattr(h.info, "pool_id", "p" * 129), "info.pool_id"),
        (lambda h: setattr(h.info, "incarnation", "i" * 65), "info.incarnation"),
        (lambda h: h.info.kinds.extend(["k"] * 32), "info.kinds"),
        (lambda h: h.info.roles.append("r" * 65), "info.roles"),
        (lambda h: h.info.labels.update({f"k{i}": "v" for i in range(33)}), "info.labels"),
        (lambda h: h.info.labels.update({"k": "v" * 257}), "info.labels"),
        (lambda h: setattr(h.info, "replaces", "x y"), "info.replaces"),
        (lambda h: setattr(h, "sent_at_us", 0), "sent_at_us"),
        (lambda h: h.tasks.extend([hpb.TaskInFlight(task_id="t")] * 1001), "tasks"),
        (lambda h: h.tasks.append(hpb.TaskInFlight(task_id="")), "task_id"),
        (lambda h: h.tasks.append(hpb.TaskInFlight(task_id="t", timeout_s=-1)), "timeout_s"),
        (
            lambda h: h.tasks.append(hpb.TaskInFlight(task_id="t", timeout_s=float("nan"))),
            "timeout_s",
        ),
        (lambda h: h.tasks.append(hpb.TaskInFlight(task_id="t", started_at_us=-5)), "times"),
        (lambda h: h.outcomes.extend([hpb.TaskOutcome(task_id="t")] * 65), "outcomes"),
        (
            lambda h: h.outcomes.append(hpb.TaskOutcome(task_id="t", error="é" * 257)),
            "error",
        ),
        (
            lambda h: h.outcomes.append(hpb.TaskOutcome(task_id="t", latency_ms=float("inf"))),
            "latency_ms",
        ),
        (lambda h: setattr(h, "loop_lag_ms", 4e6), "loop_lag_ms"),
        (lambda h: setattr(h.process, "cpu_seconds", -1.0), "cpu_seconds"),
    ],
)
def test_a_heartbeat_over_any_limit_is_refused_naming_the_field(mutate: Any, field: str) -> None:
    hb = _valid()
    validate_heartbeat(hb, first=True)
    mutate(hb)
    with pytest.raises(InvalidArgumentError, match=field.split(".")[-1]):
        validate_heartbeat(hb, first=True)


def test_the_largest_valid_heartbeat_is_accepted() -> None:
    hb = hpb.Heartbeat(
        agent_id="a" * 128,
        sent_at_us=2**62,
        info=hpb.AgentInfo(
            pool_id="p" * 128,
            incarnation="i" * 64,
            kinds=["k" * 64] * 32,
            roles=["r" * 64] * 32,
            labels={f"{i:0>64}": "v" * 256 for i in range(32)},
            capacity=1000,
            replaces="z" * 128,
        ),
        tasks=[
            hpb.TaskInFlight(
                task_id=f"{i:0>128}",
                claim_token=2**62,
                started_at_us=2**62,
                last_progress_at_us=2**62,
                timeout_s=1e6,
            )
            for i in range(1000)
        ],
        outcomes=[
            hpb.TaskOutcome(task_id="t" * 128, latency_ms=8.64e7, error="e" * 512, retryable=True)
            for _ in range(64)
        ],
        loop_lag_ms=3.6e6,
    )
    validate_heartbeat(hb, first=True)
    assert hb.ByteSize() < 400_000


def test_thresholds_must_grow() -> None:
    with pytest.raises(ValueError, match="grow"):
        HealthConfig(degraded_after_s=5.0, critical_after_s=2.0)


async def test_metrics_follow_the_core(clock: FakeClock) -> None:
    from prometheus_client import REGISTRY

    from services.health import metrics

    core = make(clock)
    core.subscribers.add(metrics.watch(core))
    a = Agent(core, clock, "m1")
    a.connect()

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    alerts_before = value("agentmesh_health_alerts_total", kind="state")
    assert value("agentmesh_health_agents", state="HEALTHY") == 1
    await advance(clock, core, 2.5)
    assert value("agentmesh_health_agents", state="DEGRADED") == 1
    assert value("agentmesh_health_alerts_total", kind="state") == alerts_before + 1
    assert value("agentmesh_health_open_alerts") == 1
    released = value("agentmesh_health_recoveries_total", kind="release", outcome="ok")
    await advance(clock, core, 8.0)
    (release,) = [x for x in core.take_actions() if isinstance(x, Release)]
    core.release_done(release, [])
    assert value("agentmesh_health_recoveries_total", kind="release", outcome="ok") == released + 1
