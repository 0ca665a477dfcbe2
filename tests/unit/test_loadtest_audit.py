"""The exactly-once verdict from plain data (no RPCs), and the tracker's part in it: what
it hands `audit()` after a run's events (no sockets, no cluster)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from loadtest.audit import audit, repeats_first
from loadtest.metrics import RunMetrics
from loadtest.tracker import Tracker
from protos.agentmesh.v1 import task_pb2 as tpb

S = tpb


def task(tid: str, state: int, *, attempts: int = 1, token: int = 1, agent: str = "a1") -> Any:
    return tpb.Task(
        task_id=tid, state=state, attempts=attempts, claim_token=token, agent_id=agent, term=3
    )


def done(*ids: str, state: int = S.TASK_STATE_SUCCEEDED) -> dict[str, Any]:
    return {t: task(t, state) for t in ids}


def test_every_acknowledged_task_terminal_once_is_ok() -> None:
    v = audit(
        acknowledged=["a", "b", "c"],
        stored={**done("a", "b"), **done("c", state=S.TASK_STATE_DEAD_LETTER)},
        first_terminal={"a": S.TASK_STATE_SUCCEEDED, "b": S.TASK_STATE_SUCCEEDED},
    )
    assert v.ok
    assert v.terminal_states == {"SUCCEEDED": 2, "DEAD_LETTER": 1}
    assert v.lost == v.unfinished == v.duplicated == v.late == []


def test_an_acknowledged_task_the_store_does_not_have_is_lost() -> None:
    v = audit(acknowledged=["a", "b"], stored=done("a"), first_terminal={})
    assert v.lost == ["b"]
    assert not v.ok


def test_a_task_not_terminal_is_unfinished_with_its_state_and_an_example() -> None:
    stored = {**done("a"), "b": task("b", S.TASK_STATE_ASSIGNED, agent="pool-1-a7")}
    v = audit(acknowledged=["a", "b"], stored=stored, first_terminal={})
    assert v.unfinished == ["b"]
    assert v.unfinished_states == {"ASSIGNED": 1}
    assert v.unfinished_examples[0]["agent_id"] == "pool-1-a7"
    assert v.unfinished_examples[0]["state"] == "ASSIGNED"
    assert not v.ok


def test_unfinished_examples_are_bounded() -> None:
    ids = [f"t{i:03d}" for i in range(50)]
    stored = {t: task(t, S.TASK_STATE_QUEUED) for t in ids}
    v = audit(acknowledged=ids, stored=stored, first_terminal={})
    assert len(v.unfinished) == 50
    assert len(v.unfinished_examples) == 10


def test_a_store_that_disagrees_with_the_stream_is_a_double_completion() -> None:
    v = audit(
        acknowledged=["a", "b"],
        stored={**done("a"), **done("b", state=S.TASK_STATE_DEAD_LETTER)},
        first_terminal={"a": S.TASK_STATE_SUCCEEDED, "b": S.TASK_STATE_SUCCEEDED},
    )
    assert v.disagreed == ["b"]
    assert v.duplicated == ["b"]
    assert not v.ok


def test_double_completions_seen_live_are_kept_and_not_counted_twice() -> None:
    v = audit(
        acknowledged=["a", "b"],
        stored={**done("a"), **done("b", state=S.TASK_STATE_CANCELLED)},
        first_terminal={"a": S.TASK_STATE_SUCCEEDED, "b": S.TASK_STATE_SUCCEEDED},
        completed_twice=["a", "b"],
    )
    assert v.duplicated == ["a", "b"]
    assert v.disagreed == ["b"]


def test_a_failed_submit_that_reached_the_store_is_held_to_the_same_rule() -> None:
    stored = {**done("a"), "late": task("late", S.TASK_STATE_RUNNING)}
    v = audit(
        acknowledged=["a"],
        unacknowledged=["late", "never"],
        stored=stored,
        first_terminal={},
    )
    assert v.late == ["late"]
    assert v.unfinished == ["late"]
    assert v.lost == []  # "never" was not acknowledged and is not stored: not lost


def test_retries_count_the_attempts_beyond_the_first() -> None:
    stored = {"a": task("a", S.TASK_STATE_SUCCEEDED, attempts=3), **done("b")}
    assert audit(acknowledged=["a", "b"], stored=stored, first_terminal={}).retries == 2


@pytest.mark.parametrize(
    ("first", "tokens", "state", "token", "repeat"),
    [
        (S.TASK_STATE_SUCCEEDED, {5}, S.TASK_STATE_SUCCEEDED, 5, True),  # a replayed event
        (S.TASK_STATE_SUCCEEDED, {5}, S.TASK_STATE_SUCCEEDED, 6, False),  # a second agent
        (S.TASK_STATE_SUCCEEDED, {5}, S.TASK_STATE_DEAD_LETTER, 5, False),
        (S.TASK_STATE_DEAD_LETTER, set(), S.TASK_STATE_DEAD_LETTER, 9, True),
        (S.TASK_STATE_CANCELLED, set(), S.TASK_STATE_SUCCEEDED, 9, False),
    ],
)
def test_what_repeats_the_first_terminal_record(
    first: int, tokens: set[int], state: int, token: int, repeat: bool
) -> None:
    assert repeats_first(first, tokens, state, token) is repeat


# ---------------------------------------------------------------- the tracker's part


class NoClient:
    """The tracker's record keeping makes no call; the loops (not run here) would."""

    counters: Any = None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now

    def wall_us(self) -> int:
        return int(self.now * 1e6)


