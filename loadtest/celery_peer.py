"""`--compare celery`: the same workload on Celery 5 with a Redis broker, side by side.

The harness starts its own redis-server (127.0.0.1, a free port, a temporary
directory, no persistence) and one Celery worker process (threads pool,
concurrency = the agent count, `acks_late`, prefetch 1: Celery's at-least-once
setting), runs the workload, and stops both in `finally`, Ctrl-C included.

Measurement points, chosen to match agentmesh's:
- dispatch: the task's own `time.time()` when it starts on the worker, minus the
  client's `time.time()` right after `send_task` returned (the broker has the
  message: "enqueue acknowledged");
- end to end: the client's monotonic clock when the result arrives, minus the
  one just before `send_task`.

The client learns results from Redis itself: one PSUBSCRIBE on the channels the
result backend publishes every result to (`celery-task-meta-<id>`). That is what
`AsyncResult.get()` waits on, without a subscription per task, so the client is
not what limits the figures. The client app has no result backend for the same
reason (with one, every `send_task` subscribes to its own channel).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest import procs
from loadtest.cpu import SAMPLE_INTERVAL_S, CpuSampler
from loadtest.metrics import RunMetrics
from loadtest.result import RunResult
from loadtest.workload import (
    BurstSchedule,
    ProgressSink,
    ProgressSnapshot,
    RateSchedule,
    Schedule,
    Workload,
    new_run_id,
    task_id,
)
from registry.etcd_server import free_port

log = logging.getLogger(__name__)

RESULT_PREFIX = "celery-task-meta-"
REDIS_START_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 60.0
PROGRESS_INTERVAL_S = 0.25
REPO_ROOT = Path(__file__).resolve().parent.parent


class PeerError(RuntimeError):
    """The peer could not be started or measured; the message says what to check."""


@dataclass(frozen=True, kw_only=True)
class CeleryPeerConfig:
    concurrency: int = 200
    """Worker threads; the comparison uses the agent count."""
    redis_server: str = "redis-server"
    """The redis-server binary (Debian's `redis-server` package)."""
    startup_timeout_s: float = WORKER_START_TIMEOUT_S
    """How long redis plus the worker may take to be ready."""
    keep_dir: bool = False
    """Keep the temporary directory (redis and worker logs) for a post-mortem."""


class RedisServer:
    """A throwaway redis-server on 127.0.0.1: no RDB snapshots, no AOF."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        self.proc: Any = None
        self.log_path = workdir / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://{procs.LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        import redis

        if shutil.which(self.binary) is None:
            raise PeerError(
                f"{self.binary} not found: install Debian's redis-server package "
                "(apt-get install -y redis-server)"
            )
        last = ""
        for _ in range(3):  # a free port can be taken between probe and bind
            self.port = free_port()
            self.proc = procs.start(
                [
                    self.binary,
                    "--port",
                    str(self.port),
                    "--bind",
                    procs.LOOPBACK,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self.workdir),
                    "--daemonize",
                    "no",
                    "--protected-mode",
                    "yes",
                    "--maxclients",
                    "10000",
                ],
                log_path=self.log_path,
            )
            client = redis.Redis(host=procs.LOOPBACK, port=self.port, socket_timeout=0.5)

            def ready(c: Any = client) -> bool:
                if self.proc.poll() is not None:
                    return True
                try:
                    return bool(c.ping())
                except redis.RedisError:
                    return False

            procs.wait_until(ready, REDIS_START_TIMEOUT_S)
            client.close()
            if self.proc.poll() is None:
                return
            last = procs.tail(self.log_path)
            procs.stop(self.proc)
        raise PeerError(f"redis-server did not start; its log ends with:\n{last}")

    def stop(self) -> None:
        procs.stop(self.proc, grace_s=5.0)


class CeleryWorker:
    """One `celery worker` process with the threads pool."""

    def __init__(self, redis_url: str, queue: str, concurrency: int, workdir: Path) -> None:
        self.redis_url = redis_url
        self.queue = queue
        self.concurrency = concurrency
        self.log_path = workdir / "celery-worker.log"
        self.proc: Any = None

    def start(self) -> None:
        from loadtest.celery_app import QUEUE_ENV, REDIS_URL_ENV

        env = dict(os.environ)
        env[REDIS_URL_ENV] = self.redis_url
        env[QUEUE_ENV] = self.queue
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        self.proc = procs.start(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "loadtest.celery_app",
                "worker",
                "--pool",
                "threads",
                "--concurrency",
                str(self.concurrency),
                "--prefetch-multiplier",
                "1",
                "--queues",
                self.queue,
                "--hostname",
                f"loadtest-{os.getpid()}@127.0.0.1",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ],
            log_path=self.log_path,
            env=env,
            cwd=REPO_ROOT,
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        # SIGTERM is Celery's warm shutdown: running tasks finish, then it exits
        procs.stop(self.proc, grace_s=10.0)


@dataclass
class _Book:
    """Per-task bookkeeping shared by the submitter and the listener threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    send_mono: dict[str, float] = field(default_factory=dict)
    ack_wall: dict[str, float] = field(default_factory=dict)
    send_wall: dict[str, float] = field(default_factory=dict)
    done: dict[str, str] = field(default_factory=dict)
    """id → final status seen on the result channel."""
    duplicated: set[str] = field(default_factory=set)
    submitted: int = 0
    acknowledged: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=200_000))


