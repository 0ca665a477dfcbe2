"""Consensus service configuration (AGENTMESH_<FIELD> variables and CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass

from services._common.config import ServiceConfig


@dataclass(frozen=True, kw_only=True)
class ConsensusConfig(ServiceConfig):
    default_timeout_s: float = 30.0
    """Timeout of a proposal that sets none (more than 0, at most 3600)."""
    max_open_proposals: int = 10_000
    """Open proposals at once; a Propose beyond it is RESOURCE_EXHAUSTED (memory is
    bounded, and each open proposal fans out one request per voter)."""
    vote_batch_ops: int = 120
    """Votes per etcd transaction at most (etcd's default --max-txn-ops is 128)."""
    vote_batch_bytes: int = 1024 * 1024
    """Bytes of votes per etcd transaction at most (etcd refuses requests over 1.5 MiB)."""
    vote_inflight: int = 1
    """Vote transactions in flight at once; more votes wait and leave together. One is
    enough: a decision carries the records it rests on in its own transaction, so
    no decision waits for these writes, and fewer, fuller transactions cost etcd and
    this process less CPU (measured: 9.4 → see README)."""

    def __post_init__(self) -> None:
        if not 0 < self.default_timeout_s <= 3600:
            raise ValueError("--default-timeout-s must be more than 0 and at most 3600")