def tracker(*ids: str) -> Tracker:
    clock = Clock()
    t = Tracker(NoClient(), RunMetrics(start_s=clock.now), clock)  # type: ignore[arg-type]
    t.sent(list(ids), clock.now, clock.wall_us())
    return t


def event(t: Any, previous: int = S.TASK_STATE_RUNNING) -> Any:
    return tpb.TaskEvent(task=t, previous_state=previous)


def test_an_event_that_beats_its_acknowledgement_is_applied_after_it() -> None:
    t = tracker("a")
    t.on_event(event(task("a", S.TASK_STATE_SUCCEEDED)), 100.1)
    assert t.completed == 0  # not acknowledged yet: kept aside
    assert t.acknowledged(task("a", S.TASK_STATE_QUEUED), 100.2, 0)
    assert t.completed == 1
    assert not t.inflight
    assert t.first_terminal() == {"a": S.TASK_STATE_SUCCEEDED}


def test_a_success_under_a_second_claim_is_handed_to_the_audit() -> None:
    t = tracker("a", "b")
    for tid in ("a", "b"):
        t.acknowledged(task(tid, S.TASK_STATE_QUEUED), 100.0, 0)
    t.on_event(event(task("a", S.TASK_STATE_SUCCEEDED, token=1)), 100.1)
    t.on_event(event(task("a", S.TASK_STATE_SUCCEEDED, token=1)), 100.2)  # replay
    t.on_event(event(task("b", S.TASK_STATE_SUCCEEDED, token=2)), 100.1)
    t.on_event(event(task("b", S.TASK_STATE_SUCCEEDED, token=3)), 100.2)  # a second agent
    assert t.completed == 2
    assert t.counters["replayed_events"] == 1
    v = audit(
        acknowledged=t.run_ids(),
        stored=done("a", "b"),
        first_terminal=t.first_terminal(),
        completed_twice=t.duplicated,
    )
    assert v.duplicated == ["b"]


def test_the_warm_up_task_is_not_part_of_the_run() -> None:
    t = tracker("a")
    t.sent(["w"], 100.0, 0, warmup=True)
    t.acknowledged(task("w", S.TASK_STATE_SUCCEEDED), 100.0, 0)
    t.acknowledged(task("a", S.TASK_STATE_QUEUED), 100.0, 0)
    assert t.warm.is_set()
    assert t.run_ids() == {"a"}
    assert t.completed == 0


class BatchedWatch:
    """WatchEvents as a leader that batches answers: one message with two events in
    `batched`, then one plain event (an older leader), then nothing more."""

    counters: Any = None

    def __init__(self, *messages: Any) -> None:
        self.messages = messages
        self.asked: list[int] = []

    def watch_events(self, states: Any = (), max_batch: int = 0) -> Any:
        self.asked.append(max_batch)
        messages = self.messages

        class Call:
            def __aiter__(self) -> Any:
                return self.gen()

            async def gen(self) -> Any:
                for m in messages:
                    yield m
                await asyncio.Event().wait()  # the stream stays open

            def cancel(self) -> None:
                pass

        return Call()


async def test_the_watch_takes_batched_and_plain_events_in_order() -> None:
    clock = Clock()
    batched = tpb.TaskEvent()
    batched.batched.extend(
        [event(task("a", S.TASK_STATE_SUCCEEDED)), event(task("b", S.TASK_STATE_SUCCEEDED))]
    )
    client = BatchedWatch(batched, event(task("c", S.TASK_STATE_SUCCEEDED)))
    t = Tracker(client, RunMetrics(start_s=clock.now), clock)  # type: ignore[arg-type]
    t.sent(["a", "b", "c"], clock.now, clock.wall_us())
    for tid in "abc":
        t.acknowledged(task(tid, S.TASK_STATE_QUEUED), 100.0, 0)
    loop = asyncio.ensure_future(t.watch_loop())
    try:
        for _ in range(100):
            if t.completed == 3:
                break
            await asyncio.sleep(0)
        assert t.completed == 3
        assert t.first_terminal() == {tid: S.TASK_STATE_SUCCEEDED for tid in "abc"}
        assert client.asked[0] > 1  # it asks for batches
    finally:
        loop.cancel()
