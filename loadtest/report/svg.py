"""Charts as inline SVG strings: latency histograms, percentile curves, throughput."""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import Any

W, H = 760, 300
ML, MR, MT, MB = 70, 40, 30, 48


class _Axis:
    """Maps data values to pixels, linear or log10, and proposes tick marks."""

    def __init__(self, lo: float, hi: float, px_lo: float, px_hi: float, *, log: bool) -> None:
        self.log = log
        step = 1.0
        if log:
            lo = max(lo, 1e-9)
            hi = max(hi, lo * 10)
            self.lo = float(math.floor(math.log10(lo)))
            self.hi = float(math.ceil(math.log10(hi)))
            if self.hi == self.lo:
                self.hi += 1
        else:
            if hi <= lo:
                hi = lo + 1
            step = _nice_step((hi - lo) / 5)
            self.lo = math.floor(lo / step) * step
            self.hi = math.ceil(hi / step) * step
        self.step = 1.0 if log else step
        self.px_lo, self.px_hi = px_lo, px_hi

    def __call__(self, v: float) -> float:
        if self.log:
            v = math.log10(max(v, 1e-12))
        frac = (v - self.lo) / (self.hi - self.lo)
        return self.px_lo + frac * (self.px_hi - self.px_lo)

    def ticks(self) -> list[float]:
        if self.log:
            decades = list(range(int(self.lo), int(self.hi) + 1))
            out = [10.0**d for d in decades]
            if len(decades) <= 3:
                out += [m * 10.0**d for d in decades[:-1] for m in (2.0, 5.0)]
            return sorted(out)
        n = round((self.hi - self.lo) / self.step)
        return [self.lo + i * self.step for i in range(n + 1)]


def _nice_step(raw: float) -> float:
    if raw <= 0:
        return 1.0
    exp = math.floor(math.log10(raw))
    base = raw / 10**exp
    for m in (1, 2, 2.5, 5, 10):
        if base <= m:
            return float(m * 10**exp)
    return float(10 ** (exp + 1))


def _num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


def _svg_open(title: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        f'role="img" aria-label="{html.escape(title)}" class="chart">',
        f'<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>',
    ]


def _frame(
    out: list[str],
    xa: _Axis,
    ya: _Axis,
    *,
    xlabel: str,
    ylabel: str,
    xfmt: Callable[[float], str] = _num,
    xticks: Sequence[float] | None = None,
) -> None:
    x0, x1, y0, y1 = ML, W - MR, H - MB, MT
    for t in ya.ticks():
        y = ya(t)
        out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(
            f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_num(t)}</text>'
        )
    for t in xticks if xticks is not None else xa.ticks():
        x = xa(t)
        out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}" stroke="#f1f5f9"/>')
        out.append(
            f'<text x="{x:.1f}" y="{y0 + 16}" text-anchor="middle" class="tick">{html.escape(xfmt(t))}</text>'
        )
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#334155"/>')
    out.append(f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#334155"/>')
    out.append(
        f'<text x="{(x0 + x1) / 2:.0f}" y="{H - 10}" text-anchor="middle" class="axis">{html.escape(xlabel)}</text>'
    )
    out.append(
        f'<text x="16" y="{(y0 + y1) / 2:.0f}" text-anchor="middle" class="axis" '
        f'transform="rotate(-90 16 {(y0 + y1) / 2:.0f})">{html.escape(ylabel)}</text>'
    )


def _legend(out: list[str], series: Sequence[tuple[str, str]]) -> None:
    x = ML + 8
    for label, color in series:
        out.append(f'<rect x="{x}" y="10" width="12" height="12" fill="{color}" rx="2"/>')
        out.append(f'<text x="{x + 16}" y="20" class="legend">{html.escape(label)}</text>')
        x += 24 + 7 * len(label)


def _empty_chart(title: str, why: str) -> str:
    out = _svg_open(title)
    out.append(
        f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="axis">{html.escape(why)}</text>'
    )
    out.append("</svg>")
    return "\n".join(out)


def svg_histogram(title: str, series: Sequence[tuple[str, str, list[list[float]]]]) -> str:
    """Latency histogram: log-binned ms on a log x axis, share of samples on y.

    `series`: (label, color, [[low_ms, high_ms, count], ...]). Shares, not counts,
    so systems with different sample counts can be compared on one plot.
    """
    series = [s for s in series if s[2]]
    if not series:
        return _empty_chart(title, "no samples")
    lo = min(b[0] for _, _, bs in series for b in bs)
    hi = max(b[1] for _, _, bs in series for b in bs)
    shares: list[tuple[str, str, list[tuple[float, float, float]]]] = []
    for label, color, bs in series:
        total = sum(b[2] for b in bs) or 1
        shares.append((label, color, [(b[0], b[1], 100.0 * b[2] / total) for b in bs]))
    ymax = max(s for _, _, bs in shares for _, _, s in bs)
    xa = _Axis(lo, hi, ML, W - MR, log=True)
    ya = _Axis(0, ymax * 1.05, H - MB, MT, log=False)
    out = _svg_open(title)
    _frame(out, xa, ya, xlabel="latency (ms, log scale)", ylabel="share of samples (%)")
    for _label, color, rows in shares:
        for low, high, share in rows:
            if share <= 0:
                continue
            x, x2, y = xa(low), xa(high), ya(share)
            out.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(x2 - x - 1, 1):.1f}" '
                f'height="{ya(0) - y:.1f}" fill="{color}" fill-opacity="0.35" stroke="{color}" '
                f'stroke-width="1"><title>{_num(low)}–{_num(high)} ms: {share:.2f} %</title></rect>'
            )
    _legend(out, [(label, color) for label, color, _ in shares])
    out.append("</svg>")
    return "\n".join(out)


