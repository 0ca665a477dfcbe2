"""The Celery app the peer's worker process runs (`celery -A loadtest.celery_app worker`).

Configured from the environment by `celery_peer`, which starts the worker; it
is not imported by anything else (Celery is an optional dependency).
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

REDIS_URL_ENV = "AGENTMESH_LOADTEST_CELERY_REDIS_URL"
QUEUE_ENV = "AGENTMESH_LOADTEST_CELERY_QUEUE"
DEFAULT_QUEUE = "agentmesh-loadtest"

_url = os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0")

app = Celery("agentmesh_loadtest", broker=_url, backend=_url)


def configure(celery: Celery, queue: str) -> None:
    """The at-least-once settings the comparison is about, shared by worker and client."""
    celery.conf.update(
        # at-least-once: acknowledge after the task ran, take one message per thread
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_default_queue=queue,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=3600,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # 200 threads each hold a connection while acking; kombu's default pool is 10
        broker_transport_options={"max_connections": 1000},
        redis_max_connections=1000,
        broker_pool_limit=None,
    )


configure(app, os.environ.get(QUEUE_ENV, DEFAULT_QUEUE))


@app.task(name="loadtest.noop")  # type: ignore[untyped-decorator]
def noop() -> dict[str, Any]:
    """Returns at once; `started` is the dispatch measurement point."""
    started = time.time()
    return {"started": started, "finished": time.time()}


@app.task(name="loadtest.sleep")  # type: ignore[untyped-decorator]
def sleep(seconds: float) -> dict[str, Any]:
    """Simulated work: sleeps, holding one worker thread like a blocking call would."""
    started = time.time()
    time.sleep(seconds)
    return {"started": started, "finished": time.time()}
