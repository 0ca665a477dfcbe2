"""Heartbeat schedules of agents started together are spread over the interval."""

from __future__ import annotations

import random
from collections import Counter

from services.agent_pool.heartbeat import spread


def test_streams_started_together_do_not_beat_together() -> None:
    # a pool starts its agents' streams in one pass: 200 streams at the same moment
    rng = random.Random(7)
    due = [spread(100.0, 1.0, rng.random()) + 1.0 for _ in range(200)]
    # each first periodic heartbeat is due within one interval of the start ...
    assert all(100.0 <= t <= 101.0 for t in due)
    # ... and no tenth of the interval holds a burst: about 20 each, never 60
    per_tenth = Counter(min(9, int((t - 100.0) * 10)) for t in due)
    assert len(per_tenth) == 10
    assert max(per_tenth.values()) < 40


def test_phase_zero_keeps_the_old_schedule() -> None:
    assert spread(5.0, 2.0, 0.0) == 5.0
    assert spread(5.0, 2.0, 0.5) == 4.0
