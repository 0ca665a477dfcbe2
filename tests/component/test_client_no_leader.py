"""What a client says when it finds no leader to talk to. An etcd that does not answer
(the usual first mistake: the cluster is not running, or the endpoint is not the one
`agentmesh up` printed) is told apart from a cluster whose election has no winner yet."""

from __future__ import annotations

import uuid

import grpc
import pytest

from registry.etcd_server import EtcdServer, free_port
from services.client import MeshClient
from services.consensus.client import ConsensusClient
from services.health.client import HealthClient, NoMonitorError

pytestmark = pytest.mark.timeout(30)


async def test_every_client_names_an_etcd_that_does_not_answer() -> None:
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    said = f"etcd at {endpoint} does not answer; is the cluster running?"
    async with MeshClient(etcd=endpoint, retry_s=0.3, timeout_s=1.0) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.get("t-1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert said in (err.value.details() or "")
    async with HealthClient(etcd=endpoint, timeout_s=1.0) as health:
        with pytest.raises(NoMonitorError, match=said.replace("?", r"\?")):
            await health.get("a-1")
    async with ConsensusClient(endpoint, retry_s=0.3, timeout_s=1.0) as consensus:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await consensus.decision("p-1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert said in (err.value.details() or "")


async def test_an_etcd_that_answers_without_a_leader_is_no_leader(
    etcd_server: EtcdServer,
) -> None:
    cluster = f"test-{uuid.uuid4().hex}"  # nothing was ever elected under this prefix
    async with MeshClient(etcd=etcd_server.endpoint, cluster=cluster, retry_s=0.3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.get("t-1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert err.value.details() == "no coordinator leader is elected yet"
    async with HealthClient(etcd=etcd_server.endpoint, cluster=cluster) as health:
        with pytest.raises(NoMonitorError, match="no health monitor is active"):
            await health.get("a-1")
    async with ConsensusClient(etcd_server.endpoint, cluster=cluster, retry_s=0.3) as consensus:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await consensus.decision("p-1")
    assert err.value.details() == "no active consensus instance is elected yet"
