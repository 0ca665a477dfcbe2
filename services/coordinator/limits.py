"""Every limit on what a request may carry, and the checks that enforce them.

One table (`LIMITS`) lists each limit with its default and what a caller gets past it;
the README's "Limits" table is written from it (a unit test keeps the two in step).
The servicers check requests at the edge with the functions below, the core calls
`validate_spec` and `validate_hello`, and the store refuses any write that would not
fit etcd. Pure: no grpc, no etcd.

Why the sizes: a task is one etcd record holding its spec (with the payload) and,
once it succeeds, its result. etcd refuses any request over 1.5 MiB
(--max-request-bytes), so the largest payload plus the largest result plus every
other field at its limit must fit in one transaction with room to spare. 512 KiB +
512 KiB + at most ~130 KiB of other fields (`SPEC_FIELDS_MAX_BYTES` and
`TASK_FIELDS_MAX_BYTES`) is ~1.13 MiB, under `RECORD_BUDGET_BYTES` (1.25 MiB), which
leaves a quarter MiB below etcd's limit for the transaction around the record.
`check_config` refuses a configuration that breaks this.

Messages name the field and the limit, and quote at most `QUOTE_CHARS` characters
of the input: a 1 MB kind must not come back in a 1 MB status message, which a
default client refuses as oversized metadata.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from protos.agentmesh.v1 import coordinator_pb2 as cpb
from protos.agentmesh.v1 import task_pb2 as tpb
from services._common.errors import InvalidArgumentError
from services.agent_pool.llm_config import LlmConfig
from services.agent_pool.llm_payload import LlmRequest, PayloadError, parse_payload

KiB = 1024
MiB = 1024 * KiB

# ---- etcd and gRPC, the hard ceilings everything below fits under

ETCD_REQUEST_BYTES = 3 * MiB // 2
"""etcd's default --max-request-bytes: a larger transaction is refused whole."""
TXN_PACK_BYTES = 1 * MiB
"""The group commit packs writes into one transaction up to this many bytes (a write
larger than this goes alone)."""
WRITE_MAX_BYTES = ETCD_REQUEST_BYTES - 64 * KiB
"""The largest single write the store sends; larger ones are refused before sending
(64 KiB below etcd's limit covers the transaction's keys, compares and header)."""
RECORD_BUDGET_BYTES = 5 * MiB // 4
"""What payload + result + every other field at its limit must fit in (check_config)."""
MAX_REQUEST_BYTES = 8 * MiB
"""gRPC receive limit of every agentmesh server: a larger message is refused by gRPC
with RESOURCE_EXHAUSTED before it is decoded (the largest legal request, a SubmitBatch
of near-limit specs, is split across transactions by the group commit)."""
LIST_PAGE_BYTES = 3 * MiB
"""ListTasks and ListAgents stop a page at this size, under a default client's 4 MiB
receive limit."""
LIST_READ_RECORDS = 32
"""Records read from etcd per range while listing: 32 records at the largest size
(~1.25 MiB) stay well under the etcd client's 64 MiB receive limit."""

# ---- defaults of the configurable limits (CoordinatorConfig, PoolConfig)

MAX_PAYLOAD_BYTES = 512 * KiB
MAX_RESULT_BYTES = 512 * KiB
MAX_WATCHERS = 64
WATCH_BUFFER_EVENTS = 10_000
WATCH_BUFFER_BYTES = 4 * MiB

# ---- fixed limits