class _Listener(threading.Thread):
    """Reads every published result; frees a closed-loop slot per first completion."""

    def __init__(
        self,
        redis_url: str,
        book: _Book,
        metrics: RunMetrics,
        slots: threading.Semaphore | None,
        warmup_ids: set[str],
        warm: threading.Event,
    ) -> None:
        super().__init__(name="celery-peer-listener", daemon=True)
        import redis

        self.book, self.metrics, self.slots = book, metrics, slots
        self.warmup_ids, self.warm = warmup_ids, warm
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self._client = redis.Redis.from_url(redis_url, socket_timeout=5)
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        # subscribe before anything is sent, so no result can be missed
        self._pubsub.psubscribe(RESULT_PREFIX + "*")

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                msg = self._pubsub.get_message(timeout=0.1)
                if msg is None or msg.get("type") != "pmessage":
                    continue
                now = time.monotonic()
                channel = (
                    msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
                )
                self._handle(channel[len(RESULT_PREFIX) :], msg["data"], now)
        except BaseException as err:  # reported by the main thread
            self.error = err
        finally:
            with contextlib.suppress(Exception):
                self._pubsub.close()
                self._client.close()

    def _handle(self, tid: str, data: bytes | str, now: float) -> None:
        if tid in self.warmup_ids:
            self.warm.set()
            return
        try:
            payload = json.loads(data)
        except ValueError:
            self.metrics.counters.inc("errors")
            return
        status = str(payload.get("status", ""))
        if status not in ("SUCCESS", "FAILURE", "REVOKED"):
            return  # STARTED / RETRY are not terminal
        book, m = self.book, self.metrics
        with book.lock:
            if tid not in book.send_mono:
                m.counters.inc("unknown_results")
                return
            if tid in book.done:
                book.duplicated.add(tid)
                m.counters.inc("duplicate_results")
                return
            book.done[tid] = status
            book.recent.append(now)
            sent = book.send_mono[tid]
            sent_wall = book.send_wall[tid]
            acked = book.ack_wall.get(tid)
        m.throughput.record(now)
        m.latency("end_to_end").record_s(now - sent)
        result = payload.get("result")
        if status == "SUCCESS" and isinstance(result, dict) and acked is not None:
            m.latency("dispatch").record_s(float(result["started"]) - acked)
            m.latency("submit_to_receive").record_s(float(result["started"]) - sent_wall)
        elif status != "SUCCESS":
            m.counters.inc("errors")
        if self.slots is not None:
            self.slots.release()


def run_celery(
    workload: Workload,
    *,
    config: CeleryPeerConfig | None = None,
    progress: ProgressSink | None = None,
    stop: threading.Event | None = None,
    schedule: Schedule | None = None,
    scenario: str = "steady",
) -> RunResult:
    """Run `workload` on a fresh Redis + Celery worker; stop both whatever happens.

    Raises:
        PeerError: redis-server or the worker did not start, or the client broke.
    """
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as err:
        raise PeerError(
            "--compare celery needs celery[redis]: pip install 'agentmesh[compare]'"
        ) from err
    config = config or CeleryPeerConfig()
    stop = stop or threading.Event()
    workdir = Path(tempfile.mkdtemp(prefix="agentmesh-celery-peer-"))
    redis_server = RedisServer(config.redis_server, workdir)
    worker: CeleryWorker | None = None
    try:
        t0 = time.monotonic()
        redis_server.start()
        redis_ready_s = time.monotonic() - t0
        run_id = new_run_id()
        worker = CeleryWorker(redis_server.url, f"lt-{run_id}", config.concurrency, workdir)
        worker.start()
        if schedule is None and not workload.closed_loop:
            schedule = RateSchedule(workload.rate_per_s)
        live = {"celery-worker": worker.proc, "redis": redis_server.proc}
        sampler = CpuSampler(
            lambda: {name: p.pid for name, p in live.items() if p is not None and p.poll() is None}
        )
        result = _drive(
            workload, redis_server.url, worker, run_id, config, progress, stop, schedule, sampler
        )
        result.scenario = scenario
        if isinstance(schedule, BurstSchedule):
            result.notes[1] = workload.describe(schedule.describe())
        result.extra["redis_ready_s"] = round(redis_ready_s, 3)
        result.extra["worker_log_tail"] = procs.tail(worker.log_path, 600) if result.lost else ""
        return result
    finally:
        # worker first: it must not reconnect-loop against a vanished broker
        if worker is not None:
            worker.stop()
        redis_server.stop()
        if not config.keep_dir:
            shutil.rmtree(workdir, ignore_errors=True)


