"""`agentmesh task get` for people: bytes as text or base64, local dates, durations (no sockets)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from protos.agentmesh.v1 import task_pb2 as tpb
from services import cli
from services.cli import tasks as cli_tasks
from services.cli_format import bytes_view, duration, format_task, local_time

PLUS_2 = dt.timezone(dt.timedelta(hours=2))
CREATED_US = 1_795_913_561_872_484  # 2026-11-29 00:52:41.872484 UTC


def lines_of(text: str) -> dict[str, str]:
    """First line of each `label  value` field, by label."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith(" "):
            label, _, value = line.partition(" ")
            out[label] = value.strip()
    return out


def block_of(text: str, label: str) -> list[str]:
    """The indented lines under `label`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(label + " "))
    block = []
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        block.append(line.strip())
    return block


def succeeded(payload: bytes, result: bytes) -> tpb.Task:
    return tpb.Task(
        task_id="t-1",
        spec=tpb.TaskSpec(kind="echo", payload=payload, max_attempts=3),
        state=tpb.TASK_STATE_SUCCEEDED,
        attempts=1,
        agent_id="pool-1-a0001",
        claim_token=12,
        result=result,
        created_at_us=CREATED_US,
        assigned_at_us=CREATED_US + 2_000,
        received_at_us=CREATED_US + 2_500,
        finished_at_us=CREATED_US + 1_502_000,
        term=7,
    )


def test_utf8_payload_is_text_and_binary_result_is_base64() -> None:
    binary = bytes([0, 0xFF, 0xFE, 0x80])
    out = format_task(succeeded("grüße ✓".encode(), binary), tz=PLUS_2)
    fields = lines_of(out)
    assert fields["payload"] == "grüße ✓   (11 bytes, text)"
    assert fields["result"] == "(4 bytes, base64)"
    assert block_of(out, "result") == [base64.b64encode(binary).decode()]


def test_multiline_text_is_indented_under_its_label() -> None:
    out = format_task(succeeded(b"line one\nline two", b"ok"), tz=PLUS_2)
    assert lines_of(out)["payload"] == "(17 bytes, text)"
    assert block_of(out, "payload") == ["line one", "line two"]
    assert lines_of(out)["result"] == "ok   (2 bytes, text)"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"plain", "text"),
        ("日本語 and emoji 🎉".encode(), "text"),
        (b"tabs\tand\r\nnewlines", "text"),
        (b"nul\x00inside", "base64"),  # valid UTF-8, but not something to print
        (b"escape \x1b[31mred", "base64"),  # a terminal escape is not shown raw
        (bytes([0xC3]), "base64"),  # a cut UTF-8 sequence
        (bytes(range(256)), "base64"),
    ],
)
def test_bytes_view_kind(data: bytes, kind: str) -> None:
    got_kind, shown = bytes_view(data)
    assert got_kind == kind
    if kind == "text":
        assert shown == data.decode()
    else:
        assert base64.b64decode(shown) == data


def test_long_bytes_are_cut_with_a_note() -> None:
    kind, shown = bytes_view(b"x" * 10_000, max_chars=100)
    assert kind == "text"
    assert shown.startswith("x" * 100 + " … (9900 more characters")
    assert "--json" in shown


def test_times_are_local_dates_and_durations_not_microseconds() -> None:
    out = format_task(succeeded(b"a", b"b"), tz=PLUS_2)
    fields = lines_of(out)
    assert fields["created"] == "2026-11-29 02:52:41.872 UTC+02:00"
    assert fields["assigned"] == "2026-11-29 02:52:41.874 UTC+02:00   (+2 ms)"
    assert fields["received"] == "2026-11-29 02:52:41.874 UTC+02:00   (+2.5 ms)"
    assert fields["finished"] == "2026-11-29 02:52:43.374 UTC+02:00   (+1.5 s)"
    assert fields["took"] == "1.5 s in all; the last attempt ran 1.5 s"
    assert str(CREATED_US) not in out
    assert str(CREATED_US // 1000) not in out


@pytest.fixture
def zone_kolkata(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("zone_kolkata")
def test_the_default_zone_is_the_machines() -> None:
    assert local_time(CREATED_US) == "2026-11-29 06:22:41.872 IST"


@pytest.mark.parametrize(
    ("us", "shown"),
    [
        (0, "0 µs"),
        (850, "850 µs"),
        (12_300, "12.3 ms"),
        (999_000, "999 ms"),
        (4_520_000, "4.52 s"),
        (185_000_000, "3 min 5 s"),
        (7_440_000_000, "2 h 4 min"),
        (90_000_000_000, "1 d 1 h"),
        (-2_000, "-2 ms"),
    ],
)
def test_duration(us: int, shown: str) -> None:
    assert duration(us) == shown


def test_a_queued_task_shows_no_result_and_no_unset_times() -> None:
    task = tpb.Task(
        task_id="q",
        spec=tpb.TaskSpec(kind="sleep", payload=b""),
        state=tpb.TASK_STATE_QUEUED,
        created_at_us=CREATED_US,
    )
    out = format_task(task, tz=PLUS_2)
    fields = lines_of(out)
    assert fields["state"].startswith("QUEUED")
    assert fields["payload"] == "(empty)"
    for absent in ("result", "assigned", "finished", "took", "claim"):
        assert absent not in fields, out


def test_failure_usage_and_retry_time_are_shown() -> None:
    task = tpb.Task(
        task_id="f",
        spec=tpb.TaskSpec(kind="llm", payload=b"{}", role="writer", required_labels={"gpu": "1"}),
        state=tpb.TASK_STATE_QUEUED,
        attempts=2,
        last_error="model timed out",
        usage=tpb.TokenUsage(input_tokens=1200, output_tokens=30, cost_usd=0.0125),
        created_at_us=CREATED_US,
        not_before_us=CREATED_US + 3_000_000,
    )
    fields = lines_of(format_task(task, tz=PLUS_2))
    assert fields["error"] == "model timed out"
    assert fields["usage"] == "1,200 tokens in, 30 out, $0.0125"
    assert fields["retry"] == "not before 2026-11-29 02:52:44.872 UTC+02:00"
    assert "role writer" in fields["kind"]
    assert fields["labels"] == "gpu=1"


def _task_get(monkeypatch: pytest.MonkeyPatch, task: tpb.Task, *args: str) -> str:
    def fake_call(coro: Any) -> tpb.Task:
        coro.close()  # never run: no client, no socket
        return task

    monkeypatch.setattr(cli_tasks, "call", fake_call)
    result = CliRunner().invoke(cli.app, ["task", "get", task.task_id, *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_task_get_is_readable_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _task_get(monkeypatch, succeeded(b"[bold]not markup[/bold]", bytes([0xFF])))
    fields = lines_of(out)
    assert fields["payload"].startswith("[bold]not markup[/bold]")  # printed as is
    assert block_of(out, "result") == ["/w=="]
    assert "took" in fields


def test_cli_task_get_json_keeps_the_proto_json(monkeypatch: pytest.MonkeyPatch) -> None:
    out = _task_get(monkeypatch, succeeded(b"hi", b"hi"), "--json")
    got = json.loads(out)
    assert got["result"] == "aGk="
    assert got["createdAtUs"] == str(CREATED_US)
    assert got["state"] == "TASK_STATE_SUCCEEDED"
