"""A Python client of the Consensus service: finds the active instance through etcd,
follows a standby's pointer, and retries what is safe to retry.

Propose is safe to retry only with a proposal_id: the client sets one when the
caller did not, so a Propose whose reply was lost (a failover) is sent again to
the next active instance and returns the same proposal and, in time, its decision.
"""

from __future__ import annotations

import asyncio
import random
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from protos.agentmesh.v1 import consensus_pb2 as pb
from protos.agentmesh.v1 import consensus_pb2_grpc as pb_grpc
from registry.errors import StoreUnavailableError
from registry.etcd import Etcd
from services._common.follow import (
    Closing,
    etcd_unreachable,
    find_leader,
    named_leader,
    no_leader,
)
from services.consensus.limits import MAX_TIMEOUT_S

RETRY_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
WAIT_MARGIN_S = 5.0
"""A waiting Propose's deadline: the proposal's timeout plus this (the decision
commit and a failover fit in it)."""


class ConsensusClient(Closing):
    """Args:
    etcd: etcd endpoints (a string) or an open `Etcd` client to share.
    cluster: the cluster name (key prefix); ignored with an `Etcd` client.
    timeout_s: deadline of each call that does not wait for a decision.
    retry_s: how long to keep retrying while no active instance answers.
    """

    def __init__(
        self,
        etcd: str | Etcd,
        cluster: str = "default",
        timeout_s: float = 10.0,
        retry_s: float = 15.0,
    ) -> None:
        if isinstance(etcd, Etcd):
            self.etcd, self._own_etcd = etcd, False
        else:
            self.etcd = Etcd(etcd, prefix=f"/agentmesh/{cluster}/", timeout_s=3.0)
            self._own_etcd = True
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        # told once per call, at its first retry, why it retries (the CLI prints it)
        self.on_retry: Callable[[str], None] | None = None
        self._endpoint = ""
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ConsensusStub | None = None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        if self._own_etcd:
            await self.etcd.close()

    def _use(self, endpoint: str) -> pb_grpc.ConsensusStub:
        if endpoint != self._endpoint or self._stub is None:
            if self._channel is not None:
                asyncio.ensure_future(self._channel.close(grace=1.0))
            self._endpoint = endpoint
            self._channel = grpc.aio.insecure_channel(endpoint)
            self._stub = pb_grpc.ConsensusStub(self._channel)
        return self._stub

    async def _stub_now(self) -> pb_grpc.ConsensusStub:
        if self._stub is not None:
            return self._stub
        try:
            endpoint = await find_leader(self.etcd, "consensus", quiet=False)
        except StoreUnavailableError:
            raise no_leader(etcd_unreachable(self.etcd.endpoints)) from None
        if not endpoint:
            raise no_leader("no active consensus instance is elected yet")
        return self._use(endpoint)

    async def _revision_now(self) -> int:
        try:
            resp = await self.etcd.range(self.etcd.key("decisions") + b"/", count_only=True)
        except StoreUnavailableError:
            raise no_leader(etcd_unreachable(self.etcd.endpoints)) from None
        return int(resp.header.revision)

    def _follow(self, err: grpc.aio.AioRpcError) -> None:
        pointed = named_leader(err)
        if pointed and pointed != self._endpoint:
            self._use(pointed)
        else:
            self._stub = None  # look the active instance up again

    async def _call(self, name: str, request: Any, timeout_s: float | None = None) -> Any:
        """Retried while no active instance answers: finding one takes at most `retry_s`
        (from the start, or from the last call that reached one), and the whole call at
        most `retry_s` plus `timeout_s` (a waiting Propose may outlive a failover)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_s + (timeout_s or 0)
        lookup_deadline = loop.time() + self.retry_s
        backoff = 0.05
        told = False
        while True:
            try:
                stub = await self._stub_now()
            except grpc.aio.AioRpcError as err:  # none to call: only retry_s for that
                if loop.time() >= min(deadline, lookup_deadline):
                    raise
                failed = err
            else:
                try:
                    return await getattr(stub, name)(request, timeout=timeout_s or self.timeout_s)
                except grpc.aio.AioRpcError as err:
                    if err.code() not in RETRY_CODES:
                        raise
                    self._follow(err)
                    if loop.time() >= deadline:
                        raise
                    lookup_deadline = loop.time() + self.retry_s
                    failed = err
            if self.on_retry is not None and not told:
                told = True
                self.on_retry(f"{failed.code().name}: {failed.details()}")
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, 1.0)

    async def propose(self, request: pb.ProposeRequest) -> pb.ProposeResponse:
        """Open a proposal; with `request.wait`, return once it is decided."""
        if not request.proposal_id:
            request.proposal_id = f"p-{secrets.token_hex(8)}"
        # a timeout the service refuses (nan, inf, 1e10) must not become this call's
        # deadline: a deadline gRPC cannot hold fails at once and would be retried forever
        wait_s = request.timeout_s if 0 < request.timeout_s <= MAX_TIMEOUT_S else 30.0
        timeout = wait_s + WAIT_MARGIN_S if request.wait else None
        return await self._call("Propose", request, timeout)  # type: ignore[no-any-return]

    async def decision(self, proposal_id: str) -> pb.Decision:
        return await self._call(  # type: ignore[no-any-return]
            "GetDecision", pb.GetDecisionRequest(proposal_id=proposal_id)
        )

    async def list_decisions(self, **fields: Any) -> pb.ListDecisionsResponse:
        return await self._call("ListDecisions", pb.ListDecisionsRequest(**fields))  # type: ignore[no-any-return]

    async def status(self) -> pb.ConsensusStatus:
        return await self._call("GetStatus", pb.GetConsensusStatusRequest())  # type: ignore[no-any-return]

    async def watch_decisions(
        self, protocol: int = 0, after_revision: int = 0
    ) -> AsyncIterator[pb.Decision]:
        """Every decision after `after_revision` (0: from now), in etcd revision order,
        resuming after the last one seen across reconnects: nothing is missed. Gives up
        (the last UNAVAILABLE) once no instance has answered for `retry_s`."""
        loop = asyncio.get_running_loop()
        after = after_revision
        backoff = 0.05
        failing_since: float | None = None
        told = False
        while True:
            opened: float | None = None
            try:
                if not after:
                    # Pin "now" once: a stream that broke before its first decision
                    # would otherwise resume from a later "now" and miss the decisions
                    # of the failover itself.
                    after = await self._revision_now()
                stub = await self._stub_now()
                opened = loop.time()
                call = stub.WatchDecisions(
                    pb.WatchDecisionsRequest(protocol=protocol, after_revision=after)  # type: ignore[arg-type]
                )
                try:
                    async for decision in call:
                        backoff = 0.05
                        failing_since = None
                        after = decision.revision
                        yield decision
                finally:
                    call.cancel()
                return
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRY_CODES:
                    raise
                now = loop.time()
                # a stream that stayed open for retry_s was being answered: a new outage
                if failing_since is None or (opened is not None and now - opened >= self.retry_s):
                    failing_since, told = now, False
                if now - failing_since >= self.retry_s:
                    raise
                self._follow(err)
                if self.on_retry is not None and not told:
                    told = True
                    self.on_retry(f"{err.code().name}: {err.details()}")
            await asyncio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, 1.0)
