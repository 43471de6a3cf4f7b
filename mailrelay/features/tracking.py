"""Open and click tracking: a 1x1 pixel and http(s) links through the relay's endpoint.

Only HTML parts change; text parts, ``mailto:``/``tel:``/relative links and links already
pointing at the relay stay as they are. Each rewritten link carries its target inside a
signed token, so the endpoint redirects only where the message itself pointed.
"""

from __future__ import annotations

import html
import re
from urllib.parse import urlsplit

from mailrelay.features.links import Links, Recipient
from mailrelay.features.mime import Edit, TextPart, Unsafe, chain, insert_html, prepare
from mailrelay.features.result import Result

# An <a> or <area> start tag; quoted attribute values may contain ">".
_LINK_TAG = re.compile(r"""<(?:a|area)\b(?:[^>"']|"[^"]*"|'[^']*')*>""", re.I)
_HREF = re.compile(r"""(?<![\w-])(href\s*=\s*)("[^"]*"|'[^']*'|[^\s"'>]+)""", re.I)


class Tracker:
    def __init__(self, links: Links) -> None:
        self.links = links

    def edit(self, r: Recipient, opens: bool = True, clicks: bool = True) -> Edit:
        """An edit function for HTML parts: links rewritten, then the pixel added."""
        return chain(
            *([self.link_edit(r)] if clicks else []), *([self.pixel_edit(r)] if opens else [])
        )

    def link_edit(self, r: Recipient) -> Edit:
        """Every http(s) link of an HTML part through the click endpoint."""

        def edit(part: TextPart) -> str | None:
            return self.rewrite_links(part.text, r) if part.subtype == "html" else None

        return edit

    def pixel_edit(self, r: Recipient) -> Edit:
        """The open-tracking pixel at the end of an HTML part."""

        def edit(part: TextPart) -> str | None:
            return insert_html(part.text, self.pixel(r)) if part.subtype == "html" else None

        return edit

    def rewrite_links(self, markup: str, r: Recipient) -> str:
        def tag(m: re.Match) -> str:
            return _HREF.sub(href, m.group(), count=1)

        def href(m: re.Match) -> str:
            target = html.unescape(m.group(2).strip("\"'")).strip()
            if urlsplit(target).scheme.lower() not in ("http", "https"):
                return m.group()
            if self.links.is_ours(target) or not target.isprintable():
                return m.group()
            return f'{m.group(1)}"{html.escape(self.links.click_url(r, target))}"'

        return _LINK_TAG.sub(tag, markup)

    def pixel(self, r: Recipient) -> str:
        src = html.escape(self.links.open_url(r))
        return (
            f'<img src="{src}" width="1" height="1" alt="" '
            'style="border:0;width:1px;height:1px;overflow:hidden">'
        )

    def apply(self, raw: bytes, r: Recipient, opens: bool = True, clicks: bool = True) -> Result:
        """``raw`` tracked for ``r``, or unchanged with the reason."""
        try:
            prepared = prepare(raw)
            if not any(p.subtype == "html" for p in prepared.parts):
                return Result(raw, False, "no HTML part")
            return Result(prepared.render(self.edit(r, opens, clicks)), True)
        except Unsafe as e:
            return Result(raw, False, str(e))
