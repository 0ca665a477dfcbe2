"""Top functions of a py-spy profile: self and inclusive share of the samples.

Reads py-spy's raw (collapsed) output, one `frame;frame;...;leaf count` per line, as
written by `py-spy record --format raw --nolineno`. Self time is the leaf frame's;
inclusive time counts a function once per sample however deep it recurses.

    python scripts/pyspy_top.py profile.txt [--top 25]
"""

from __future__ import annotations

import argparse
import re
import signal
from collections import Counter
from pathlib import Path

_SITE = re.compile(r"\((?:.*/site-packages/|.*/lib/python3\.\d+/|/work/wt/[^/]+/)(.*)\)$")


def short(frame: str) -> str:
    """`func (/long/path/site-packages/grpc/aio/_call.py)` → `func (grpc/aio/_call.py)`."""
    return _SITE.sub(r"(\1)", frame.strip())


def load(path: Path) -> tuple[Counter[str], Counter[str], int]:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")]
        total += n
        self_t[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    return self_t, incl, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument(
        "--inclusive-under",
        default="services/,registry/,loadtest/",
        help="comma-separated path prefixes: the inclusive list shows only these frames",
    )
    args = ap.parse_args()
    self_t, incl, total = load(args.profile)
    print(f"{args.profile}: {total} non-idle samples")
    print(f"\ntop {args.top} by self time")
    for frame, n in self_t.most_common(args.top):
        print(f"{100 * n / total:6.1f} %  {frame}")
    prefixes = tuple(f"({p}" for p in args.inclusive_under.split(",") if p)
    mine = Counter({f: n for f, n in incl.items() if any(p in f for p in prefixes)})
    print(f"\ntop {args.top} by inclusive time, frames under {args.inclusive_under}")
    for frame, n in mine.most_common(args.top):
        print(f"{100 * n / total:6.1f} %  {frame}")


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends it quietly
    main()
