"""The control panel's HTML as twisted.web.template trees: the page frame and the pieces
every page is built from (fields, tables, buttons).

Pages build trees of ``tags`` and strings; the flattener escapes every string, in text and
in attributes alike, so no page writes markup or escapes anything itself. There are no
scripts, and no inline styles (the CSP forbids both).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from twisted.python.failure import Failure
from twisted.web.template import Tag, flatten, tags

NAV = [("/users", "SMTP users"), ("/accounts", "Accounts"), ("/queue", "Queue"),
       ("/suppressions", "Suppressions"), ("/dkim", "DKIM"), ("/domains", "Domains"),
       ("/webhooks", "Webhooks"), ("/stats", "Statistics"), ("/explain", "Explain")]  # fmt: skip
DOCTYPE = b"<!DOCTYPE html>\n"

Node = Any  # what the flattener takes: a Tag, a str, or a list of them


def text(value: object) -> str:
    """A value as page text: None shows as nothing."""
    return "" if value is None else str(value)


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M")


def render(tree: Node) -> bytes:
    """The document for ``tree``. The trees hold no Deferreds (a page fetches what it shows
    before it is built), so the flattener finishes before this returns."""
    out: list[bytes] = [DOCTYPE]
    done: list[object] = []
    flatten(None, tree, out.append).addBoth(done.append)
    if not done:
        raise RuntimeError("a page tree held a Deferred")
    if isinstance(done[0], Failure):
        done[0].raiseException()
    return b"".join(out) + b"\n"


def page(title: str, body: Node, admin: str | None = None, csrf: str = "",
         flash: Iterable[str] = (), current: str = "") -> bytes:  # fmt: skip
    """A whole page; the navigation and the logout button when ``admin`` is logged in."""
    nav: Node = ""
    if admin is not None:
        nav = tags.nav(
            [tags.a(label, href=href, **({"class": "current"} if href == current else {}))
             for href, label in NAV],
            tags.form(csrf_field(csrf), tags.span(admin),
                      tags.button("Log out", type="submit"),
                      method="post", action="/logout", class_="logout"),
        )  # fmt: skip
    return render(tags.html(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.title(f"{title} - mailrelay"),
            tags.link(rel="stylesheet", href="/static/panel.css"),
        ),
        tags.body(
            tags.header(tags.span("mailrelay", class_="brand"), nav),
            Tag("main")(tags.h1(title), [tags.p(m, class_="flash") for m in flash], body),
        ),
        lang="en",
    ))  # fmt: skip


def link(path: str, label: object) -> Tag:
    return tags.a(text(label), href=path)


def error(message: str) -> Node:
    """The refusal shown above a form; nothing when there is none."""
    return tags.p(message, class_="error") if message else ""


def csrf_field(token: str) -> Tag:
    return tags.input(type="hidden", name="csrf", value=token)


def post_button(action: str, label: str, csrf: str, css: str = "",
                fields: dict[str, str] | None = None) -> Tag:  # fmt: skip
    """A button that POSTs ``fields`` to ``action`` (a form of its own)."""
    hidden = [tags.input(type="hidden", name=k, value=text(v)) for k, v in (fields or {}).items()]
    button = tags.button(label, type="submit", **({"class": css} if css else {}))
    return tags.form(csrf_field(csrf), hidden, button, method="post", action=action,
                     class_="inline")  # fmt: skip


def table(headers: Sequence[str], rows: Iterable[Sequence[Node]], css: str = "") -> Tag:
    """Cells are trees or plain values (shown as text)."""
    return tags.table(
        tags.thead(tags.tr([tags.th(x) for x in headers])),
        tags.tbody([tags.tr([tags.td(_cell(c)) for c in row]) for row in rows]),
        **({"class": css} if css else {}),
    )


def _cell(value: Node) -> Node:
    return value if isinstance(value, (Tag, list, tuple)) else text(value)


def text_input(name: str, label: str, value: object = "", hint: str = "",
               required: bool = False, kind: str = "text") -> Tag:  # fmt: skip
    field = tags.input(type=kind, name=name, id=name, value=text(value))
    if required:
        field(required="")
    return tags.label(label, field, tags.small(hint) if hint else "")


def checkbox(name: str, label: str, checked: bool) -> Tag:
    box = tags.input(type="checkbox", name=name, id=name, value="on")
    if checked:
        box(checked="")
    return tags.label(box, f" {label}", class_="check")


def select(name: str, label: str, options: Sequence[str], value: str) -> Tag:
    choices = [tags.option(o, value=o, **({"selected": ""} if o == value else {}))
               for o in options]  # fmt: skip
    return tags.label(label, tags.select(choices, name=name, id=name))
