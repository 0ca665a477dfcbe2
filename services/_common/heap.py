"""Garbage-collector settings for a long-running process (a service, the load harness).

At CPython's defaults (700, 10, 10) the collector walks young objects every 700
allocations, and now and then every object the process holds: grpc, protobuf and
their descriptors make that a heap of a few hundred thousand objects, which one full
collection walks in 20-45 ms of CPU here, up to 170 ms of wall time on a busy machine
(the coordinator ran ten in a run at 770 tasks/s; every task in flight waited).
Startup's objects live as long as the process, so they are frozen out of every later
collection, and the young generation is collected less often: each pass is still
short, and few tasks meet one.
"""

from __future__ import annotations

import gc

THRESHOLDS = (20_000, 20, 20)
"""Allocations before a young collection, then young (middle) collections before the
next older one. At 20,000 a young pass took 0.3 ms of CPU on average here."""


def settle() -> None:
    """Collect once, freeze what is left (startup's objects) and raise the thresholds.

    Call once, after the process has imported and built what it keeps for its life
    and before it serves. What is frozen is never collected, so the collection first
    frees startup's garbage instead of keeping it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
