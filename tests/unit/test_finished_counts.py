"""services/coordinator/counts.py: the leader's finished totals, kept in etcd."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

from registry.errors import NotLeaderError, StoreRefusedError, StoreUnavailableError
from services._common.clock import FakeClock
from services.coordinator import counts


def test_totals_round_trip_and_garbage_starts_from_zero() -> None:
    totals = collections.Counter({"SUCCEEDED": 12, "DEAD_LETTER": 1})
    assert counts.decode(counts.encode(totals)) == totals
    for bad in (b"", b"[1, 2]", b"not json", b'{"SUCCEEDED": -3, "X": "7", "7": 1.5}'):
        assert counts.decode(bad) == collections.Counter(), bad
    assert counts.decode(b'{"SUCCEEDED": 2, "bogus": null}') == {"SUCCEEDED": 2}
    assert counts.decode(b"{" + b" " * counts.MAX_VALUE_BYTES + b"}") == collections.Counter()


class FakeEtcd:
    def key(self, *parts: str) -> bytes:
        return b"/agentmesh/t/" + "/".join(parts).encode()


class FakeElection:
    """Records fenced writes; can be told to fail."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.fail: BaseException | None = None

    async def fenced(self, ops: Any, timeout_s: float | None = None) -> list[object]:
        if self.fail is not None:
            raise self.fail
        (op,) = ops
        self.writes.append(op.request_put.value)
        return []


async def test_written_only_when_changed_and_after_an_outage() -> None:
    clock = FakeClock()
    election = FakeElection()
    finished: collections.Counter[str] = collections.Counter({"SUCCEEDED": 5})  # the base
    keeper = asyncio.ensure_future(
        counts.keep(FakeEtcd(), election, clock, finished)  # type: ignore[arg-type]
    )
    await clock.advance(3)
    assert election.writes == []  # nothing finished in this term: no write at all
    finished["SUCCEEDED"] += 2
    await clock.advance(1)
    assert [counts.decode(w) for w in election.writes] == [{"SUCCEEDED": 7}]
    election.fail = StoreUnavailableError("etcd away")
    finished["CANCELLED"] += 1
    await clock.advance(2)
    election.fail = None
    await clock.advance(1)
    assert counts.decode(election.writes[-1]) == {"SUCCEEDED": 7, "CANCELLED": 1}
    assert len(election.writes) == 2
    election.fail = StoreRefusedError("refused")  # logged; the keeper (and term) goes on
    finished["CANCELLED"] += 1
    await clock.advance(1)
    assert not keeper.done()
    election.fail = None
    await clock.advance(1)
    assert len(election.writes) == 2  # not retried every second while nothing changes
    finished["CANCELLED"] += 1
    await clock.advance(1)
    assert counts.decode(election.writes[-1]) == {"SUCCEEDED": 7, "CANCELLED": 3}
    election.fail = NotLeaderError("deposed")
    finished["SUCCEEDED"] += 1
    await clock.advance(1)
    assert keeper.done()  # the term is over: stop writing
    assert keeper.exception() is None
