"""Small SVG charts the storefront draws on the server: a line (a training run's loss) and bars
(a latency histogram). No script and no library: an ``<svg>`` with a title and a text
description, so a screen reader says what it shows, and it prints and scales like text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, PAD = 480, 180, 36
_AXIS_X = (
    f'<line class="axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}"/>'
)


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def line_chart(
    points: Sequence[tuple[float, float]], *, title: str, x_label: str, y_label: str
) -> Markup:
    """``points`` (x, y) joined by a line, with the axes' ranges written at their ends."""
    points = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if not points:
        return Markup("")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD

    def at(x: float, y: float) -> str:
        left = PAD + (x - x0) / (x1 - x0) * inner_w
        top = HEIGHT - PAD - (y - y0) / (y1 - y0) * inner_h
        return f"{left:.1f},{top:.1f}"

    path = " ".join(at(x, y) for x, y in points)
    description = (
        f"{len(points)} points; {y_label} from {_number(ys[0])} at {x_label} {_number(xs[0])} "
        f"to {_number(ys[-1])} at {_number(xs[-1])} (lowest {_number(min(ys))})"
    )
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="chart-title chart-desc">'
        f'<title id="chart-title">{escape(title)}</title>'
        f'<desc id="chart-desc">{escape(description)}</desc>'
        + _AXIS_X
        + f'<line class="axis" x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}"/>'
        f'<polyline class="line" points="{path}"/>'
        f'<text x="{PAD}" y="{PAD - 8}">{escape(y_label)} {_number(y1)}</text>'
        f'<text x="{PAD}" y="{HEIGHT - PAD + 16}">{_number(y0)}</text>'
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - 6}" text-anchor="end">'
        f"{escape(x_label)} {_number(x1)}</text></svg>"
    )


def bar_chart(bars: Sequence[tuple[str, float]], *, title: str, unit: str) -> Markup:
    """One bar per (label, value), labels under the bars, values over them."""
    if not bars or not any(v for _, v in bars):
        return Markup("")
    most = max(v for _, v in bars) or 1
    inner_w, inner_h = WIDTH - 2 * PAD, HEIGHT - 2 * PAD
    step = inner_w / len(bars)
    parts = []
    for i, (label, value) in enumerate(bars):
        height = value / most * inner_h
        x = PAD + i * step
        parts.append(
            f'<rect class="bar" x="{x + step * 0.1:.1f}" y="{HEIGHT - PAD - height:.1f}" '
            f'width="{step * 0.8:.1f}" height="{height:.1f}"><title>{escape(label)}: '
            f"{_number(value)} {escape(unit)}</title></rect>"
            f'<text x="{x + step / 2:.1f}" y="{HEIGHT - PAD + 14}" text-anchor="middle" '
            f'class="small">{escape(label)}</text>'
        )
        if value:
            parts.append(
                f'<text x="{x + step / 2:.1f}" y="{HEIGHT - PAD - height - 4:.1f}" '
                f'text-anchor="middle" class="small">{_number(value)}</text>'
            )
    description = "; ".join(f"{label}: {_number(value)} {unit}" for label, value in bars if value)
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-labelledby="bars-title bars-desc">'
        f'<title id="bars-title">{escape(title)}</title>'
        f'<desc id="bars-desc">{escape(description)}</desc>' + _AXIS_X + "".join(parts) + "</svg>"
    )
