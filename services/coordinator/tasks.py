"""Task rules every part of the coordinator shares: the states and which are
terminal or held, how a new task's id is chosen, and the retry backoff.

(Validation, with every limit, lives in limits.py.)
"""

from __future__ import annotations

import hashlib
import random

from protos.agentmesh.v1 import task_pb2 as tpb

S = tpb.TaskState
QUEUED, ASSIGNED, RUNNING = S.TASK_STATE_QUEUED, S.TASK_STATE_ASSIGNED, S.TASK_STATE_RUNNING
SUCCEEDED, FAILED, CANCELLED, DEAD_LETTER = (
    S.TASK_STATE_SUCCEEDED,
    S.TASK_STATE_FAILED,
    S.TASK_STATE_CANCELLED,
    S.TASK_STATE_DEAD_LETTER,
)
TERMINAL = frozenset({SUCCEEDED, CANCELLED, DEAD_LETTER})
HELD = frozenset({ASSIGNED, RUNNING})


def state_name(state: int) -> str:
    return S.Name(state).removeprefix("TASK_STATE_")


def task_id_for(spec: tpb.TaskSpec, wall_us: int, rng: random.Random) -> str:
    """The id a new task gets: the client's, one derived from its idempotency key,
    or a fresh time-ordered one (so listing by key lists by submit time)."""
    if spec.task_id:
        return spec.task_id
    if spec.idempotency_key:
        return "k-" + hashlib.sha256(spec.idempotency_key.encode()).hexdigest()[:32]
    return f"t-{wall_us:014x}-{rng.getrandbits(40):010x}"


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: half fixed, half random, so retries
    of a burst of failures spread out without ever retrying at once."""
    ceiling = min(cap_s, base_s * 2.0 ** max(0, attempt - 1))
    return ceiling / 2 + rng.uniform(0, ceiling / 2)
