"""Task counts, finished tasks included, survive the leader (issue 14).

`agentmesh status` and the dashboard show GetStatus's task_counts. A leader used to
count only what it held in memory, so after a restart every finished task vanished
from them. It now keeps the totals in etcd (`services/coordinator/counts.py`).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

import pytest

from protos.agentmesh.v1 import task_pb2 as tpb
from services.client import MeshClient

S = tpb.TaskState
TERMINAL = {S.TASK_STATE_SUCCEEDED, S.TASK_STATE_DEAD_LETTER, S.TASK_STATE_CANCELLED}


async def _until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := await check():
            return found
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "how",
    [
        "SIGKILL a second later",  # the periodic write has the totals
        "SIGTERM at once",  # the step-down's own write has them
    ],
)
async def test_finished_counts_survive_the_leader(cluster: Any, how: str) -> None:
    c = await cluster(agents=4, pools=1, health_monitors=0, consensus=0)
    async with MeshClient(etcd=c.etcd_endpoint, timeout_s=5.0, retry_s=30.0) as client:
        specs = [tpb.TaskSpec(task_id=f"ok-{i}", kind="noop") for i in range(20)]
        specs += [
            tpb.TaskSpec(
                task_id=f"bad-{i}",
                kind="fail",
                max_attempts=1,
                payload=json.dumps({"retryable": False}).encode(),
            )
            for i in range(3)
        ]
        specs += [
            tpb.TaskSpec(
                task_id=f"slow-{i}", kind="sleep", payload=json.dumps({"ms": 60000}).encode()
            )
            for i in (1, 2)
        ]
        await client.submit_batch(specs)
        await client.cancel("slow-1", "not needed")

        async def all_finished() -> dict[str, int] | None:
            tasks = [await client.get(s.task_id) for s in specs if s.task_id != "slow-2"]
            if all(t.state in TERMINAL for t in tasks):
                return dict((await client.status()).task_counts)
            return None

        before = await _until(all_finished, 30, "every task to finish")
        assert (before["SUCCEEDED"], before["DEAD_LETTER"], before["CANCELLED"]) == (20, 3, 1)

        term_before = (await client.status()).term
        # one more finishes right before the leader goes: only the last write can have it
        await client.cancel("slow-2", "not needed either")
        if how.startswith("SIGKILL"):
            # the leader writes its totals back within a second; then it dies unwarned
            await asyncio.sleep(1.5)
            c.kill("coordinator-1", signal.SIGKILL)
            c._spawn("coordinator-1", c.args["coordinator-1"])  # a new process and term
        else:
            await asyncio.to_thread(c.restart, "coordinator-1")

        async def new_term() -> Any:
            try:
                status = await client.status()
            except Exception:  # noqa: BLE001 - not elected yet
                return None
            # from_leader: the new leader has loaded its term (the counts with it)
            return status if status.from_leader and status.term not in (0, term_before) else None

        after = await _until(new_term, 30, "a new leader")
        counts = dict(after.task_counts)
        assert (counts.get("SUCCEEDED"), counts.get("DEAD_LETTER"), counts.get("CANCELLED")) == (
            20,
            3,
            2,
        ), counts

        # the new term counts on from there
        await client.submit_batch(
            [tpb.TaskSpec(task_id=f"more-{i}", kind="noop") for i in range(5)]
        )

        async def counted() -> dict[str, int] | None:
            now = dict((await client.status()).task_counts)
            return now if now.get("SUCCEEDED") == 25 else None

        await _until(counted, 30, "the new term's tasks to add to the totals")
