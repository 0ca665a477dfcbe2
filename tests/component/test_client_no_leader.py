"""What a client says when it finds no leader to talk to. An etcd that does not answer
(the usual first mistake: the cluster is not running, or the endpoint is not the one
`agentmesh up` printed) is told apart from a cluster whose election has no winner yet."""

from __future__ import annotations

import uuid

import grpc
import pytest
from typer.testing import CliRunner

from protos.agentmesh.v1 import consensus_pb2 as pb
from registry.etcd_server import EtcdServer, free_port
from services import cli
from services.cli import common as cli_common
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


async def test_a_call_that_retries_says_why_once() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    told: list[str] = []
    async with MeshClient(etcd=endpoint, retry_s=0.5, timeout_s=1.0) as client:
        client.on_retry = told.append
        with pytest.raises(grpc.aio.AioRpcError):
            await client.get("t-1")
    assert len(told) == 1, told  # the first retry only, though it retried several times
    assert told[0].startswith(f"UNAVAILABLE: etcd at {endpoint} does not answer"), told


def test_the_cli_says_it_retries_then_why_it_gave_up(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    monkeypatch.setattr(cli_common, "CLIENT_RETRY_S", 0.5)
    result = CliRunner().invoke(cli.app, ["tasks", "--etcd", endpoint])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    retrying = said.index(f"retrying: UNAVAILABLE: etcd at {endpoint} does not answer")
    assert "(for up to 0.5 s)" in said
    assert said.index(f"error: UNAVAILABLE: etcd at {endpoint} does not answer") > retrying
    assert said.count("retrying:") == 1, said


async def test_a_waiting_proposal_does_not_wait_its_timeout_for_an_instance(
    etcd_server: EtcdServer,
) -> None:
    """With no consensus instance, Propose(wait) gives up after `retry_s`, not after the
    proposal's own timeout: nothing is waiting for a decision yet."""
    cluster = f"test-{uuid.uuid4().hex}"
    told: list[str] = []
    request = pb.ProposeRequest(topic="ship it?", options=["yes", "no"], timeout_s=600, wait=True)
    async with ConsensusClient(etcd_server.endpoint, cluster=cluster, retry_s=0.3) as consensus:
        consensus.on_retry = told.append
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await consensus.propose(request)  # the test's 30 s limit fails it if it waits
    assert err.value.details() == "no active consensus instance is elected yet"
    assert told == ["UNAVAILABLE: no active consensus instance is elected yet"]
