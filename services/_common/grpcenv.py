"""Which of gRPC's two I/O engines agentmesh's processes use, chosen before grpc loads.

Since grpcio 1.80 Python uses gRPC's EventEngine by default: a socket event is
handled on an EventEngine thread, handed to grpc.aio's poller thread, and from there
to the event loop, so every message wakes three threads. The older engine (iomgr)
reads the socket in the poller thread itself, one wake-up fewer. On the 2-core
reference machine at 770 tasks/s (BENCHMARKS.md, "The I/O engine") it halved the
context switches in every Python process (the coordinator's from 25 to 12.5 per task)
and cut submit sent → assignment received P99 from 28-38 to 16-20 ms; at 100 tasks/s
the servers' CPU per task fell 15-20 %, and the closed loop did not change.

grpcio keeps iomgr behind the two experiments named below and reads GRPC_EXPERIMENTS
once, when `grpc` is first imported. Its maintainers plan to remove the experiments in
a later release: pyproject pins grpcio to 1.85.x, and tests/unit/test_grpcenv.py fails
if a grpcio no longer knows them.
"""

from __future__ import annotations

import os

LEGACY_IO = "-event_engine_client,-event_engine_listener"


def prefer_legacy_io() -> None:
    """Choose iomgr for this process and its children, unless GRPC_EXPERIMENTS is set.

    Set GRPC_EXPERIMENTS yourself (even to an empty string, for grpcio's default) to
    choose otherwise. Call before the first `import grpc`: afterwards it changes only
    the processes this one starts.
    """
    os.environ.setdefault("GRPC_EXPERIMENTS", LEGACY_IO)