def _drive(
    workload: Workload,
    redis_url: str,
    worker: CeleryWorker,
    run_id: str,
    config: CeleryPeerConfig,
    progress: ProgressSink | None,
    stop: threading.Event,
    schedule: Schedule | None,
    sampler: CpuSampler,
) -> RunResult:
    from celery import Celery

    from loadtest.celery_app import configure

    client = Celery("agentmesh_loadtest_client", broker=redis_url)  # no backend: see module doc
    configure(client, worker.queue)
    task_name = "loadtest.sleep" if workload.simulated else "loadtest.noop"
    args: list[Any] = [workload.sleep_ms / 1000.0] if workload.simulated else []

    book = _Book()
    warm = threading.Event()
    warmup_ids = {f"warmup-{run_id}"}
    slots = threading.Semaphore(workload.concurrency) if schedule is None else None
    metrics = RunMetrics(start_s=time.monotonic())
    listener = _Listener(redis_url, book, metrics, slots, warmup_ids, warm)
    listener.start()
    submitter: _Submitter | None = None
    try:
        # a round trip through the worker proves it consumes the queue
        t0 = time.monotonic()
        with client.producer_or_acquire() as producer:
            client.send_task("loadtest.noop", task_id=next(iter(warmup_ids)), producer=producer)
        while not warm.wait(0.1):
            if not worker.alive():
                raise PeerError(
                    f"celery worker exited; its log ends with:\n{procs.tail(worker.log_path)}"
                )
            if time.monotonic() - t0 > config.startup_timeout_s:
                raise PeerError(
                    f"celery worker not ready after {config.startup_timeout_s:g} s; "
                    f"its log ends with:\n{procs.tail(worker.log_path)}"
                )
            if stop.is_set():
                raise KeyboardInterrupt
        worker_ready_s = time.monotonic() - t0

        start = time.monotonic()
        metrics.throughput.start_s = start
        sampler.sample()
        sampled = start
        submitter = _Submitter(
            client, task_name, args, workload, run_id, book, slots, schedule, start
        )
        submitter.start()
        phase = "submitting"
        drain_deadline = 0.0
        while True:
            time.sleep(PROGRESS_INTERVAL_S)
            now = time.monotonic()
            if now - sampled >= SAMPLE_INTERVAL_S:
                sampler.sample()
                sampled = now
            if listener.error is not None:
                raise PeerError(f"result listener failed: {listener.error!r}") from listener.error
            if submitter.error is not None:
                raise PeerError(f"submitter failed: {submitter.error!r}") from submitter.error
            if stop.is_set():
                submitter.halt.set()
            with book.lock:
                outstanding = book.acknowledged - len(book.done)
            if phase == "submitting" and not submitter.is_alive():
                phase = "draining"
                drain_deadline = now + (0.0 if stop.is_set() else workload.drain_timeout_s)
            if progress is not None:
                progress(_snapshot(book, metrics, phase, now - start))
            if phase == "draining" and (outstanding <= 0 or now >= drain_deadline):
                break
            if not worker.alive():
                raise PeerError(
                    f"celery worker died; its log ends with:\n{procs.tail(worker.log_path)}"
                )
        end = time.monotonic()
        sampler.sample()
        if submitter.late:
            metrics.counters.inc("late_submits", submitter.late)
    finally:
        if submitter is not None:
            submitter.halt.set()
            submitter.join(5.0)
        listener.stopping.set()
        listener.join(5.0)

    result = _finish(
        workload, redis_url, worker.queue, book, metrics, run_id, end - start, worker_ready_s
    )
    result.cpu = sampler.summary(completed=result.completed, window_s=end - start)
    if not stop.is_set() and (behind := workload.fell_behind(result.submitted)):
        result.notes.append(behind)
    return result


