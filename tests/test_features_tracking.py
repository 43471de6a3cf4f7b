"""Open/click tracking and the combined per-recipient copy (footer + tracking)."""

from __future__ import annotations

import email
import re
from email.policy import default

import mime_samples as s
import pytest

from mailrelay.features.links import Links, Recipient
from mailrelay.features.personalize import Options, Personalizer
from mailrelay.features.tokens import Kind, TokenSigner
from mailrelay.features.tracking import Tracker

R = Recipient("30193a2b4c5d6e7f8a9b", "acme", "news@acme.example", "alice@example.org")
BASE = "https://track.example"


@pytest.fixture
def signer():
    return TokenSigner(b"k" * 32)


@pytest.fixture
def links(signer):
    return Links(signer, BASE)


def parts(data: bytes) -> dict[str, str]:
    msg = email.message_from_bytes(data, policy=default)
    out = {}
    for part in msg.walk():
        assert not part.defects
        if part.get_content_type() in ("text/plain", "text/html") and not part.is_attachment():
            out[part.get_content_subtype()] = part.get_content().replace("\r\n", "\n")
    return out


def hrefs(markup: str) -> list[str]:
    return re.findall(r"""(?<![\w-])href\s*=\s*["']?([^"'\s>]+)""", markup, re.I)


def test_links_and_pixel(signer, links):
    raw = s.crlf(
        s.HEADERS + "Content-Type: text/html; charset=utf-8\n\n<html><body>"
        '<a class="x" href="https://shop.example/a?x=1&amp;y=2">one</a>\n'
        "<A HREF='http://shop.example/b'>two</A>\n"
        '<a data-href="https://no.example/" title="a > b" href=https://shop.example/c>three</a>\n'
        '<area shape="rect" href="https://shop.example/d">\n'
        '<a href="mailto:sales@shop.example">mail</a> <a href="#top">top</a>\n'
        '<a href="/relative">rel</a> <a name="anchor">no href</a>\n'
        f'<a href="{BASE}/u/already">ours</a>\n'
        "</body></html>\n"
    )
    result = Tracker(links).apply(raw, R)
    assert result.changed, result.reason
    html = parts(result.data)["html"]
    found = hrefs(html)
    tracked = [h for h in found if h.startswith(f"{BASE}/c/")]
    targets = [signer.verify(h.rsplit("/", 1)[1], Kind.CLICK).url for h in tracked]
    assert targets == [
        "https://shop.example/a?x=1&y=2",
        "http://shop.example/b",
        "https://shop.example/c",
        "https://shop.example/d",
    ]
    assert 'data-href="https://no.example/"' in html
    for untouched in ("mailto:sales@shop.example", "#top", "/relative", f"{BASE}/u/already"):
        assert untouched in found
    pixel = re.search(r'<img src="([^"]+)" width="1" height="1"', html)
    assert html.index(pixel.group()) < html.index("</body>")
    assert signer.verify(pixel.group(1).rsplit("/", 1)[1], Kind.OPEN) == R.token(Kind.OPEN)


def test_text_parts_untouched(links):
    raw = s.alternative()
    result = Tracker(links).apply(raw, R)
    before, after = parts(raw), parts(result.data)
    assert after["plain"] == before["plain"]
    assert "/c/" in after["html"] and "/o/" in after["html"]


def test_opens_only_and_clicks_only(links):
    raw = s.html_only()
    opens = parts(Tracker(links).apply(raw, R, opens=True, clicks=False).data)["html"]
    assert "/o/" in opens and "/c/" not in opens
    clicks = parts(Tracker(links).apply(raw, R, opens=False, clicks=True).data)["html"]
    assert "/c/" in clicks and "/o/" not in clicks


def test_no_html_or_unsafe_unchanged(links):
    for raw, reason in ((s.plain(), "no HTML part"), (s.smime_signed(), "signed or encrypted")):
        result = Tracker(links).apply(raw, R)
        assert not result.changed and result.data is raw and result.reason.startswith(reason)


def test_personalizer_footer_link_not_tracked(signer, links):
    personalizer = Personalizer(links)
    parsed = personalizer.prepare(s.mixed_with_attachments())
    result = personalizer.for_recipient(parsed, R, Options(footer=True, opens=True, clicks=True))
    assert result.changed
    msg = email.message_from_bytes(result.data, policy=default)
    unsub = msg["List-Unsubscribe"].strip("<>")
    assert signer.verify(unsub.rsplit("/", 1)[1], Kind.UNSUBSCRIBE).recipient == R.recipient
    html = parts(result.data)["html"]
    assert f'href="{unsub}"' in html  # the footer link goes straight to the endpoint
    assert html.index("unsubscribe here") < html.index("/o/") < html.index("</body>")
    assert unsub in parts(result.data)["plain"]


def test_personalizer_copies_differ_per_recipient(links):
    personalizer = Personalizer(links)
    parsed = personalizer.prepare(s.alternative())
    bob = Recipient(R.queue_id, R.account, R.user, "bob@example.org")
    options = Options(footer=True, opens=True)
    a = personalizer.for_recipient(parsed, R, options).data
    b = personalizer.for_recipient(parsed, bob, options).data
    assert a != b and "bob@example.org" in parts(b)["plain"]


def test_personalizer_unchanged_cases(links):
    personalizer = Personalizer(links)
    parsed = personalizer.prepare(s.smime_signed())
    result = personalizer.for_recipient(parsed, R, Options(footer=True))
    assert (result.changed, result.reason) == (False, "signed or encrypted (multipart/signed)")
    parsed = personalizer.prepare(s.plain())
    assert personalizer.for_recipient(parsed, R, Options()).data is parsed.raw
    assert not personalizer.for_recipient(parsed, R, Options(opens=True)).changed
