"""The unsubscribe footer and the List-Unsubscribe headers (RFC 2369, RFC 8058).

Text parts get the text template, HTML parts the HTML template before ``</body>``; the
templates are ``string.Template`` text with ``$url`` and ``$recipient`` (HTML-escaped in
the HTML template). An HTML part keeps its charset (characters it cannot hold become
character references); a text part becomes UTF-8 only when the footer does not fit its
charset. Existing List-Unsubscribe headers are replaced: the relay's suppression list is the
one that is enforced.
"""

from __future__ import annotations

import codecs
import html
from string import Template

from mailrelay.features.mime import Edit, TextPart, Unsafe, append_text, insert_html, prepare
from mailrelay.features.result import Result

DEFAULT_TEXT = "To stop receiving these messages at $recipient, unsubscribe here: $url"
DEFAULT_HTML = (
    '<p style="margin:2em 0 0;font-size:12px;color:#666666">'
    'To stop receiving these messages at $recipient, <a href="$url">unsubscribe here</a>.</p>'
)
LIST_HEADERS = ("list-unsubscribe", "list-unsubscribe-post")


class Footer:
    def __init__(self, text_template: str = DEFAULT_TEXT, html_template: str = DEFAULT_HTML):
        """Raises ValueError naming the template with an unknown placeholder."""
        self.text_template = _checked(text_template, "text")
        self.html_template = _checked(html_template, "HTML")

    def edit(self, recipient: str, url: str) -> Edit:
        """An edit function adding this recipient's footer to each body part."""
        text = self.text_template.substitute(url=url, recipient=recipient)
        markup = self.html_template.substitute(
            url=html.escape(url), recipient=html.escape(recipient)
        )

        def edit(part: TextPart) -> str:
            if part.subtype == "html":
                name = codecs.lookup(part.charset).name
                fitted = markup.encode(name, "xmlcharrefreplace").decode(name)
                return insert_html(part.text, fitted)
            return append_text(part.text, text, part.newline)

        return edit

    @staticmethod
    def headers(url: str, mailto: str | None = None) -> list[tuple[str, str]]:
        uris = f"<{url}>" + (f",\r\n <{mailto}>" if mailto else "")
        return [
            ("List-Unsubscribe", uris),
            ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
        ]

    def apply(self, raw: bytes, recipient: str, url: str, mailto: str | None = None) -> Result:
        """``raw`` with the footer and headers for ``recipient``, or unchanged with why."""
        try:
            data = prepare(raw).render(
                self.edit(recipient, url), self.headers(url, mailto), LIST_HEADERS
            )
        except Unsafe as e:
            return Result(raw, False, str(e))
        return Result(data, True)


def _checked(template: str, what: str) -> Template:
    t = Template(template)
    try:
        t.substitute(url="u", recipient="r")
    except KeyError as e:
        raise ValueError(
            f"unknown placeholder ${e.args[0]} in the {what} footer template "
            "(known: $url, $recipient)"
        )
    except ValueError as e:
        raise ValueError(f"bad {what} footer template: {e} (write $$ for a dollar sign)")
    return t
