"""Charts drawn on the server as inline SVG: no script, no CDN, no library.

Invariant: every text placed in a chart passes through :func:`markupsafe.escape`; numbers
are formatted by this module, so a chart cannot carry markup from the data it plots.
"""

from __future__ import annotations

import datetime
import math
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


def _secs(t: float) -> str:
    """A latency as text: ``320 us``, ``1.78 ms``, ``2.5 s``."""
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if t >= scale or unit == "us":
            return f"{t / scale:.3g} {unit}"
    raise AssertionError  # pragma: no cover


def latency_bucket_label(i: int, edges: Sequence[float]) -> str:
    """Bucket ``i`` of the fixed latency buckets as a range (bucket 0 below the first edge,
    the last one above the last edge)."""
    if i == 0:
        return f"< {_secs(edges[0])}"
    if i >= len(edges):
        return f">= {_secs(edges[-1])}"
    return f"{_secs(edges[i - 1])} - {_secs(edges[i])}"


def latency_chart(
    title: str, desc: str, series: Mapping[str, Sequence[int]], p95s: Mapping[str, float],
    edges: Sequence[float], shown: range,
) -> Markup:  # fmt: skip
    """The latency distributions of up to two releases over the log-spaced buckets ``edges``
    (one bucket one column: the x axis is logarithmic), each normalised to its own total, a
    dashed line at each release's p95. Only the buckets in ``shown`` are drawn. Every bar
    carries a ``<title>`` with its bucket, share and count."""
    if not series:
        return Markup('<p class="empty">No telemetry yet.</p>')
    totals = {k: sum(v) or 1 for k, v in series.items()}
    top = max(max(c[i] / totals[k] for i in shown) for k, c in series.items()) or 1.0
    pw, ph = W - PAD_L - 16, H - PAD_B - PAD_T
    col = pw / len(shown)
    bar = col / (len(series) + 0.5)

    def ux(u: float) -> float:  # u in bucket units: bucket i spans [i, i + 1)
        return PAD_L + (u - shown.start) * col

    out = [
        f'<svg class="chart" role="img" aria-labelledby="lat-title lat-desc" '
        f'viewBox="0 0 {W} {H + 20 * len(series)}" width="{W}" '
        f'xmlns="http://www.w3.org/2000/svg"><title id="lat-title">{escape(title)}</title>'
        f'<desc id="lat-desc">{escape(desc)}</desc>',
        f'<line x1="{PAD_L}" y1="{PAD_T + ph}" x2="{PAD_L + pw}" y2="{PAD_T + ph}" stroke="#333"/>',
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{PAD_T + ph}" stroke="#333"/>',
        f'<text x="{PAD_L - 6}" y="{PAD_T + 4}" text-anchor="end" font-size="11" '
        f'fill="#222">{top * 100:.3g} %</text>',
        f'<text x="{PAD_L - 6}" y="{PAD_T + ph}" text-anchor="end" font-size="11" '
        'fill="#222">0 %</text>',
    ]
    for k, e in enumerate(edges):  # a tick at each decade (every 4th edge)
        if k % 4 == 0 and shown.start <= k + 1 < shown.stop:
            tx = ux(k + 1)
            out.append(
                f'<line x1="{tx:.1f}" y1="{PAD_T + ph}" x2="{tx:.1f}" y2="{PAD_T + ph + 4}" '
                f'stroke="#333"/><text x="{tx:.1f}" y="{PAD_T + ph + 16}" text-anchor="middle" '
                f'font-size="11" fill="#222">{escape(_secs(e))}</text>'
            )
    for j, (name, counts) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        for i in shown:
            share = counts[i] / totals[name]
            if not counts[i]:
                continue
            h = share / top * ph
            bx = ux(i) + bar * (0.25 + j)
            out.append(
                f'<rect x="{bx:.1f}" y="{PAD_T + ph - h:.1f}" width="{bar:.1f}" height="{h:.1f}" '
                f'fill="{colour}"><title>{escape(name)} {escape(latency_bucket_label(i, edges))}: '
                f"{share * 100:.1f} % ({counts[i]})</title></rect>"
            )
        ly = H + 14 + 20 * j - 6
        legend = f"{name}: {totals[name]} inferences"
        if name in p95s:
            p = p95s[name]
            u = 1 + 4 * math.log10(p / edges[0])  # edges[k] = edges[0] * 10 ** (k / 4)
            px = ux(min(max(u, shown.start), shown.stop))
            out.append(
                f'<line x1="{px:.1f}" y1="{PAD_T}" x2="{px:.1f}" y2="{PAD_T + ph}" '
                f'stroke="{colour}" stroke-width="2" stroke-dasharray="5,3">'
                f"<title>{escape(name)} p95 {escape(_secs(p))}</title></line>"
            )
            legend += f", p95 {_secs(p)} (dashed)"
        out.append(
            f'<rect x="{PAD_L}" y="{ly - 9}" width="12" height="12" fill="{colour}"/>'
            f'<text x="{PAD_L + 18}" y="{ly + 1}" font-size="12" fill="#222">'
            f"{escape(legend)}</text>"
        )
    out.append("</svg>")
    return Markup("".join(out))  # noqa: S704 (every text above is escaped; numbers are ours)