ID_BYTES = 128
IDEMPOTENCY_KEY_BYTES = 256
KIND_BYTES = 64
ROLE_BYTES = 128
LABELS_ENTRIES = 32
LABEL_KEY_BYTES = 128
LABEL_VALUE_BYTES = 256
METADATA_ENTRIES = 64
METADATA_KEY_BYTES = 128
METADATA_VALUE_BYTES = 1 * KiB
# W3C Trace Context: traceparent is 55 bytes; tracestate is at most 32 members, which
# W3C lets a carrier cut to 512 characters
TRACE_CONTEXT_ENTRIES = 4
TRACE_CONTEXT_KEY_BYTES = 64
TRACE_CONTEXT_VALUE_BYTES = 512
ROLES_ITEMS = 16
KINDS_ITEMS = 32
HELD_CLAIMS_ITEMS = 2000
REASON_BYTES = 1 * KiB
ERROR_BYTES = 4 * KiB
PROGRESS_MESSAGE_BYTES = 1 * KiB
STATES_ITEMS = 16
PAGE_SIZE_MAX = 1000
WATCH_BATCH_MAX = 1000
WATCH_BATCH_BYTES = 1024 * 1024
"""A batched WatchEvents message: at most this many bytes of events (or one larger event)."""
BATCH_ITEMS = 1000
SUBMIT_STREAM_PENDING = 1000
SUBMIT_STREAM_PENDING_BYTES = MAX_REQUEST_BYTES
"""SubmitStream requests that wait for their response at once, by count and by bytes
(what one SubmitBatch may hold): the server reads no further until one is answered (a
client that does not read is held by flow control). A request larger than the bytes
left waits until every earlier one is answered."""
PRIORITY_MAX = 9
MAX_ATTEMPTS_MAX = 100
CAPACITY_MAX = 1000
TIMEOUT_S_MAX = 7 * 24 * 3600.0
SPAWN_MAX = 10_000
WAVE_INTERVAL_S_MAX = 3600.0
CONNECT_BUFFER_MESSAGES = 10_000
"""Messages the coordinator queues for one agent's stream (assignments, acks, cancels)
before it ends the stream with RESOURCE_EXHAUSTED: an agent that stops reading."""

QUOTE_CHARS = 32

SPEC_FIELDS_MAX_BYTES = (
    ID_BYTES
    + IDEMPOTENCY_KEY_BYTES
    + KIND_BYTES
    + ROLE_BYTES
    + LABELS_ENTRIES * (LABEL_KEY_BYTES + LABEL_VALUE_BYTES + 8)
    + METADATA_ENTRIES * (METADATA_KEY_BYTES + METADATA_VALUE_BYTES + 8)
    + 64
)
"""Everything in a TaskSpec but the payload, at its limits (with each field's tag and
length prefix); ~87 KiB."""
TASK_FIELDS_MAX_BYTES = ERROR_BYTES + ID_BYTES * 2 + 256
"""Everything in a Task record beside its spec and result: last error, ids, counters."""


@dataclass(frozen=True, slots=True)
class Limit:
    """One row of the limits table."""

    what: str
    default: str
    past: str
    setting: str = ""


