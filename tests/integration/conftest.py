"""Fixtures for tests that run a whole cluster as real processes (etcd, coordinators, pools).

`cluster` is a factory: `c = await cluster(agents=50, pools=2)` starts a LocalCluster in
the test's tmp_path, waits until the leader serves and every agent is connected, and
stops it after the test whatever happened. When a test fails, the tail of every
process log is attached to its report, so a CI failure shows what the services saw.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.etcd_server import EtcdNotFoundError, find_etcd_binary
from services.cluster import ClusterSpec, LocalCluster

# Lines of each process log shown when a test fails: enough for the last
# tracebacks and state changes, short enough to read.
LOG_TAIL_LINES = 60
CLUSTERS = pytest.StashKey[list[LocalCluster]]()

ClusterFactory = Callable[..., Awaitable[LocalCluster]]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Keep each phase's report on the item (`item.rep_call`) and, when a phase failed,
    add the tail of every cluster process log to that report's output."""
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{rep.when}", rep)
    if rep.failed and rep.when in ("setup", "call"):
        for cluster in item.stash.get(CLUSTERS, []):
            for name, text in log_tails(cluster):
                rep.sections.append((f"cluster log tail: {name}", text))


def log_tails(cluster: LocalCluster, lines: int = LOG_TAIL_LINES) -> list[tuple[str, str]]:
    """(process name, last lines of its log), with each service's exit code if it exited."""
    out = []
    exits = {name: proc.poll() for name, proc in cluster.procs.items()}
    for path in sorted(cluster.log_dir.glob("*.log")):
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as err:
            tail = [f"<cannot read {path}: {err}>"]
        code = exits.get(path.stem)
        header = f"{path} ({'running' if code is None else f'exited with {code}'})"
        out.append((path.stem, "\n".join([header, *tail])))
    return out


@pytest.fixture
def etcd_binary() -> str:
    """The etcd binary; skip without one (fail under CI, where a missing etcd is a broken image)."""
    try:
        return find_etcd_binary()
    except EtcdNotFoundError as err:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but etcd is missing: {err}", pytrace=False)
        pytest.skip(str(err))


@pytest.fixture
async def cluster(
    request: pytest.FixtureRequest, tmp_path: Path, etcd_binary: str
) -> AsyncIterator[ClusterFactory]:
    """Start local clusters on demand; every one is stopped when the test ends.

    Call it with ClusterSpec fields (`agents`, `pools`, `coordinators`, `capacity`,
    `sleep_ms`, `env` ...) and `ready_timeout_s`. Returns the running LocalCluster,
    with the leader serving and every agent connected.
    """
    started: list[LocalCluster] = []
    request.node.stash[CLUSTERS] = started

    async def start(*, ready_timeout_s: float = 60.0, **fields: Any) -> LocalCluster:
        fields.setdefault("etcd_port", 0)
        fields.setdefault("coordinator_port", 0)
        spec = ClusterSpec(data_dir=tmp_path / f"cluster-{len(started) + 1}", **fields)
        local = LocalCluster(spec)
        started.append(local)  # before start(): a half-started cluster is stopped too
        local.start()
        await local.wait_ready(timeout_s=ready_timeout_s, agents=spec.agents)
        return local

    try:
        yield start
    finally:
        for local in started:
            local.stop()
