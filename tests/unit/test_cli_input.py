"""Client commands refuse a number they cannot send with a one-line usage error (exit 2)
before they connect: no traceback, no 15 s of retries, no memory filled first."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from registry.etcd_server import free_port
from services import cli
from services.cli import common as cli_common


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["submit", "--kind", "echo", "--max-attempts", "-1"], "--max-attempts -1 is out of range"),
        (
            ["submit", "--kind", "echo", "--max-attempts", "101"],
            "--max-attempts 101 is out of range",
        ),
        (["submit", "--kind", "noop", "--count", "100001"], "--count 100001 is out of range"),
        (["tasks", "--limit", "-1"], "--limit -1 is out of range: use 1 to 1000"),
        (["tasks", "--limit", "0"], "--limit 0 is out of range: use 1 to 1000"),
        (["decisions", "--limit", "-1"], "--limit -1 is out of range: use 1 to 1000"),
        (["propose", "x", "--quorum", "-1"], "--quorum -1 is out of range"),
        (["propose", "x", "--max-faulty", "-1"], "--max-faulty -1 is out of range"),
        (["propose", "x", "--timeout-s", "nan"], "--timeout-s nan is out of range"),
        (["propose", "x", "--timeout-s", "inf"], "--timeout-s inf is out of range"),
        (["propose", "x", "--timeout-s", "1e10"], "--timeout-s 1e+10 is out of range"),
    ],
)
def test_a_number_out_of_range_is_a_usage_error(
    args: list[str], said: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nobody listens there: a command that got as far as connecting fails with exit 1
    monkeypatch.setattr(cli_common, "CLIENT_RETRY_S", 0.3)
    result = CliRunner().invoke(cli.app, [*args, "--etcd", f"127.0.0.1:{free_port()}"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert said in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