class _Submitter(threading.Thread):
    """Sends the tasks: closed loop (a slot per task in flight) or open loop (a schedule)."""

    def __init__(
        self,
        client: Any,
        task_name: str,
        args: list[Any],
        workload: Workload,
        run_id: str,
        book: _Book,
        slots: threading.Semaphore | None,
        schedule: Schedule | None,
        start: float,
    ) -> None:
        super().__init__(name="celery-peer-submitter", daemon=True)
        self.schedule = schedule
        self.client, self.task_name, self.args = client, task_name, args
        self.workload, self.run_id, self.book = workload, run_id, book
        self.slots, self.start_s = slots, start
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.late = 0

    def run(self) -> None:
        w = self.workload
        deadline = self.start_s + w.duration_s
        try:
            with self.client.producer_or_acquire() as producer:
                for seq in range(w.max_tasks):
                    if self.halt.is_set() or time.monotonic() >= deadline:
                        return
                    if self.slots is not None:
                        while not self.slots.acquire(timeout=0.05):
                            if self.halt.is_set() or time.monotonic() >= deadline:
                                return
                    elif self.schedule is not None:
                        due = self.start_s + self.schedule.next_at(seq)
                        delay = due - time.monotonic()
                        if delay > 0:
                            if self.halt.wait(delay):
                                return
                        elif delay < -0.001:
                            self.late += 1
                    self._send(producer, task_id(self.run_id, seq))
        except BaseException as err:
            self.error = err

    def _send(self, producer: Any, tid: str) -> None:
        book = self.book
        # the lock spans the publish so a fast result never finds its ack time missing
        with book.lock:
            book.submitted += 1
            book.send_mono[tid] = time.monotonic()
            book.send_wall[tid] = time.time()
            self.client.send_task(self.task_name, args=self.args, task_id=tid, producer=producer)
            book.ack_wall[tid] = time.time()
            book.acknowledged += 1


def _snapshot(book: _Book, metrics: RunMetrics, phase: str, elapsed: float) -> ProgressSnapshot:
    now = time.monotonic()
    with book.lock:
        recent = 0
        for t in reversed(book.recent):
            if now - t > 1.0:
                break
            recent += 1
        done = len(book.done)
        snap = ProgressSnapshot(
            system="celery",
            phase=phase,
            elapsed_s=elapsed,
            submitted=book.submitted,
            acknowledged=book.acknowledged,
            completed=done,
            inflight=book.acknowledged - done,
            errors=metrics.counters["errors"],
            rate_last_s=float(recent),
            submit_to_receive_p99_ms=metrics.latency("submit_to_receive").percentile_ms(99.0),
        )
    return snap


def _finish(
    workload: Workload,
    redis_url: str,
    queue: str,
    book: _Book,
    metrics: RunMetrics,
    run_id: str,
    duration_s: float,
    worker_ready_s: float,
) -> RunResult:
    """The final scan: every acknowledged id must have one stored SUCCESS result."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    ids = list(book.ack_wall)
    states: dict[str, int] = {}
    missing: list[str] = []
    try:
        # messages still queued or reserved are late, not lost
        pending = int(client.llen(queue)) + int(client.hlen("unacked"))
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            values = client.mget([RESULT_PREFIX + t for t in chunk])
            for tid, raw in zip(chunk, values, strict=True):
                if raw is None:
                    missing.append(tid)
                    continue
                status = str(json.loads(raw).get("status", "UNKNOWN"))
                states[status] = states.get(status, 0) + 1
                if status not in ("SUCCESS", "FAILURE", "REVOKED"):
                    missing.append(tid)
    finally:
        client.close()
    lost, unfinished = ([], missing) if pending else (missing, [])
    notes = [
        "Celery 5 + Redis: threads pool, acks_late, prefetch 1; Redis without persistence "
        "(no RDB, no AOF, so no fsync): results and queue live in memory only",
        f"{workload.describe()}",
    ]
    result = RunResult(
        system="celery",
        scenario="steady",
        metrics=metrics,
        duration_s=duration_s,
        submitted=book.submitted,
        acknowledged=book.acknowledged,
        completed=len(book.done),
        terminal_states={_STATE_NAMES.get(k, k): v for k, v in states.items()},
        lost=lost,
        unfinished=unfinished,
        duplicated=sorted(book.duplicated),
        notes=notes,
        extra={"worker_ready_s": round(worker_ready_s, 3), "run_id": run_id},
    )
    return result


# Celery's names for what agentmesh calls SUCCEEDED / DEAD_LETTER / CANCELLED
_STATE_NAMES = {"SUCCESS": "SUCCEEDED", "FAILURE": "DEAD_LETTER", "REVOKED": "CANCELLED"}
