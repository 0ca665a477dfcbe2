"""ConsensusClient against a live instance: a proposal the service refuses is refused
at once, whatever the timeout it asks for."""

from __future__ import annotations

import math

import grpc
import pytest

from protos.agentmesh.v1 import consensus_pb2 as pb
from registry.etcd_server import EtcdServer, free_port
from services.consensus.client import ConsensusClient
from tests.component.test_consensus_grpc import active_of, instances


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout_s", [math.nan, math.inf, 1e10, 5000.0, -1.0])
async def test_a_timeout_the_service_refuses_is_an_answer_not_a_retry_loop(
    etcd_server: EtcdServer, timeout_s: float
) -> None:
    """The client's wait was the proposal's timeout plus a margin: nan or inf (or 1e10,
    past what a gRPC deadline holds) made every attempt fail with DEADLINE_EXCEEDED and
    the retry loop never end (`agentmesh propose x --timeout-s nan`, a `propose` task
    with {"timeout_s": 1e10} held its agent)."""
    async with instances(etcd_server.endpoint, count=1) as nodes:
        active = await active_of(nodes)
        cluster = active.runner.etcd.prefix.decode().split("/")[2]
        async with ConsensusClient(etcd_server.endpoint, cluster, retry_s=2.0) as client:
            request = pb.ProposeRequest(topic="ship it?", timeout_s=timeout_s, wait=True)
            request.voters.all = True
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.propose(request)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "timeout_s must be 0 (default) to 3600 seconds" in (err.value.details() or "")


@pytest.mark.timeout(30)
async def test_a_watch_with_no_instance_to_reach_gives_up_after_retry_s() -> None:
    """`agentmesh decisions --watch` went on silently for ever once the cluster was
    stopped: the watch retried without a deadline and without a word."""
    endpoint = f"127.0.0.1:{free_port()}"
    told: list[str] = []
    async with ConsensusClient(endpoint, retry_s=0.5) as client:
        client.on_retry = told.append
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in client.watch_decisions():
                pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"etcd at {endpoint} does not answer" in (err.value.details() or "")
    assert len(told) == 1, told
