"""agentmesh's processes read sockets on grpc.aio's poller thread, not on EventEngine's.

Each case runs in a child: grpc reads GRPC_EXPERIMENTS once, when first imported.
The child imports `services.cli` first, as the `agentmesh` command does, then makes
300 unary calls over loopback and counts how often the threads named `event_engine`
woke up meanwhile. With EventEngine's I/O they wake for every message; with iomgr's
they only keep time.
"""

from __future__ import annotations

import os
import subprocess
import sys

from services._common import grpcenv

CALLS = 300

PROBE = f"""
import services.cli  # chooses the engine, as the `agentmesh` command does
import asyncio, os
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

def wakeups():
    n = 0
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{{t}}/comm") as f:
                if f.read().strip() != "event_engine":
                    continue
            with open(f"/proc/self/task/{{t}}/status") as f:
                n += sum(int(l.split()[1]) for l in f if l.startswith("voluntary_ctxt"))
        except OSError:
            pass
    return n

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{{port}}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest())
        before = wakeups()
        for _ in range({CALLS}):
            await stub.Check(health_pb2.HealthCheckRequest())
        print(repr(os.environ.get("GRPC_EXPERIMENTS")), wakeups() - before)
    await server.stop(None)

asyncio.run(main())
"""


def probe(experiments: str | None) -> tuple[str, int, str]:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if experiments is not None:
        env["GRPC_EXPERIMENTS"] = experiments
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    setting, wakeups = done.stdout.split()
    return setting, int(wakeups), done.stderr


def test_agentmesh_processes_use_iomgr_and_grpc_still_knows_it() -> None:
    setting, wakeups, stderr = probe(None)
    assert setting == repr(grpcenv.LEGACY_IO)
    # a grpcio that dropped the experiments says so here, and ignores them
    assert "Unknown experiment" not in stderr
    assert wakeups < CALLS // 4, f"EventEngine threads woke {wakeups} times in {CALLS} calls"


def test_a_setting_of_ones_own_wins_and_the_probe_sees_eventengine() -> None:
    # the empty setting is grpcio's default (EventEngine): the control that shows the
    # count above would catch EventEngine doing the I/O
    setting, wakeups, _ = probe("")
    assert setting == repr("")
    assert wakeups > CALLS, f"EventEngine threads woke only {wakeups} times in {CALLS} calls"
