"""Shared fixtures: a real etcd per test session, and a private one for restart tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services._common import grpcenv

# the I/O engine every agentmesh process runs (services/cli), for the servers and
# clients that tests start in this process; grpc reads it once, when first imported
grpcenv.prefer_legacy_io()

from registry.etcd import Etcd  # noqa: E402
from registry.etcd_server import EtcdNotFoundError, EtcdServer  # noqa: E402


def start_etcd(data_dir: Path) -> EtcdServer:
    """Start an etcd member in `data_dir`; skip (fail under CI) when etcd is not installed."""
    server = EtcdServer(data_dir)
    try:
        server.start()
    except EtcdNotFoundError as err:
        # On a laptop without etcd the unit tests should still run; in CI a missing etcd
        # is a broken image, and skipping would hide every integration test.
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but etcd is missing: {err}", pytrace=False)
        pytest.skip(str(err))
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One etcd for the whole session; tests stay apart through the `etcd` fixture's prefix."""
    server = start_etcd(tmp_path_factory.mktemp("etcd-session") / "data")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[Etcd]:
    """A client of the session etcd whose keys live under a prefix of its own."""
    client = Etcd(etcd_server.endpoint, prefix=f"/agentmesh/test-{uuid.uuid4().hex}/")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
def fresh_etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    """A private etcd that a test may stop, kill or restart (same data dir and ports)."""
    server = start_etcd(tmp_path / "etcd-data")
    try:
        yield server
    finally:
        server.stop()
