"""Charts drawn on the server as inline SVG: no script, no CDN, no library.

Invariant: every text placed in a chart passes through :func:`markupsafe.escape`; numbers
are formatted by this module, so a chart cannot carry markup from the data it plots.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence

from markupsafe import Markup, escape

# colours chosen for >= 4.5:1 against the white background (tests compute it)
PALETTE = ("#1f4e99", "#8a3b00", "#0b6b3a", "#6b2d8f", "#8c1d40", "#3d4f5c")
W, H, PAD_L, PAD_B, PAD_T = 640, 240, 56, 40, 16


def _day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%m-%d %H:%M")


def adoption_chart(
    title: str, series: Mapping[str, Sequence[tuple[float, int]]], legend_max: int = 6
) -> Markup:
    """Cumulative devices over time, one line per series (``(time, cumulative count)``)."""
    points = [p for s in series.values() for p in s]
    if not points:
        return Markup('<p class="empty">No data to chart yet.</p>')
    t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
    ymax = max(1, *(p[1] for p in points))
    span = (t1 - t0) or 1.0
    pw, ph = W - PAD_L - 16, H - PAD_B - PAD_T

    def x(t: float) -> float:
        return PAD_L + (t - t0) / span * pw

    def y(v: float) -> float:
        return PAD_T + ph - v / ymax * ph

    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {W} {H + 20 * min(len(series), legend_max)}"'
        f' width="{W}" xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>',
        f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{PAD_L + pw}" y2="{PAD_T + ph}" stroke="#333"/>',
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + ph}" stroke="#333"/>',
        f'<text x="{PAD_L - 6}" y="{PAD_T + 4}" text-anchor="end" font-size="11" '
        f'fill="#222">{ymax}</text>',
        f'<text x="{PAD_L - 6}" y="{PAD_T + ph}" text-anchor="end" font-size="11" '
        'fill="#222">0</text>',
        f'<text x="{PAD_L}" y="{PAD_T + ph + 16}" font-size="11" fill="#222">{_day(t0)}</text>',
        f'<text x="{PAD_L + pw}" y="{PAD_T + ph + 16}" text-anchor="end" font-size="11" '
        f'fill="#222">{_day(t1)}</text>',
    ]
    for i, (name, pts) in enumerate(list(series.items())[:legend_max]):
        colour = PALETTE[i % len(PALETTE)]
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        if len(pts) == 1:
            path += f" {x(t1):.1f},{y(pts[0][1]):.1f}"
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{path}"/>')
        ly = H + 14 + 20 * i - 6
        out.append(
            f'<rect x="{PAD_L}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{PAD_L + 18}" y="{ly + 1}" font-size="12" fill="#222">'
            f"{escape(name)} ({pts[-1][1] if pts else 0})</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 (every text above is escaped; numbers are ours)


def bar_chart(title: str, bars: Sequence[tuple[str, int]]) -> Markup:
    """Horizontal bars with their labels and values."""
    if not bars:
        return Markup('<p class="empty">No data to chart yet.</p>')
    top = max(1, *(v for _, v in bars))
    row, label_w, bw = 22, 160, 380
    h = row * len(bars) + 8
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {label_w + bw + 80} {h}" '
        f'width="{label_w + bw + 80}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
    ]
    for i, (label, v) in enumerate(bars):
        yy = 4 + i * row
        width = max(1.0, v / top * bw) if v else 0.0
        colour = PALETTE[i % len(PALETTE)]
        out.append(
            f'<text x="{label_w - 6}" y="{yy + 14}" text-anchor="end" font-size="12" '
            f'fill="#222">{escape(label[:28])}</text>'
            f'<rect x="{label_w}" y="{yy + 2}" width="{width:.1f}" height="16" fill="{colour}"/>'
            f'<text x="{label_w + width + 6:.1f}" y="{yy + 14}" font-size="12" '
            f'fill="#222">{int(v)}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 (every text above is escaped; numbers are ours)


def versus_chart(title: str, rows: Sequence[tuple[str, float, float, float | None]]) -> Markup:
    """Per gate: the release's value beside the baseline's (two bars) and the threshold (a
    tick), each row scaled to its own largest figure (gates have different units)."""
    if not rows:
        return Markup("")
    row, label_w, bw = 40, 200, 320
    h = row * len(rows) + 30
    out = [
        f'<svg class="chart" role="img" viewBox="0 0 {label_w + bw + 120} {h}" '
        f'width="{label_w + bw + 120}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>",
        f'<rect x="{label_w}" y="4" width="12" height="10" fill="{PALETTE[0]}"/>'
        f'<text x="{label_w + 16}" y="13" font-size="11" fill="#222">this release</text>'
        f'<rect x="{label_w + 110}" y="4" width="12" height="10" fill="{PALETTE[1]}"/>'
        f'<text x="{label_w + 126}" y="13" font-size="11" fill="#222">baseline</text>',
    ]
    for i, (label, value, base, threshold) in enumerate(rows):
        top = max(abs(value), abs(base), abs(threshold or 0.0)) or 1.0
        yy = 22 + i * row
        out.append(
            f'<text x="{label_w - 6}" y="{yy + 20}" text-anchor="end" font-size="12" '
            f'fill="#222">{escape(label[:32])}</text>'
        )
        for j, (v, colour) in enumerate(((value, PALETTE[0]), (base, PALETTE[1]))):
            w = abs(v) / top * bw
            out.append(
                f'<rect x="{label_w}" y="{yy + 4 + 16 * j}" width="{w:.1f}" height="13" '
                f'fill="{colour}"/><text x="{label_w + w + 6:.1f}" y="{yy + 15 + 16 * j}" '
                f'font-size="11" fill="#222">{v:.4g}</text>'
            )
        if threshold is not None:
            tx = label_w + abs(threshold) / top * bw
            out.append(
                f'<line x1="{tx:.1f}" y1="{yy + 1}" x2="{tx:.1f}" y2="{yy + 36}" '
                f'stroke="#a4161a" stroke-width="2"><title>threshold {threshold:.4g}</title></line>'
            )
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 (every text above is escaped; numbers are ours)
