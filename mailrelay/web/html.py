"""HTML for the web admin page: escaping, the layout, form fields and the statistics chart
(inline SVG drawn on the server). No templates, no scripts: every value from outside goes
through ``h()``."""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

NAV = [("/users", "SMTP users"), ("/accounts", "Accounts"), ("/queue", "Queue"),
       ("/suppressions", "Suppressions"), ("/stats", "Statistics")]  # fmt: skip


def h(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


def page(title: str, body: str, admin: str | None = None, csrf: str = "",
         flash: Iterable[str] = (), current: str = "") -> str:  # fmt: skip
    nav = ""
    if admin is not None:
        links = "".join(
            f'<a href="{href}"{" class=current" if href == current else ""}>{h(text)}</a>'
            for href, text in NAV
        )
        nav = (
            f'<nav>{links}<form method="post" action="/logout" class="logout">'
            f'{csrf_field(csrf)}<span>{h(admin)}</span>'
            '<button type="submit">Log out</button></form></nav>'
        )
    notes = "".join(f'<p class="flash">{h(m)}</p>' for m in flash)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{h(title)} - mailrelay</title>"
        '<link rel="stylesheet" href="/static/panel.css"></head><body>'
        f'<header><span class="brand">mailrelay</span>{nav}</header>'
        f"<main><h1>{h(title)}</h1>{notes}{body}</main></body></html>\n"
    )


def csrf_field(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{h(token)}">'


def post_button(action: str, label: str, csrf: str, css: str = "", fields: dict | None = None,
                ) -> str:  # fmt: skip
    hidden = "".join(
        f'<input type="hidden" name="{h(k)}" value="{h(v)}">' for k, v in (fields or {}).items()
    )
    cls = f' class="{h(css)}"' if css else ""
    return (
        f'<form method="post" action="{h(action)}" class="inline">{csrf_field(csrf)}{hidden}'
        f"<button type=\"submit\"{cls}>{h(label)}</button></form>"
    )


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], css: str = "") -> str:
    """``rows`` hold HTML already escaped by the caller (cells may be links or buttons)."""
    head = "".join(f"<th>{h(x)}</th>" for x in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cls = f' class="{h(css)}"' if css else ""
    return f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def text_input(name: str, label: str, value: object = "", hint: str = "",
               required: bool = False, kind: str = "text") -> str:  # fmt: skip
    req = " required" if required else ""
    note = f'<small>{h(hint)}</small>' if hint else ""
    return (
        f'<label>{h(label)}<input type="{kind}" name="{h(name)}" id="{h(name)}" '
        f'value="{h(value)}"{req}>{note}</label>'
    )


def checkbox(name: str, label: str, checked: bool) -> str:
    on = " checked" if checked else ""
    return (
        f'<label class="check"><input type="checkbox" name="{h(name)}" id="{h(name)}" '
        f'value="on"{on}> {h(label)}</label>'
    )


def select(name: str, label: str, options: Sequence[str], value: str) -> str:
    opts = "".join(
        f'<option value="{h(o)}"{" selected" if o == value else ""}>{h(o)}</option>'
        for o in options
    )
    return f'<label>{h(label)}<select name="{h(name)}" id="{h(name)}">{opts}</select></label>'


# ---- the chart ----

SERIES = [("accepted", "sent", "#2a6fdb"), ("delivered", "delivered", "#1a9e5c"),
          ("bounced", "bounced", "#d2452f")]  # fmt: skip


def chart(points: Sequence[tuple[float, dict[str, int]]], period: str = "day") -> str:
    """Sent (accepted), delivered and bounced per period as an SVG line chart.
    ``points``: (period start, counts), one per period, oldest first."""
    width, height, left, bottom, top, right = 760, 260, 48, 28, 12, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max([1] + [c.get(k, 0) for _, c in points for k, _, _ in SERIES])
    n = max(len(points), 2)

    def x(i: int) -> float:
        return left + plot_w * i / (n - 1)

    def y(v: int) -> float:
        return top + plot_h * (1 - v / peak)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="sent, delivered and bounced per {h(period)}">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafbfc" '
        'stroke="#d0d7de"/>',
    ]
    for frac in (0, 0.5, 1):
        value = round(peak * frac)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            'stroke="#e5e9ee"/>'
            f'<text x="{left - 6}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#555">{value}</text>'
        )
    fmt = "%m-%d" if period == "day" else "%d %H:00"
    step = max(1, len(points) // 8)
    for i, (start, _) in enumerate(points):
        if i % step == 0:
            label = datetime.fromtimestamp(start, UTC).strftime(fmt)
            parts.append(
                f'<text x="{x(i):.1f}" y="{height - 8}" text-anchor="middle" font-size="11" '
                f'fill="#555">{h(label)}</text>'
            )
    for key, label, color in SERIES:
        coords = " ".join(f"{x(i):.1f},{y(c.get(key, 0)):.1f}" for i, (_, c) in enumerate(points))
        if coords:
            parts.append(
                f'<polyline class="series-{h(key)}" points="{coords}" fill="none" '
                f'stroke="{color}" stroke-width="2"><title>{h(label)}</title></polyline>'
            )
    parts.append("</svg>")
    legend = "".join(
        f'<span class="key"><i class="k-{h(key)}"></i>{h(label)}</span>'
        for key, label, _ in SERIES
    )
    return f'<figure class="chart">{"".join(parts)}<figcaption>{legend}</figcaption></figure>'