LIMITS: tuple[Limit, ...] = (
    Limit(
        "TaskSpec.payload",
        "512 KiB",
        "INVALID_ARGUMENT",
        "AGENTMESH_MAX_PAYLOAD_BYTES",
    ),
    Limit(
        "TaskResult.output (a task's result)",
        "512 KiB",
        "the agent fails the task itself (not retried); the coordinator fails it too "
        "(DEAD_LETTER, an error saying so) and acks the report with the reason",
        "AGENTMESH_MAX_RESULT_BYTES (coordinator and pool)",
    ),
    Limit(
        "payload + result + other fields of one task",
        "1.25 MiB",
        "the coordinator refuses to start with such a configuration",
    ),
    Limit("any gRPC request message", "8 MiB", "RESOURCE_EXHAUSTED (from gRPC)"),
    Limit("SubmitBatch.specs", "1,000 specs", "INVALID_ARGUMENT"),
    Limit(
        "SubmitStream requests awaiting their response",
        "1,000 requests, 8 MiB",
        "the server reads no further until one is answered (gRPC flow control holds the client)",
    ),
    Limit("task_id (every request)", "128 bytes of A-Z a-z 0-9 . _ -", "INVALID_ARGUMENT"),
    Limit("TaskSpec.idempotency_key", "256 bytes", "INVALID_ARGUMENT"),
    Limit("TaskSpec.kind, ListTasksRequest.kind", "64 bytes", "INVALID_ARGUMENT"),
    Limit("TaskSpec.role", "128 bytes", "INVALID_ARGUMENT"),
    Limit(
        "TaskSpec.required_labels, AgentHello.labels, AgentTemplate.labels",
        "32 entries; keys 128 bytes, values 256 bytes",
        "INVALID_ARGUMENT",
    ),
    Limit("TaskSpec.metadata", "64 entries; keys 128 bytes, values 1 KiB", "INVALID_ARGUMENT"),
    Limit(
        "TaskSpec.trace_context", "4 entries; keys 64 bytes, values 512 bytes", "INVALID_ARGUMENT"
    ),
    Limit("TaskSpec.priority", "0-9", "INVALID_ARGUMENT"),
    Limit("TaskSpec.max_attempts", "0-100 (0: the default)", "INVALID_ARGUMENT"),
    Limit("TaskSpec.timeout_s", "finite, 0 to 7 days", "INVALID_ARGUMENT"),
    Limit("CancelTaskRequest.reason, DrainPoolRequest.reason", "1 KiB", "INVALID_ARGUMENT"),
    Limit("ListTasksRequest.states, WatchEventsRequest.states", "16 states", "INVALID_ARGUMENT"),
    Limit("WatchEventsRequest.max_batch", "0-1,000; 1 MiB a message", "INVALID_ARGUMENT"),
    Limit("ListTasksRequest.page_size, ListAgentsRequest.page_size", "1-1,000", "INVALID_ARGUMENT"),
    Limit(
        "one ListTasks or ListAgents page",
        "3 MiB",
        "a shorter page with a next_page_token",
    ),
    Limit("AgentHello.agent_id, pool_id", "128 bytes", "INVALID_ARGUMENT (the stream ends)"),
    Limit(
        "AgentHello.roles, AgentTemplate.roles",
        "16 roles of 128 bytes",
        "INVALID_ARGUMENT (the stream ends)",
    ),
    Limit(
        "AgentHello.kinds, AgentTemplate.kinds",
        "1-32 kinds of 64 bytes",
        "INVALID_ARGUMENT (the stream ends)",
    ),
    Limit("AgentHello.capacity", "1-1,000", "INVALID_ARGUMENT (the stream ends)"),
    Limit("AgentHello.held_claims", "2,000", "INVALID_ARGUMENT (the stream ends)"),
    Limit("TaskFailure.error", "4 KiB", "cut to 4 KiB, saying so"),
    Limit(
        "TaskProgress.message, .fraction",
        "1 KiB; 0-1",
        "message cut; fraction clamped (NaN: dropped)",
    ),
    Limit(
        "messages queued for one agent's Connect stream",
        "10,000",
        "the stream is cut off (CANCELLED: its agent reads nothing); the agent reconnects",
    ),
    Limit(
        "watchers (WatchTask and WatchEvents streams) per coordinator",
        "64",
        "RESOURCE_EXHAUSTED, saying the cap is reached",
        "AGENTMESH_MAX_WATCHERS",
    ),
    Limit(
        "events queued for one watcher",
        "10,000 events or 4 MiB",
        "RESOURCE_EXHAUSTED (reopen the watch; re-read with GetTask)",
        "AGENTMESH_WATCH_BUFFER_EVENTS, AGENTMESH_WATCH_BUFFER_BYTES",
    ),
    Limit("SpawnAgents.count, SpawnWaves.count", "1-10,000", "INVALID_ARGUMENT"),
    Limit(
        "SpawnAgents.count with its template",
        "what one 3 MiB reply lists (212 agents of the largest template)",
        "INVALID_ARGUMENT, naming the count that fits",
    ),
    Limit(
        "`agentmesh up` and `loadtest`: `--agents` per `--pools`",
        "10,000 a pool",
        "exit 2 before anything starts, naming the `--pools` that would fit",
    ),
    Limit(
        "`serve agent-pool --pool-id` (else `--node-id`)",
        "112 characters of A-Z a-z 0-9 . _ -",
        "exit 2 before anything starts",
    ),
    Limit("SpawnWaves.wave_interval_s", "finite, 0-3,600", "INVALID_ARGUMENT"),
    Limit("SpawnAgents.replaces", "an agent id (128 bytes), with count 1", "INVALID_ARGUMENT"),
    Limit("AgentPool ListAgents page_size", "0-10,000 (0: as many as fit)", "INVALID_ARGUMENT"),
    Limit("one AgentPool ListAgents page", "3 MiB", "a shorter page with a next_page_token"),
    Limit(
        "StopAgents.agent_ids, .count",
        "10,000 ids of 128 bytes (an id given twice counts once); count 0-10,000",
        "INVALID_ARGUMENT",
    ),
)

