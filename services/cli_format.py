"""Tasks as people read them: bytes as text or base64, times as local dates and durations.

Pure functions over the Task proto (no grpc, no terminal), so the CLI, a status view or
a dashboard can share them, and they move with the CLI wherever it goes.
"""

from __future__ import annotations

import base64
import datetime as dt

from protos.agentmesh.v1 import task_pb2 as tpb

# Longest text or base64 shown for one field; `--json` gives all of it.
MAX_CHARS = 4096
# Control characters a text may hold and still be printed as text.
_TEXT_CONTROLS = frozenset("\n\r\t")
LABEL_WIDTH = 10


def bytes_view(data: bytes, max_chars: int = MAX_CHARS) -> tuple[str, str]:
    """('text', the text) when `data` is UTF-8 without control characters other than
    newline, carriage return and tab; else ('base64', its base64). Either is cut at
    `max_chars`, with a note of what was left out."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and not any(
        (ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0) and ch not in _TEXT_CONTROLS for ch in text
    ):
        kind, shown = "text", text
    else:
        kind, shown = "base64", base64.b64encode(data).decode("ascii")
    if len(shown) > max_chars:
        shown = (
            shown[:max_chars] + f" … ({len(shown) - max_chars} more characters; --json shows all)"
        )
    return kind, shown


def local_time(us: int, tz: dt.tzinfo | None = None) -> str:
    """Microseconds since the epoch as a date in `tz` (default: this machine's zone)."""
    when = dt.datetime.fromtimestamp(us / 1e6, tz=dt.UTC).astimezone(tz)
    zone = when.tzname() or when.strftime("%z")
    return f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d} {zone}"


def duration(us: int) -> str:
    """A span of microseconds for a person: '850 µs', '12.3 ms', '4.52 s', '3 min 5 s', '2 h 4 min'."""
    if us < 0:
        return "-" + duration(-us)
    if us < 1000:
        return f"{us} µs"
    if us < 1_000_000:
        return f"{us / 1000:.3g} ms"
    s = us / 1e6
    if s < 60:
        return f"{s:.3g} s"
    whole = round(s)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def _field(label: str, value: str) -> list[str]:
    """`label  value`, a multi-line value indented under its first line."""
    first, *rest = value.split("\n") if value else [""]
    pad = " " * (LABEL_WIDTH + 1)
    return [f"{label:<{LABEL_WIDTH}} {first}".rstrip(), *(pad + line for line in rest)]


def _bytes_field(label: str, data: bytes, max_chars: int) -> list[str]:
    if not data:
        return _field(label, "(empty)")
    kind, shown = bytes_view(data, max_chars)
    size = f"{len(data):,} byte{'s' if len(data) != 1 else ''}"
    if kind == "text" and "\n" not in shown:
        return _field(label, f"{shown}   ({size}, text)")
    return [
        *_field(label, f"({size}, {kind})"),
        *(" " * (LABEL_WIDTH + 1) + line for line in shown.split("\n")),
    ]


def format_task(task: tpb.Task, tz: dt.tzinfo | None = None, max_chars: int = MAX_CHARS) -> str:
    """One task as lines of `label  value` for a terminal (not for parsing: use the JSON)."""
    spec = task.spec
    state = tpb.TaskState.Name(task.state).removeprefix("TASK_STATE_")
    attempts = f"{task.attempts}/{spec.max_attempts}" if spec.max_attempts else str(task.attempts)
    lines = _field("task", task.task_id)
    lines += _field(
        "state",
        f"{state}   attempts {attempts}   agent {task.agent_id or '-'}   term {task.term or '-'}",
    )
    kind = f"{spec.kind}   priority {spec.priority}"
    if spec.role:
        kind += f"   role {spec.role}"
    if spec.timeout_s:
        kind += f"   timeout {duration(int(spec.timeout_s * 1e6))}"
    lines += _field("kind", kind)
    if spec.required_labels:
        lines += _field(
            "labels", ", ".join(f"{k}={v}" for k, v in sorted(spec.required_labels.items()))
        )
    if spec.metadata:
        lines += _field("metadata", ", ".join(f"{k}={v}" for k, v in sorted(spec.metadata.items())))
    if spec.idempotency_key:
        lines += _field("idem-key", spec.idempotency_key)
    lines += _bytes_field("payload", spec.payload, max_chars)
    if task.result or task.state == tpb.TASK_STATE_SUCCEEDED:
        lines += _bytes_field("result", task.result, max_chars)
    if task.last_error:
        lines += _field("error", task.last_error)
    usage = task.usage
    if usage.input_tokens or usage.output_tokens or usage.cost_usd:
        lines += _field(
            "usage",
            f"{usage.input_tokens:,} tokens in, {usage.output_tokens:,} out, ${usage.cost_usd:.4f}",
        )
    if task.claim_token:
        lines += _field("claim", str(task.claim_token))
    created = task.created_at_us
    if created:
        lines += _field("created", local_time(created, tz))
    for label, us in (
        ("assigned", task.assigned_at_us),
        ("received", task.received_at_us),
        ("finished", task.finished_at_us),
    ):
        if us:
            since = f"   (+{duration(us - created)})" if created else ""
            lines += _field(label, local_time(us, tz) + since)
    if task.not_before_us and task.state == tpb.TASK_STATE_QUEUED:
        lines += _field("retry", "not before " + local_time(task.not_before_us, tz))
    if created and task.finished_at_us:
        took = f"{duration(task.finished_at_us - created)} in all"
        if task.assigned_at_us:
            # assigned_at_us is the current claim's: earlier attempts are in the total only
            took += f"; the last attempt ran {duration(task.finished_at_us - task.assigned_at_us)}"
        lines += _field("took", took)
    return "\n".join(lines)