PCT_TICK_LABELS = ("0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%")


def _pct_x(pct: float, cap: float) -> float:
    if pct >= 100.0:
        return cap
    return min(cap, math.log10(1.0 / (1.0 - pct / 100.0)))


def svg_percentile_curve(title: str, series: Sequence[tuple[str, str, list[list[float]]]]) -> str:
    """HdrHistogram percentile distribution: latency against 1/(1-percentile), log x.

    Each step right is one more nine (90 %, 99 %, 99.9 % ...), so the tail that
    a P99 alone hides is in plain view.
    """
    series = [s for s in series if s[2]]
    if not series:
        return _empty_chart(title, "no samples")
    finite = [p for _, _, pts in series for p, _ in pts if p < 100.0]
    cap = max((math.log10(1.0 / (1.0 - p / 100.0)) for p in finite), default=2.0)
    cap = float(min(6, max(2, math.ceil(cap))))
    vals = [v for _, _, pts in series for _, v in pts]
    vmin, vmax = max(min(vals), 1e-3), max(vals)
    log_y = vmax / vmin > 50
    xa = _Axis(0, cap, ML, W - MR, log=False)
    xa.lo, xa.hi, xa.step = 0.0, cap, 1.0
    ya = _Axis(vmin if log_y else 0.0, vmax * 1.05, H - MB, MT, log=log_y)
    out = _svg_open(title)
    _frame(
        out,
        xa,
        ya,
        xlabel="percentile",
        ylabel="latency (ms" + (", log scale)" if log_y else ")"),
        xfmt=lambda t: PCT_TICK_LABELS[int(t)] if int(t) < len(PCT_TICK_LABELS) else "",
        xticks=[float(i) for i in range(int(cap) + 1)],
    )
    for label, color, pts in series:
        coords = " ".join(f"{xa(_pct_x(p, cap)):.1f},{ya(max(v, vmin)):.1f}" for p, v in pts)
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2">'
            f"<title>{html.escape(label)}</title></polyline>"
        )
        for p, v in pts:
            if p in (50.0, 99.0) or p >= 100.0:
                x, y = xa(_pct_x(p, cap)), ya(max(v, vmin))
                out.append(
                    f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}">'
                    f"<title>P{p:g}: {v:g} ms</title></circle>"
                )
    _legend(out, [(label, color) for label, color, _ in series])
    out.append("</svg>")
    return "\n".join(out)


def svg_throughput(
    title: str,
    series: Sequence[tuple[str, str, list[int], float]],
    markers: Sequence[dict[str, Any]] = (),
) -> str:
    """Completions per second over the run; `markers` draw the faults injected."""
    series = [s for s in series if s[2]]
    if not series:
        return _empty_chart(title, "no completions")
    tmax = max(len(counts) * bucket for _, _, counts, bucket in series)
    ymax = max(c / bucket for _, _, counts, bucket in series for c in counts)
    xa = _Axis(0, max(tmax, 1.0), ML, W - MR, log=False)
    ya = _Axis(0, max(ymax * 1.1, 1.0), H - MB, MT, log=False)
    out = _svg_open(title)
    _frame(out, xa, ya, xlabel="time since start (s)", ylabel="completed tasks per second")
    for label, color, counts, bucket in series:
        pts = [(xa((i + 0.5) * bucket), ya(c / bucket)) for i, c in enumerate(counts)]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        area = f"{pts[0][0]:.1f},{ya(0):.1f} {coords} {pts[-1][0]:.1f},{ya(0):.1f}"
        out.append(f'<polygon points="{area}" fill="{color}" fill-opacity="0.12"/>')
        out.append(
            f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2">'
            f"<title>{html.escape(label)}</title></polyline>"
        )
    for mk in markers:
        x = xa(float(mk["t_s"]))
        out.append(
            f'<line x1="{x:.1f}" y1="{H - MB}" x2="{x:.1f}" y2="{MT}" stroke="#dc2626" '
            'stroke-dasharray="4 3"/>'
        )
        out.append(
            f'<text x="{x + 4:.1f}" y="{MT + 12}" class="marker">{html.escape(str(mk["label"]))}</text>'
        )
    _legend(out, [(label, color) for label, color, _, _ in series])
    out.append("</svg>")
    return "\n".join(out)
