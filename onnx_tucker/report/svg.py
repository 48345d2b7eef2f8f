"""Plots as inline SVG, written by hand: the HTML report stays self-contained and needs no plotting
library (matplotlib would be a 40 MB optional dependency for three simple charts)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

FONT = "font-family='system-ui, sans-serif' font-size='12'"
COLORS = ("#9aa5b1", "#1f77b4", "#ff7f0e", "#2ca02c")


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    import math

    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if v <= m * exp:
            return m * exp
    return 10 * exp


def _legend(series: Sequence[tuple[str, Sequence[object]]], x: float, y: float, offset: int = 0) -> list[str]:
    out = []
    xi = x
    for i, (name, _) in enumerate(series):
        out.append(f"<rect x='{xi}' y='{y - 10}' width='12' height='12' fill='{COLORS[(i + offset) % len(COLORS)]}'/>")
        out.append(f"<text x='{xi + 16}' y='{y}' {FONT}>{escape(name)}</text>")
        xi += 40 + 7 * len(name)  # about 7 px per character at 12 px
    return out


def hbar_chart(title: str, labels: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]],
               unit: str = "", value_fmt: str = "{:.3g}", width: int = 700) -> str:
    """Horizontal grouped bars: one group per label, one bar per series (None: no bar)."""
    bar_h, gap, left, top = 11, 8, 220, 46
    group_h = bar_h * len(series) + gap
    height = top + group_h * len(labels) + 30
    vmax = _nice_max(max((v for _, vs in series for v in vs if v is not None), default=1.0))
    plot_w = width - left - 80
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='plot' width='{width}' height='{height}' "
           f"viewBox='0 0 {width} {height}' role='img' aria-label='{escape(title)}'>",
           f"<text x='10' y='18' {FONT} font-weight='bold' font-size='14'>{escape(title)}</text>"]
    out += _legend(series, left, 36)
    for k in range(5):  # grid lines and ticks
        x = left + plot_w * k / 4
        out.append(f"<line x1='{x:.1f}' y1='{top - 4}' x2='{x:.1f}' y2='{height - 26}' stroke='#e3e7eb'/>")
        out.append(f"<text x='{x:.1f}' y='{height - 10}' {FONT} text-anchor='middle'>{escape(value_fmt.format(vmax * k / 4))}{escape(unit)}</text>")
    for i, label in enumerate(labels):
        y0 = top + i * group_h
        short = label if len(label) <= 34 else "…" + label[-33:]
        out.append(f"<text x='{left - 6}' y='{y0 + group_h / 2:.1f}' {FONT} text-anchor='end'>{escape(short)}</text>")
        for j, (_, values) in enumerate(series):
            v = values[i]
            if v is None:
                continue
            w = plot_w * v / vmax
            y = y0 + j * bar_h
            out.append(f"<rect x='{left}' y='{y}' width='{max(w, 0.5):.1f}' height='{bar_h - 2}' fill='{COLORS[j % len(COLORS)]}'>"
                       f"<title>{escape(label)}: {escape(value_fmt.format(v))}{escape(unit)}</title></rect>")
            out.append(f"<text x='{left + w + 4:.1f}' y='{y + bar_h - 3}' {FONT} font-size='10'>{escape(value_fmt.format(v))}</text>")
    out.append("</svg>")
    return "\n".join(out)


def scatter_chart(title: str, series: Sequence[tuple[str, Sequence[tuple[float, float, str]]]],
                  x_label: str, y_label: str, width: int = 480, height: int = 400) -> str:
    """Points (x, y, tooltip) per series, with the diagonal y = x (full rank) for reference."""
    left, right, top, bottom = 56, 20, 50, 46
    vmax = _nice_max(max((max(x, y) for _, pts in series for x, y, _ in pts), default=1.0))
    pw, ph = width - left - right, height - top - bottom

    def sx(v: float) -> float:
        return left + pw * v / vmax

    def sy(v: float) -> float:
        return top + ph - ph * v / vmax

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' class='plot' width='{width}' height='{height}' "
           f"viewBox='0 0 {width} {height}' role='img' aria-label='{escape(title)}'>",
           f"<text x='10' y='18' {FONT} font-weight='bold' font-size='14'>{escape(title)}</text>"]
    out += _legend(series, left, 38, offset=1)
    for k in range(5):
        v = vmax * k / 4
        out.append(f"<line x1='{sx(v):.1f}' y1='{top}' x2='{sx(v):.1f}' y2='{top + ph}' stroke='#e3e7eb'/>")
        out.append(f"<line x1='{left}' y1='{sy(v):.1f}' x2='{left + pw}' y2='{sy(v):.1f}' stroke='#e3e7eb'/>")
        out.append(f"<text x='{sx(v):.1f}' y='{top + ph + 16}' {FONT} text-anchor='middle'>{v:g}</text>")
        out.append(f"<text x='{left - 6}' y='{sy(v) + 4:.1f}' {FONT} text-anchor='end'>{v:g}</text>")
    out.append(f"<line x1='{sx(0)}' y1='{sy(0)}' x2='{sx(vmax)}' y2='{sy(vmax)}' stroke='#999' stroke-dasharray='4 3'/>")
    out.append(f"<text x='{sx(vmax) - 4:.1f}' y='{sy(vmax) + 14:.1f}' {FONT} text-anchor='end' fill='#777'>full rank</text>")
    out.append(f"<text x='{left + pw / 2}' y='{height - 8}' {FONT} text-anchor='middle'>{escape(x_label)}</text>")
    out.append(f"<text x='14' y='{top + ph / 2}' {FONT} text-anchor='middle' transform='rotate(-90 14 {top + ph / 2})'>{escape(y_label)}</text>")
    for j, (_, pts) in enumerate(series):
        for x, y, tip in pts:
            out.append(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='4.5' fill='{COLORS[(j + 1) % len(COLORS)]}' "
                       f"fill-opacity='0.8'><title>{escape(tip)}</title></circle>")
    out.append("</svg>")
    return "\n".join(out)
