"""How a pool's agents follow an elected service (follow.py), with a fake clock: when a
stream must move, and the reconnect loop's backoff, which a new leader cuts short."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from services._common.clock import FakeClock
from services._common.errors import LEADER_METADATA_KEY
from services._common.follow import (
    Leader,
    LeaderClient,
    leading,
    named_leader,
    no_leader,
    reconnecting,
)


def leader(clock: FakeClock) -> Leader:
    return Leader(None, "health", clock)  # type: ignore[arg-type]  # etcd is not followed here


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_change_wakes_waiters_once_and_later_waiters_wait_for_the_next() -> None:
    followed = leader(FakeClock())
    first = followed.changed()
    followed.set("a:1")
    assert first.is_set()
    assert followed.endpoint == "a:1"
    second = followed.changed()
    assert not second.is_set()
    followed.set("a:1")  # the same leader again: no change
    assert not second.is_set()


async def test_a_stream_moves_when_the_leader_does_or_when_there_is_none() -> None:
    followed = leader(FakeClock())
    followed.set("a:1")
    moved = asyncio.ensure_future(followed.moved_from("a:1"))
    await settle()
    assert not moved.done()
    followed.set("")
    await asyncio.wait_for(moved, 1)


async def test_a_coordinator_stream_stays_until_another_leader_is_known() -> None:
    # a paused leader keeps its stream open but silent: leave it only for somewhere to go
    followed = leader(FakeClock())
    followed.set("a:1")
    moved = asyncio.ensure_future(followed.moved_from("a:1", to_none=False))
    followed.set("")
    await settle()
    assert not moved.done()
    followed.set("b:2")
    await asyncio.wait_for(moved, 1)


async def test_reconnects_back_off_and_a_new_leader_cuts_the_wait_short() -> None:
    clock = FakeClock(start=0.0)
    followed = leader(clock)
    followed.set("a:1")
    tried: list[tuple[float, str]] = []
    errors: list[Exception] = []

    async def session(endpoint: str) -> bool:
        tried.append((clock.monotonic(), endpoint))
        raise ConnectionError("refused")

    loop = asyncio.ensure_future(
        reconnecting(followed, session, on_error=errors.append, rng=random.Random(1))
    )
    try:
        await settle()
        await clock.advance(3.0)
        gaps = [b[0] - a[0] for a, b in zip(tried, tried[1:], strict=False)]
        # 25-50 ms first, then doubling up to a 1 s ceiling (each gap jittered in [d/2, d])
        assert 0.025 <= gaps[0] <= 0.05
        assert all(0.5 <= g <= 1.0 for g in gaps[5:])
        assert len(errors) == len(tried)
        count = len(tried)
        followed.set("b:2")  # mid-backoff: the next try is at once, at the new leader
        await settle()
        assert len(tried) == count + 1
        assert tried[-1] == (3.0, "b:2")
    finally:
        loop.cancel()


async def test_a_session_that_got_through_starts_the_backoff_afresh() -> None:
    clock = FakeClock(start=0.0)
    followed = leader(clock)
    followed.set("a:1")
    tried: list[float] = []

    async def session(endpoint: str) -> bool:
        tried.append(clock.monotonic())
        return len(tried) % 4 == 0  # every fourth one is welcomed

    loop = asyncio.ensure_future(reconnecting(followed, session, rng=random.Random(2)))
    try:
        await settle()
        await clock.advance(5.0)
        gaps = [b - a for a, b in zip(tried, tried[1:], strict=False)]
        assert 0.025 <= gaps[3] <= 0.05  # right after the fourth: back to the first step
        assert gaps[2] > 0.05
    finally:
        loop.cancel()


async def test_without_a_leader_nothing_is_tried_until_one_is_known() -> None:
    clock = FakeClock()
    followed = leader(clock)
    tried: list[str] = []

    async def session(endpoint: str) -> bool:
        tried.append(endpoint)
        return True

    alive = True
    loop = asyncio.ensure_future(reconnecting(followed, session, alive=lambda: alive))
    await clock.advance(60.0)
    assert tried == []
    followed.set("a:1")
    await settle()
    assert tried == ["a:1"]
    alive = False
    await clock.advance(1.0)
    await asyncio.wait_for(loop, 1)


@pytest.mark.parametrize("to_none", [True, False])
async def test_moved_from_returns_at_once_if_the_leader_already_changed(to_none: bool) -> None:
    followed = leader(FakeClock())
    followed.set("b:2")
    await asyncio.wait_for(followed.moved_from("a:1", to_none=to_none), 1)


class _Servicer:
    leader_endpoint = ""


class _Runner:
    """What `leading` uses of a Runner: its endpoint and its serving flag."""

    endpoint = "me:1"

    def __init__(self) -> None:
        self.served: list[bool] = []

    async def serving(self, ok: bool) -> None:
        self.served.append(ok)


async def test_a_servicer_redirects_to_the_leader_its_follower_knows() -> None:
    servicer = _Servicer()
    followed = Leader(None, "health", FakeClock(), servicer=servicer)  # type: ignore[arg-type]
    followed.set("a:1")
    assert servicer.leader_endpoint == "a:1"
    followed.set("")
    assert servicer.leader_endpoint == ""


async def test_a_term_names_this_process_until_it_ends() -> None:
    runner, servicer = _Runner(), _Servicer()
    followed = Leader(None, "health", FakeClock(), servicer=servicer)  # type: ignore[arg-type]
    async with leading(runner, followed):  # type: ignore[arg-type]
        assert servicer.leader_endpoint == "me:1"  # before etcd's watch says so
        assert runner.served == [True]
    assert servicer.leader_endpoint == ""  # not us now; the watch names the next one
    assert runner.served == [True, False]


async def test_a_term_that_ends_after_another_leader_is_known_keeps_pointing_there() -> None:
    runner = _Runner()
    followed = leader(FakeClock())

    async def term() -> None:
        async with leading(runner, followed):  # type: ignore[arg-type]
            followed.set("next:2")  # the watch saw the next leader first
            raise RuntimeError("term over")

    with pytest.raises(RuntimeError):
        await term()
    assert followed.endpoint == "next:2"
    assert runner.served == [True, False]


def test_a_standby_s_pointer_is_read_from_its_error_and_none_is_empty() -> None:
    pointed = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("other", "x"), (LEADER_METADATA_KEY, "b:2")),
        "standby",
    )
    assert named_leader(pointed) == "b:2"
    assert named_leader(no_leader("none elected")) == ""
    assert no_leader("none elected").code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_without_etcd_goes_to_the_address_it_was_given() -> None:
    client = LeaderClient("health", None, "h:1", "default", "health monitor")
    assert await client.leader() == "h:1"
    with pytest.raises(ValueError, match="give etcd endpoints or a health monitor address"):
        LeaderClient("health", None, None, "default", "health monitor")
