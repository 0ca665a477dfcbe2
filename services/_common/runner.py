"""One lifecycle for every service process (STYLE.md habit 6).

A service is a core, a thin servicer, and a few lines of wiring on a `Runner`:

    runner = Runner("health", cfg, [SERVICE])
    add_HealthMonitorServicer_to_server(servicer, runner.server)
    leadership = runner.leadership()
    await runner.run(lambda: leadership.serve(lead))

`run()` starts the gRPC server (grpc.health.v1 and reflection included), keeps the
process's etcd session (a lease renewed if lost), registers the instance under
services/<kind>/<id> on it, and runs the jobs in one TaskGroup. On SIGTERM/SIGINT
(or `stop()`): NOT_SERVING, drain, `server.stop(grace)`, cancel the jobs, revoke
the lease, in that order, once. A job that crashes stops the process with its error,
so a supervisor restarts it instead of leaving a half-alive replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
from collections.abc import Awaitable, Callable, Sequence

from registry import discovery
from registry.etcd import Etcd
from registry.leadership import Leadership, leader_value
from registry.lease import Session
from services._common import telemetry
from services._common.clock import Clock, SystemClock
from services._common.config import ServiceConfig
from services._common.errors import StoreUnavailableError
from services._common.grpcserver import NOT_SERVING, SERVING, advertised, bind, build_server

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]


class _Stopped(Exception):
    """Raised inside the TaskGroup to cancel the jobs once shutdown has drained."""


class Runner:
    """One service process: server, session, registration, jobs, shutdown.

    Args:
        kind: the service kind ("coordinator", "agent-pool", "health", "consensus").
        cfg: the service's config (a ServiceConfig subclass).
        services: full names of the gRPC services it serves (for health and reflection).
        node_id: the instance id (default: cfg.node_id, else <kind>-<pid>-<random>).
        clock: injected time.
    """

    def __init__(
        self,
        kind: str,
        cfg: ServiceConfig,
        services: Sequence[str],
        *,
        node_id: str = "",
        clock: Clock | None = None,
    ) -> None:
        self.kind = kind
        self.cfg = cfg
        self.services = tuple(services)
        self.node_id = node_id or cfg.node_id or f"{kind}-{os.getpid()}-{secrets.token_hex(3)}"
        self.clock: Clock = clock or SystemClock()
        self.etcd = Etcd(
            cfg.etcd, prefix=f"/agentmesh/{cfg.cluster}/", timeout_s=cfg.etcd_timeout_s
        )
        self.server, self.health = build_server(self.services)
        self.port = bind(self.server, cfg.listen)
        self.endpoint = advertised(cfg.listen, self.port, cfg.advertise)
        self.session = Session(self.etcd, cfg.lease_ttl_s, self.clock)
        self.metadata: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._closed = False
        self._registered = asyncio.Event()

    # ---- what services call ----

    def leadership(self, role: str = "") -> Leadership:
        """A Leadership for `role` (default: the service kind) on this process's session.
        While its terms keep failing, the process reports NOT_SERVING."""
        return Leadership(
            self.session,
            role or self.kind,
            leader_value(self.node_id, self.endpoint),
            on_failing=self._on_failing,
        )

    async def serving(self, ok: bool, service: str = "") -> None:
        """Mark one service (default: all of this process's) SERVING or NOT_SERVING."""
        if self._closed:
            return
        for name in (service,) if service else self.services:
            await self.health.set(name, SERVING if ok else NOT_SERVING)

    async def publish(self, **metadata: str) -> None:
        """Update this instance's registration metadata (e.g. its agent count)."""
        self.metadata.update(metadata)
        if self._registered.is_set():
            with contextlib.suppress(StoreUnavailableError):
                await self.session.attach(*self._registration())

    def stop(self) -> None:
        """Begin shutdown (idempotent; what SIGTERM and SIGINT do)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ---- the lifecycle ----

    async def run(self, *jobs: Job, drain: Job | None = None) -> None:
        """Serve and run `jobs` until stopped or until a job fails (then raise its error)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self.stop)
        await self.server.start()
        await self.health.set("", SERVING)
        await self.serving(False)  # each service says when it serves (a leader, say)
        telemetry.start_metrics(self.cfg.metrics_port)
        log.info(
            "listening",
            extra={"service": self.kind, "endpoint": self.endpoint, "node": self.node_id},
        )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self.session.run(), name="session")
                group.create_task(self._register(), name="register")
                for job in jobs:
                    group.create_task(_coroutine(job), name=getattr(job, "__name__", "job"))
                await self._stop.wait()
                await self._drain(drain)
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            await self._close()

    def _registration(self) -> tuple[bytes, bytes]:
        instance = discovery.Instance(self.kind, self.node_id, self.endpoint, dict(self.metadata))
        return discovery.key(self.etcd, instance), instance.encode()

    async def _register(self) -> None:
        delay = 0.1
        while True:
            try:
                registration = self._registration()
                await self.session.attach(*registration)
                if self._registration() == registration:
                    self._registered.set()
                    return
                continue  # published meanwhile (not written: not registered yet)
            except StoreUnavailableError:
                await self.clock.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _drain(self, drain: Job | None) -> None:
        """NOT_SERVING first (balancers and clients stop sending), then the service's
        drain, then the server stops with grace for the RPCs still running."""
        log.info("shutting down", extra={"service": self.kind, "node": self.node_id})
        await self.health.enter_graceful_shutdown()
        if drain is not None:
            try:
                await asyncio.wait_for(drain(), timeout=self.cfg.grace_s)
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.warning("drain failed during shutdown", exc_info=True)
        await self.server.stop(self.cfg.grace_s)

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(0)
        # last: the lease takes the registration and any candidacy with it, so a
        # standby is elected at once instead of after the TTL
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.session.close(), timeout=2.0)
        await self.etcd.close()

    async def _on_failing(self, failing: bool) -> None:
        await self.health.set("", NOT_SERVING if failing else SERVING)
        if failing:
            await self.serving(False)


async def _coroutine(job: Job) -> None:
    await job()
