"""A settled process keeps startup's objects out of collections and collects less often."""

from __future__ import annotations

import subprocess
import sys


def test_settle_freezes_startup_and_raises_the_thresholds() -> None:
    # in a child: the settings are process-wide and would change this test process
    code = (
        "import gc\n"
        "from services._common import heap\n"
        "heap.settle()\n"
        "print(gc.get_freeze_count(), *gc.get_threshold())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    frozen, *thresholds = map(int, out)
    assert frozen > 1000  # the interpreter's and the imports' objects
    assert tuple(thresholds) == (20_000, 20, 20)
