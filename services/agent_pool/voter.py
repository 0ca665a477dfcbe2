"""The agents' side of the Consensus service, and proposals from inside a task.

Each agent holds its own `Consensus.Participate` stream to the active consensus
instance (found and followed through etcd, role "consensus"), answers every vote
request with its pool's voting policy, always with a reason, and signs its votes
with an Ed25519 key whose public half the pool registers under keys/<agent id> on
its lease. An honest agent remembers what it voted, so a request sent again after
a reconnect gets the same vote (never an equivocation).

Policies (`--vote-policy`): always, never, abstain, random:SEED[:P_APPROVE],
field:NAME[=VALUE], silent. Byzantine behaviours for tests and the load test
(`--byzantine MODE:COUNT,...`, the pool's first agents): forge, equivocate,
unknown-proposal, impersonate, silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import json_format

from protos.agentmesh.v1 import consensus_pb2 as pb
from protos.agentmesh.v1 import consensus_pb2_grpc as pb_grpc
from protos.agentmesh.v1 import task_pb2 as tpb
from registry import discovery
from registry.etcd import Etcd
from services._common.clock import Clock
from services._common.follow import Leader, reconnecting
from services.agent_pool.executors import ExecutorError, Outcome, Progress, SleepExecutor
from services.consensus import signing

log = logging.getLogger(__name__)

POLICIES = ("always", "never", "abstain", "random", "field", "silent")
BYZANTINE = ("forge", "equivocate", "unknown-proposal", "impersonate", "silent")
REMEMBERED_VOTES = 20_000


@dataclass(frozen=True)
class Policy:
    """How a local agent votes. Deterministic for a given (proposal, agent, round)."""

    kind: str = "always"
    seed: int = 0
    p_approve: float = 0.5
    field: str = ""
    value: str | None = None

    @staticmethod
    def parse(spec: str) -> Policy:
        kind, _, rest = spec.strip().partition(":")
        try:
            if kind in ("always", "never", "abstain", "silent") and not rest:
                return Policy(kind)
            if kind == "random":
                seed, _, p = rest.partition(":")
                prob = float(p) if p else 0.5
                if not 0 <= prob <= 1:
                    raise ValueError(p)
                return Policy("random", seed=int(seed or 0), p_approve=prob)
            if kind == "field" and rest:
                name, eq, value = rest.partition("=")
                return Policy("field", field=name, value=value if eq else None)
        except ValueError:
            pass
        raise ValueError(
            f"vote policy {spec!r} must be always, never, abstain, silent, "
            "random:SEED[:P_APPROVE] or field:NAME[=VALUE]"
        )

    def decide(self, req: pb.VoteRequest, agent_id: str) -> tuple[int, str, str] | None:
        """(choice, option, reason), or None to stay silent."""
        options = list(req.proposal.options)
        if self.kind == "silent":
            return None
        if self.kind == "abstain":
            return pb.CHOICE_ABSTAIN, "", "policy: abstain"
        if self.kind == "always":
            if options:
                return pb.CHOICE_OPTION, options[0], "policy: always (the first option)"
            return pb.CHOICE_APPROVE, "", "policy: always approve"
        if self.kind == "never":
            if options:
                return pb.CHOICE_ABSTAIN, "", "policy: never (abstains from a choice)"
            return pb.CHOICE_REJECT, "", "policy: never approve"
        if self.kind == "random":
            material = f"{self.seed}/{req.proposal.proposal_id}/{agent_id}/{req.round}".encode()
            rng = random.Random(int.from_bytes(hashlib.sha256(material).digest()[:8], "big"))
            if options:
                pick = rng.choice(options)
                return pb.CHOICE_OPTION, pick, f"policy: seeded random (seed {self.seed})"
            approve = rng.random() < self.p_approve
            return (
                pb.CHOICE_APPROVE if approve else pb.CHOICE_REJECT,
                "",
                f"policy: seeded random (seed {self.seed}, p {self.p_approve:g})",
            )
        return self._by_field(req, options)

    def _by_field(self, req: pb.VoteRequest, options: list[str]) -> tuple[int, str, str]:
        try:
            doc = json.loads(req.proposal.payload or b"{}")
            found = doc.get(self.field) if isinstance(doc, dict) else None
        except ValueError:
            found = None
        if found is None:
            return pb.CHOICE_ABSTAIN, "", f"policy: payload has no field {self.field!r}"
        text = found if isinstance(found, str) else json.dumps(found)
        if options:
            if text in options:
                return pb.CHOICE_OPTION, text, f"policy: {self.field} = {text}"
            return pb.CHOICE_ABSTAIN, "", f"policy: {self.field} = {text} is no option"
        ok = text == self.value if self.value is not None else bool(found)
        want = f"== {self.value}" if self.value is not None else "is truthy"
        return (
            pb.CHOICE_APPROVE if ok else pb.CHOICE_REJECT,
            "",
            f"policy: {self.field} {want}: {'yes' if ok else 'no'}",
        )


def parse_byzantine(specs: tuple[str, ...]) -> list[str]:
    """'forge:2', 'silent:3' … → one mode per faulty agent, in order."""
    modes: list[str] = []
    for spec in specs:
        mode, _, count = spec.partition(":")
        if mode not in BYZANTINE or not count.isdigit():
            raise ValueError(f"byzantine {spec!r} must be MODE:COUNT with MODE in {BYZANTINE}")
        modes.extend([mode] * int(count))
    return modes


@dataclass
class VoterInfo:
    agent_id: str
    roles: tuple[str, ...]
    labels: dict[str, str]


class VoterPool:
    """The Participate streams of one pool's agents.

    Args:
        etcd: the pool's etcd client.
        pool_id: the pool's id.
        lease_id: the pool's lease now (keys live on it).
        policy: how honest agents vote.
        clock: injected time.
        byzantine: modes for the first agents started (see `parse_byzantine`).
        delay_ms: simulated think time before each vote (see executors.parse_latency).
    """

    def __init__(
        self,
        etcd: Etcd,
        pool_id: str,
        lease_id: Callable[[], int],
        policy: Policy,
        clock: Clock,
        byzantine: list[str] | None = None,
        delay_ms: str = "0",
    ) -> None:
        self.etcd = etcd
        self.pool_id = pool_id
        self.lease_id = lease_id
        self.policy = policy
        self.clock = clock
        self._modes = list(byzantine or [])
        self.mode: dict[str, str] = {}
        self.keys: dict[str, Ed25519PrivateKey] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.consensus = Leader(etcd, "consensus", clock)
        """The active consensus instance; the streams move when it changes."""
        self._cast: OrderedDict[tuple[str, str, int], pb.Vote] = OrderedDict()
        self.connected: set[str] = set()
        think = SleepExecutor(delay_ms)
        self._think = None if think.dist == "fixed" and think.a <= 0 else think

    # ---- pool hooks ----

    async def register(self, agents: list[VoterInfo]) -> None:
        """Create each agent's key (once) and put its public half under keys/<agent id>
        on the pool's lease (again after the pool renews its lease)."""
        for agent in agents:
            if agent.agent_id not in self.keys:
                self.keys[agent.agent_id] = signing.new_key()
                if self._modes:
                    self.mode[agent.agent_id] = self._modes.pop(0)
        keys = [
            (self.etcd.key("keys", a.agent_id), signing.public_bytes(self.keys[a.agent_id]))
            for a in agents
        ]
        await discovery.put_all(self.etcd, self.lease_id(), keys)

    async def deregister(self, agent_ids: Sequence[str]) -> None:
        """Forget stopped agents' keys, here and under keys/<agent id> (they stayed, in
        memory and in etcd, for as long as the pool's lease lived: one more per agent
        stopped or replaced)."""
        for agent_id in agent_ids:
            self.keys.pop(agent_id, None)
            self.mode.pop(agent_id, None)
        await discovery.delete_all(self.etcd, [self.etcd.key("keys", a) for a in agent_ids])

    def start(self, agent: VoterInfo) -> None:
        if agent.agent_id not in self.tasks:
            self.tasks[agent.agent_id] = asyncio.ensure_future(self._run(agent))

    def stop(self, agent_id: str) -> None:
        task = self.tasks.pop(agent_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self.tasks.values())
        self.tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.consensus.close()

    async def follow(self) -> None:
        """Follow the active consensus instance; until cancelled."""
        await self.consensus.follow()

    # ---- one agent ----

    async def _run(self, agent: VoterInfo) -> None:
        def failed(err: Exception) -> None:
            log.debug(
                "participate stream ended", extra={"agent": agent.agent_id, "error": str(err)}
            )

        await reconnecting(
            self.consensus, lambda endpoint: self._session(agent, endpoint), on_error=failed
        )

    async def _session(self, agent: VoterInfo, endpoint: str) -> bool:
        """One Participate stream; True if the instance welcomed the agent."""
        call = pb_grpc.ConsensusStub(self.consensus.channel(endpoint)).Participate()
        moved = asyncio.ensure_future(self.consensus.moved_from(endpoint))
        moved.add_done_callback(lambda _: call.cancel())
        welcomed = False
        thinking: set[asyncio.Future[None]] = set()
        lock = asyncio.Lock()  # one write at a time on the stream
        try:
            await call.write(
                pb.VoterMessage(
                    hello=pb.VoterHello(
                        agent_id=agent.agent_id,
                        pool_id=self.pool_id,
                        roles=agent.roles,
                        labels=agent.labels,
                    )
                )
            )
            async for msg in call:
                body = msg.WhichOneof("body")
                if body == "welcome":
                    welcomed = True
                    self.connected.add(agent.agent_id)
                elif body == "request":
                    if self._think is None:
                        for vote in self._answer(agent.agent_id, msg.request):
                            await call.write(pb.VoterMessage(vote=vote))
                    else:
                        thinking.add(
                            asyncio.ensure_future(
                                self._slow_answer(agent.agent_id, msg.request, call, lock)
                            )
                        )
                elif body == "rejected" and not self.mode.get(agent.agent_id):
                    # a fault against an honest agent is worth a warning; a vote that
                    # merely came late (a FAST round already over) is not
                    level = logging.WARNING if msg.rejected.fault else logging.INFO
                    log.log(
                        level,
                        "vote rejected",
                        extra={"agent": agent.agent_id, "reason": msg.rejected.reason},
                    )
        except asyncio.CancelledError:
            if not moved.done():
                raise
        finally:
            self.connected.discard(agent.agent_id)
            moved.cancel()
            for task in thinking:
                task.cancel()
            call.cancel()
        return welcomed

    async def _slow_answer(
        self, agent_id: str, req: pb.VoteRequest, call: Any, lock: asyncio.Lock
    ) -> None:
        assert self._think is not None
        await self.clock.sleep(self._think.draw_ms() / 1000)
        if agent_id not in self.tasks:
            return  # stopped meanwhile (its key may be gone)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            for vote in self._answer(agent_id, req):
                async with lock:
                    await call.write(pb.VoterMessage(vote=vote))

    def _vote(self, agent_id: str, req: pb.VoteRequest, decided: tuple[int, str, str]) -> pb.Vote:
        choice, option, reason = decided
        vote = pb.Vote(
            proposal_id=req.proposal.proposal_id,
            agent_id=agent_id,
            round=req.round,
            choice=choice,  # type: ignore[arg-type]
            option=option,
            reason=reason,
        )
        if req.proposal.protocol == pb.PROTOCOL_BFT:
            vote.signature = signing.sign(self.keys[agent_id], vote)
        return vote

    def _answer(self, agent_id: str, req: pb.VoteRequest) -> list[pb.Vote]:
        mode = self.mode.get(agent_id, "")
        remembered = (agent_id, req.proposal.proposal_id, req.round)
        if not mode and remembered in self._cast:
            return [self._cast[remembered]]
        decided = None if mode == "silent" else self.policy.decide(req, agent_id)
        if decided is None:
            return []
        vote = self._vote(agent_id, req, decided)
        if mode == "forge":
            vote.signature = os.urandom(64)
        elif mode == "equivocate":
            other = pb.CHOICE_REJECT if vote.choice != pb.CHOICE_REJECT else pb.CHOICE_APPROVE
            twin = self._vote(agent_id, req, (other, "", "changed my mind (equivocating)"))
            if req.proposal.options:
                twin = self._vote(agent_id, req, (pb.CHOICE_ABSTAIN, "", "equivocating"))
            return [vote, twin]
        elif mode == "unknown-proposal":
            ghost = pb.Vote()
            ghost.CopyFrom(vote)
            ghost.proposal_id = "ghost-" + req.proposal.proposal_id[:100]
            ghost.signature = signing.sign(self.keys[agent_id], ghost)
            return [vote, ghost]
        elif mode == "impersonate":
            vote.agent_id = "ghost-" + agent_id[:100]
            vote.signature = signing.sign(self.keys[agent_id], vote)
        else:
            self._cast[remembered] = vote
            while len(self._cast) > REMEMBERED_VOTES:
                self._cast.popitem(last=False)
        return [vote]


