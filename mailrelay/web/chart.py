"""The statistics chart: sent (accepted), delivered and bounced per period as an SVG line
chart drawn on the server (inline, so it needs no script and no image request)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from twisted.web.template import Tag, tags

SERIES = [("accepted", "sent", "#2a6fdb"), ("delivered", "delivered", "#1a9e5c"),
          ("bounced", "bounced", "#d2452f")]  # fmt: skip
LABEL = {"text-anchor": "middle", "font-size": "11", "fill": "#555"}


def _svg(name: str, *children, **attributes) -> Tag:
    # SVG elements are not in twisted.web.template's tags; hyphenated attributes as a dict.
    return Tag(name)(*children, **attributes)


def chart(points: Sequence[tuple[float, dict[str, int]]], period: str = "day") -> Tag:
    """``points``: (period start, counts), one per period, oldest first."""
    width, height, left, bottom, top, right = 760, 260, 48, 28, 12, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([1] + [c.get(k, 0) for _, c in points for k, _, _ in SERIES])
    n = max(len(points), 2)

    def x(i: int) -> float:
        return left + plot_w * i / (n - 1)

    def y(v: int) -> float:
        return top + plot_h * (1 - v / peak)

    parts = [_svg("rect", x=str(left), y=str(top), width=str(plot_w), height=str(plot_h),
                  fill="#fafbfc", stroke="#d0d7de")]  # fmt: skip
    for frac in (0, 0.5, 1):
        value = round(peak * frac)
        parts.append(_svg("line", x1=str(left), x2=str(left + plot_w), y1=f"{y(value):.1f}",
                          y2=f"{y(value):.1f}", stroke="#e5e9ee"))  # fmt: skip
        parts.append(_svg("text", str(value), x=str(left - 6), y=f"{y(value) + 4:.1f}",
                          **{**LABEL, "text-anchor": "end"}))  # fmt: skip
    fmt = "%m-%d" if period == "day" else "%d %H:00"
    step = max(1, len(points) // 8)
    for i, (start, _) in enumerate(points):
        if i % step == 0:
            label = datetime.fromtimestamp(start, UTC).strftime(fmt)
            parts.append(_svg("text", label, x=f"{x(i):.1f}", y=str(height - 8), **LABEL))
    for key, label, color in SERIES:
        coords = " ".join(f"{x(i):.1f},{y(c.get(key, 0)):.1f}" for i, (_, c) in enumerate(points))
        if coords:
            parts.append(_svg("polyline", _svg("title", label), class_=f"series-{key}",
                              points=coords, fill="none", stroke=color,
                              **{"stroke-width": "2"}))  # fmt: skip
    svg = _svg("svg", parts, xmlns="http://www.w3.org/2000/svg", class_="chart",
               viewBox=f"0 0 {width} {height}", role="img",
               **{"aria-label": f"sent, delivered and bounced per {period}"})  # fmt: skip
    legend = [tags.span(tags.i(class_=f"k-{key}"), label, class_="key")
              for key, label, _ in SERIES]  # fmt: skip
    return tags.figure(svg, tags.figcaption(legend), class_="chart")
