"""Heartbeat schedules of agents started together are spread over the interval."""

from __future__ import annotations

import random
from collections import Counter

from services.agent_pool.heartbeat import PHASES, spread


def test_streams_started_together_do_not_beat_together() -> None:
    # a pool starts its agents' streams in one pass: 200 streams at the same moment
    rng = random.Random(7)
    due = [spread(100.0, 1.0, rng) + 1.0 for _ in range(200)]
    # each first periodic heartbeat is due within one interval of the start, on one of
    # the phases ...
    assert all(100.0 < t <= 101.0 for t in due)
    assert len({round(t, 9) for t in due}) == PHASES
    # ... and no phase holds a burst of them all: about 20 each, never 60
    per_phase = Counter(round(t, 9) for t in due)
    assert max(per_phase.values()) < 40