_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


# ---- messages


def quote(value: str | bytes) -> str:
    """A short, safe rendering of user input for an error message."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    return repr(text[:QUOTE_CHARS]) + "…"


def size_of(value: str | bytes) -> int:
    """Bytes on the wire (UTF-8 for strings); cheap for ASCII-sized strings."""
    if isinstance(value, bytes):
        return len(value)
    return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))


def _too_long(where: str, value: str | bytes, limit: int) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"{where} is {size_of(value)} bytes; the limit is {limit} bytes (it starts {quote(value)})"
    )


def check_bytes(where: str, value: str | bytes, limit: int) -> None:
    # len() first: a string of n characters is at most 4n bytes, so most need no encode
    if len(value) * (1 if isinstance(value, bytes) else 4) > limit and size_of(value) > limit:
        raise _too_long(where, value, limit)


def check_items(where: str, items: Iterable[str], count: int, item_bytes: int) -> None:
    items = list(items)
    if len(items) > count:
        raise InvalidArgumentError(f"{where} has {len(items)} items; the limit is {count}")
    for i, item in enumerate(items):
        check_bytes(f"{where}[{i}]", item, item_bytes)


def check_map(
    where: str, entries: Mapping[str, str], count: int, key_bytes: int, value_bytes: int
) -> None:
    if len(entries) > count:
        raise InvalidArgumentError(f"{where} has {len(entries)} entries; the limit is {count}")
    for key, value in entries.items():
        check_bytes(f"{where} key", key, key_bytes)
        check_bytes(f"{where}[{quote(key)}]", value, value_bytes)


def check_id(where: str, value: str, *, required: bool = True) -> None:
    """An id of the mesh: 1-128 bytes of A-Z a-z 0-9 . _ -."""
    if not value:
        if required:
            raise InvalidArgumentError(f"{where} is required")
        return
    if not _ID_RE.fullmatch(value):
        raise InvalidArgumentError(
            f"{where} {quote(value)} is invalid: use 1-{ID_BYTES} characters of A-Z a-z 0-9 . _ -"
        )


def agents_per_pool_problem(agents: int, pools: int) -> str:
    """'' when `agents` spread over `pools` (at least 1) fit what one pool starts at once,
    else what to change: for `agentmesh up` and `loadtest`, before any process starts."""
    share = -(-agents // pools)
    if share <= SPAWN_MAX:
        return ""
    return (
        f"--agents {agents:,} over --pools {pools} is {share:,} agents a pool, and a pool "
        f"starts at most {SPAWN_MAX:,}: use --pools {-(-agents // SPAWN_MAX)} or more"
    )


def check_finite(where: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise InvalidArgumentError(f"{where} {value!r} is out of range: use {low:g}-{high:g}")


def check_states(where: str, states: Iterable[int]) -> None:
    states = list(states)
    if len(states) > STATES_ITEMS:
        raise InvalidArgumentError(f"{where} has {len(states)} items; the limit is {STATES_ITEMS}")


def check_watch_batch(where: str, n: int) -> None:
    if n > WATCH_BATCH_MAX:
        raise InvalidArgumentError(
            f"{where} {n} is too large: use 2-{WATCH_BATCH_MAX} to batch events, 0 or 1 not to"
        )


def check_page_size(where: str, size: int) -> None:
    if size > PAGE_SIZE_MAX:
        raise InvalidArgumentError(
            f"{where} {size} is too large: use 1-{PAGE_SIZE_MAX} (0: the default)"
        )


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes, saying so when cut (for what an agent
    reports: a failure's error must still count, whatever its size)."""
    if size_of(text) <= limit:
        return text
    note = f" … (cut from {size_of(text)} bytes)"
    head = text.encode("utf-8", "surrogatepass")[: limit - size_of(note)]
    return head.decode("utf-8", "ignore") + note


