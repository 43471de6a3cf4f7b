"""The panel's HTML pieces (mailrelay/web/templates.py, chart.py) as a browser parses them:
values are text wherever they go, and the frame shows the navigation only when logged in."""

from __future__ import annotations

import pytest
from test_web_pages import Seen
from twisted.internet import defer
from twisted.web.template import tags

from mailrelay.web import forms
from mailrelay.web.chart import chart
from mailrelay.web.routing import HttpError
from mailrelay.web.templates import (
    checkbox,
    page,
    post_button,
    render,
    select,
    table,
    text_input,
)

EVIL = "\"'><script>alert(1)</script>&amp;"


def html(tree) -> bytes:
    return render(tree)


def test_the_frame_shows_the_navigation_to_a_logged_in_admin():
    anonymous = page("Log in", tags.p("form"))
    assert anonymous.startswith(b"<!DOCTYPE html>\n<html lang=\"en\">")
    assert b"<nav>" not in anonymous and b"/logout" not in anonymous
    body = page(EVIL, "x", admin="alice", csrf="tok", flash=[EVIL], current="/queue")
    assert b"<script" not in body
    seen = Seen(body)
    assert f"{EVIL} - mailrelay" in seen.text() and seen.text().count(EVIL) == 3
    assert b'<a href="/queue" class="current">Queue</a>' in body
    assert b'<a href="/users">SMTP users</a>' in body
    assert "tok" in seen.values and "/logout" in seen.values


def test_fields_carry_values_as_attributes():
    body = html(tags.div(text_input("note", "Note", EVIL, hint=EVIL, required=True),
                         text_input("n", "N", None, kind="number"),
                         checkbox("archive", "Archive", True), checkbox("x", "X", False),
                         select("status", "Status", ["allowed", EVIL], EVIL)))  # fmt: skip
    assert b"<script" not in body
    seen = Seen(body)
    assert seen.values.count(EVIL) == 2  # the input's value and the option's
    assert EVIL in seen.text()  # the hint and the option's label
    assert b'id="note" value="&quot;\'&gt;&lt;script&gt;' in body
    assert b"required" in body.split(b'id="n"')[0] and b"required" not in body.split(b'id="n"')[1]
    assert b'type="number" name="n" id="n" value=""' in body
    assert body.count(b"checked") == 1 and body.count(b"selected") == 1


def test_post_button_and_table():
    button = html(post_button("/suppressions/delete", "Remove", "tok", "danger",
                              {"address": EVIL, "user": None}))  # fmt: skip
    seen = Seen(button)
    assert {"tok", EVIL, "/suppressions/delete", "danger"} <= set(seen.values)
    assert b'name="user" value=""' in button
    grid = html(table([EVIL], [[EVIL, 3, None, tags.b("bold")]], "users"))
    assert b"<script" not in grid and b"<td><b>bold</b></td>" in grid
    assert b"<td>3</td><td></td>" in grid and Seen(grid).text().count(EVIL) == 2


def test_a_tree_that_would_wait_is_refused():
    with pytest.raises(RuntimeError):
        render(tags.p(defer.Deferred()))


def test_chart_draws_each_series():
    points = [(86400.0 * i, {"accepted": i, "delivered": i, "bounced": 0}) for i in range(5)]
    body = html(chart(points, "day"))
    for key in ("accepted", "delivered", "bounced"):
        assert f'class="series-{key}"'.encode() in body
    assert b'viewBox="0 0 760 260"' in body and b'aria-label="sent, delivered and bounced' in body
    assert b">01-01</text>" in body and b'stroke-width="2"' in body


def test_user_settings_are_typed_or_refused():
    from mailrelay.model import Kind

    doc = forms.user_settings({"priority": "2", "rate_limit": "", "note": EVIL,
                               "domains": "a.test", "open_tracking": "on"}, Kind.DOMAIN)
    assert doc["priority"] == 2 and doc["rate_limit"] is None and doc["note"] == EVIL
    assert "domains" not in doc and doc["open_tracking"] and not doc["archive"]
    with pytest.raises(HttpError) as refused:
        forms.user_settings({"priority": "two"}, Kind.NAMED)
    assert (refused.value.status, refused.value.message) == (400,
                                                             "priority must be a whole number")