class ProposeExecutor:
    """Task kind `propose`: the agent opens a proposal and waits for its decision.

    Payload (JSON): {"topic": str, "payload": str, "options": [str], "protocol":
    "QUORUM"|"FAST"|"BFT"|"ORDERED", "role": str, "labels": {k: v}, "agents": [id],
    "quorum": int, "timeout_s": float, "max_faulty": int}. The proposal id is
    derived from the task id, so a retried task waits for the same vote instead of
    opening another. The output is the Decision as JSON; TIMED_OUT and NO_QUORUM
    are outcomes, not failures.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    async def run(self, task: tpb.Task, progress: Progress | None = None) -> Outcome:
        try:
            doc = json.loads(task.spec.payload or b"{}")
            if not isinstance(doc, dict) or not doc.get("topic"):
                raise ValueError("no topic")
            protocol = str(doc.get("protocol", "QUORUM")).upper()
            req = pb.ProposeRequest(
                proposal_id=f"task-{task.task_id}"[:128],
                topic=str(doc["topic"]),
                payload=str(doc.get("payload", "")).encode(),
                options=[str(o) for o in doc.get("options", [])],
                protocol=pb.Protocol.Value(f"PROTOCOL_{protocol}"),  # type: ignore[arg-type]
                quorum=int(doc.get("quorum", 0)),
                timeout_s=float(doc.get("timeout_s", 30.0)),
                max_faulty=int(doc.get("max_faulty", 0)),
                wait=True,
                proposer=task.agent_id or "task",
            )
        except (ValueError, TypeError) as err:
            raise ExecutorError(
                f'propose payload must be JSON like {{"topic": "…", "options": [...]}}: {err}',
                retryable=False,
            ) from None
        if doc.get("role"):
            req.voters.role = str(doc["role"])
        elif doc.get("labels"):
            req.voters.labels.labels.update({str(k): str(v) for k, v in doc["labels"].items()})
        elif doc.get("agents"):
            req.voters.agents.agent_ids.extend(str(a) for a in doc["agents"])
        else:
            req.voters.all = True
        try:
            resp = await self.client.propose(req)
        except grpc.aio.AioRpcError as err:
            retryable = err.code() in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
            raise ExecutorError(
                f"propose failed: {err.code().name}: {err.details()}", retryable
            ) from None
        return Outcome(json_format.MessageToJson(resp.decision, indent=None).encode())