# ---- requests


def validate_spec(
    spec: tpb.TaskSpec, cfg: Any, where: str = "spec", llm: LlmConfig | None = None
) -> None:
    """Raise InvalidArgumentError naming the field to fix. `cfg` has task_kinds and
    max_payload_bytes (a CoordinatorConfig)."""
    kinds = ", ".join(cfg.task_kinds)
    if not spec.kind:
        raise InvalidArgumentError(f"{where}.kind is required (one of: {kinds})")
    if spec.kind not in cfg.task_kinds:
        raise InvalidArgumentError(
            f"{where}.kind {quote(spec.kind)} is unknown; use one of: {kinds}"
        )
    check_id(f"{where}.task_id", spec.task_id, required=False)
    check_bytes(f"{where}.idempotency_key", spec.idempotency_key, IDEMPOTENCY_KEY_BYTES)
    if len(spec.payload) > cfg.max_payload_bytes:
        raise InvalidArgumentError(
            f"{where}.payload is {len(spec.payload)} bytes; the limit is {cfg.max_payload_bytes} bytes"
        )
    if spec.priority > PRIORITY_MAX:
        raise InvalidArgumentError(
            f"{where}.priority {spec.priority} is out of range: use 0 (lowest) to {PRIORITY_MAX}"
        )
    if spec.max_attempts > MAX_ATTEMPTS_MAX:
        raise InvalidArgumentError(
            f"{where}.max_attempts {spec.max_attempts} is out of range: use 1-{MAX_ATTEMPTS_MAX} (0: default)"
        )
    if not (math.isfinite(spec.timeout_s) and 0 <= spec.timeout_s <= TIMEOUT_S_MAX):
        raise InvalidArgumentError(
            f"{where}.timeout_s must be a finite number of seconds, 0 (default) to {TIMEOUT_S_MAX:g}"
        )
    check_bytes(f"{where}.role", spec.role, ROLE_BYTES)
    check_map(
        f"{where}.required_labels",
        spec.required_labels,
        LABELS_ENTRIES,
        LABEL_KEY_BYTES,
        LABEL_VALUE_BYTES,
    )
    check_map(
        f"{where}.metadata",
        spec.metadata,
        METADATA_ENTRIES,
        METADATA_KEY_BYTES,
        METADATA_VALUE_BYTES,
    )
    check_map(
        f"{where}.trace_context",
        spec.trace_context,
        TRACE_CONTEXT_ENTRIES,
        TRACE_CONTEXT_KEY_BYTES,
        TRACE_CONTEXT_VALUE_BYTES,
    )
    if spec.kind == "llm":
        validate_llm_payload(spec, llm or DEFAULT_LLM, where)


DEFAULT_LLM = LlmConfig()
"""The llm section when the caller passes none (the built-in roles, models and max_tokens cap);
the leader passes its configured one."""


def validate_llm_payload(spec: tpb.TaskSpec, llm: LlmConfig, where: str = "spec") -> LlmRequest:
    """An `llm` task's payload, checked at submit (the schema in
    services/agent_pool/llm_payload.schema.json) so a mistake is refused with
    INVALID_ARGUMENT instead of failing on an agent after it waited its turn."""
    try:
        return parse_payload(spec.payload, llm, spec.role)
    except PayloadError as err:
        raise InvalidArgumentError(
            f"{where}.payload: {clip(str(err), 1024)} "
            "(see services/agent_pool/llm_payload.schema.json)"
        ) from None


