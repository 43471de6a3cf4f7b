"""One recipient's copy of a message: footer and tracking applied in one pass.

The message is parsed once (``prepare``, CPU-bound: run it in a thread for big messages)
and each recipient's copy is then spliced from it (``for_recipient``: cheap, reactor-safe).
Links are rewritten before the footer is added, so the unsubscribe link is never tracked;
the pixel goes last.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailrelay.features.copy import Copy
from mailrelay.features.footer import LIST_HEADERS, Footer
from mailrelay.features.links import Links, Recipient
from mailrelay.features.mime import Prepared, Unsafe, chain, prepare
from mailrelay.features.result import Result
from mailrelay.features.tracking import Tracker


@dataclass(frozen=True)
class Options:
    """Which features a user has switched on (SmtpUser.unsubscribe_footer, ...)."""

    footer: bool = False
    opens: bool = False
    clicks: bool = False

    @property
    def any(self) -> bool:
        return self.footer or self.opens or self.clicks


@dataclass
class Parsed:
    """A message prepared once for all its recipients (or why it cannot be changed)."""

    raw: bytes
    prepared: Prepared | None
    reason: str | None = None


class Personalizer:
    def __init__(self, links: Links, footer: Footer | None = None) -> None:
        self.links = links
        self.footer = footer or Footer()
        self.tracker = Tracker(links)

    @staticmethod
    def prepare(raw: bytes) -> Parsed:
        try:
            return Parsed(raw, prepare(raw))
        except Unsafe as e:
            return Parsed(raw, None, str(e))

    def for_recipient(self, parsed: Parsed, r: Recipient, options: Options) -> Result:
        """The bytes to send to ``r.recipient``; unchanged (with the reason) when the
        message cannot be changed safely or nothing applies."""
        copy = self.copy(parsed, r, options)
        return Result(copy.to_bytes() if copy.changed else parsed.raw, copy.changed, copy.reason)

    def copy(self, parsed: Parsed, r: Recipient, options: Options) -> Copy:
        """``for_recipient`` as pieces sharing the original's bytes (see copy.py)."""
        if parsed.prepared is None:
            return Copy([parsed.raw], False, parsed.reason)
        if not options.any:
            return Copy([parsed.raw], False, "no per-recipient feature on")
        edits = []
        headers: list[tuple[str, str]] = []
        if options.clicks:  # first, so the unsubscribe link is not tracked
            edits.append(self.tracker.link_edit(r))
        if options.footer:
            url = self.links.unsubscribe_url(r)
            headers = self.footer.headers(url, self.links.mailto(r))
            edits.append(self.footer.edit(r.recipient, url))
        if options.opens:
            edits.append(self.tracker.pixel_edit(r))
        drop = LIST_HEADERS if options.footer else ()
        try:
            pieces = parsed.prepared.pieces(chain(*edits), headers, drop)
        except Unsafe as e:
            return Copy([parsed.raw], False, str(e))
        if len(pieces) == 1:
            return Copy([parsed.raw], False, "no HTML part to track")
        return Copy(pieces, True)
