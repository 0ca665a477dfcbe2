"""Coordinator configuration (AGENTMESH_<FIELD> variables and CLI flags)."""

from __future__ import annotations

from dataclasses import dataclass

from services._common.config import ServiceConfig


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig(ServiceConfig):
    """The coordinator's settings; the fields every service shares are ServiceConfig's."""

    listen: str = "127.0.0.1:50051"
    """Address the gRPC server binds (port 0 picks a free one)."""
    strategy: str = "least-loaded"
    """Assignment strategy: least-loaded, round-robin, weighted or random."""
    task_kinds: tuple[str, ...] = ("echo", "sleep", "noop", "llm", "fail", "propose")
    """Kinds a task may have; anything else is refused with INVALID_ARGUMENT."""
    max_payload_bytes: int = 512 * 1024
    """Largest accepted task payload. With max_result_bytes and the other fields it must
    fit one etcd record (limits.check_config refuses to start otherwise)."""
    max_result_bytes: int = 512 * 1024
    """Largest result stored; a larger one fails the task (DEAD_LETTER) with an error
    saying so."""
    max_watchers: int = 64
    """WatchTask and WatchEvents streams served at once; past it, RESOURCE_EXHAUSTED."""
    watch_buffer_events: int = 10_000
    """Events queued for one watcher before its stream ends with RESOURCE_EXHAUSTED."""
    watch_buffer_bytes: int = 4 * 1024 * 1024
    """Bytes of events queued for one watcher before its stream ends with RESOURCE_EXHAUSTED."""
    default_max_attempts: int = 3
    """Attempts before DEAD_LETTER when a task does not say."""
    retry_base_s: float = 0.5
    """First retry backoff; doubles each attempt, with jitter."""
    retry_cap_s: float = 30.0
    """Longest retry backoff."""
    retention_s: int = 86400
    """Terminal tasks expire from etcd after this long (0: keep forever)."""
    reconcile_interval_s: float = 10.0
    """How often the leader compares the open tasks in etcd with its memory and repairs
    any difference (also at once after every etcd outage). A pass reads keys and
    revisions only: about 100 bytes per open task."""