def validate_batch(specs: Any, cfg: Any) -> None:
    if not specs:
        raise InvalidArgumentError("specs is empty: submit at least one task")
    if len(specs) > BATCH_ITEMS:
        raise InvalidArgumentError(
            f"a batch holds at most {BATCH_ITEMS} tasks; split it ({len(specs)} given)"
        )
    for i, spec in enumerate(specs):
        validate_spec(spec, cfg, f"specs[{i}]" if len(specs) > 1 else "spec")


def validate_template_fields(
    where: str, roles: Iterable[str], labels: Mapping[str, str], kinds: Iterable[str]
) -> None:
    """What an agent advertises (a hello, or a pool's template for its agents' hellos)."""
    check_items(f"{where}.roles", roles, ROLES_ITEMS, ROLE_BYTES)
    check_map(f"{where}.labels", labels, LABELS_ENTRIES, LABEL_KEY_BYTES, LABEL_VALUE_BYTES)
    check_items(f"{where}.kinds", kinds, KINDS_ITEMS, KIND_BYTES)


def validate_hello(hello: cpb.AgentHello) -> None:
    if not _ID_RE.fullmatch(hello.agent_id):
        raise InvalidArgumentError(
            f"hello.agent_id is required: 1-{ID_BYTES} characters of A-Z a-z 0-9 . _ -"
            + (f" (got {quote(hello.agent_id)})" if hello.agent_id else "")
        )
    check_bytes("hello.pool_id", hello.pool_id, ID_BYTES)
    if hello.lease_id <= 0:
        raise InvalidArgumentError("hello.lease_id must be the agent process's live etcd lease")
    if not 1 <= hello.capacity <= CAPACITY_MAX:
        raise InvalidArgumentError(
            f"hello.capacity {hello.capacity} is out of range: use 1-{CAPACITY_MAX}"
        )
    if not hello.kinds:
        raise InvalidArgumentError("hello.kinds must name at least one task kind the agent can run")
    validate_template_fields("hello", hello.roles, hello.labels, hello.kinds)
    if len(hello.held_claims) > HELD_CLAIMS_ITEMS:
        raise InvalidArgumentError(
            f"hello.held_claims has {len(hello.held_claims)} items; the limit is {HELD_CLAIMS_ITEMS}"
        )
    for i, ref in enumerate(hello.held_claims):
        check_bytes(f"hello.held_claims[{i}].task_id", ref.task_id, ID_BYTES)


def check_config(cfg: Any) -> None:
    """Refuse (ValueError) a coordinator configuration whose largest task would not fit
    one etcd transaction, or whose limits make no sense."""
    for name in ("max_payload_bytes", "max_result_bytes", "max_watchers", "watch_buffer_events"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"{name} must be positive")
    record = (
        cfg.max_payload_bytes + cfg.max_result_bytes + SPEC_FIELDS_MAX_BYTES + TASK_FIELDS_MAX_BYTES
    )
    if record > RECORD_BUDGET_BYTES:
        raise ValueError(
            f"max_payload_bytes ({cfg.max_payload_bytes}) + max_result_bytes "
            f"({cfg.max_result_bytes}) + the other fields at their limits "
            f"({SPEC_FIELDS_MAX_BYTES + TASK_FIELDS_MAX_BYTES}) is {record} bytes: over the "
            f"{RECORD_BUDGET_BYTES}-byte budget of one task record, which must fit etcd's "
            f"{ETCD_REQUEST_BYTES}-byte request limit with room to spare; lower one of them"
        )


def result_too_large(size: int, limit: int) -> str:
    """The error a task gets when its result is over the limit."""
    return (
        f"the result is {size} bytes; the limit is {limit} bytes "
        "(AGENTMESH_MAX_RESULT_BYTES): not stored, the task failed without a retry"
    )
