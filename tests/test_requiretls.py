"""REQUIRETLS (RFC 8689): MAIL's parameter as the session takes it, and which connections
may carry such a message."""

from __future__ import annotations

import pytest

from mailrelay import requiretls
from mailrelay.delivery.dane import TlsPolicy
from mailrelay.delivery.dnssec import TLSA
from mailrelay.reply import Reply


def test_mail_parameter():
    assert requiretls.take_mail({"SIZE": "10"}, True) == (False, {"SIZE": "10"})
    assert requiretls.take_mail({"REQUIRETLS": None, "SIZE": "10"}, True) == (
        True, {"SIZE": "10"})
    with pytest.raises(Reply) as raised:
        requiretls.take_mail({"REQUIRETLS": "YES"}, True)
    assert (raised.value.code, raised.value.status) == (501, "5.5.4")
    with pytest.raises(Reply) as raised:
        requiretls.take_mail({"REQUIRETLS": None}, False)
    assert (raised.value.code, raised.value.status) == (530, "5.7.10")


def test_only_checked_tls_to_a_hop_that_offers_it():
    dane = TlsPolicy("dane", tlsa=(TLSA(3, 1, 1, b"x" * 32),), names=("mx",))
    assert dane.checked and TlsPolicy("mta-sts").checked
    for level in ("may", "encrypt", "verify"):  # verify: the MX name was not validated
        assert not TlsPolicy(level).checked
    assert not TlsPolicy("dane").checked  # DANE with only unusable records: no check
    assert requiretls.problem(True, "dane", True, True) is None
    assert requiretls.problem(False, "dane", True, True) == "no TLS to the next hop"
    assert "does not verify" in requiretls.problem(True, "encrypt", False, True)
    assert requiretls.problem(True, "mta-sts", True, False) == (
        "the next hop does not offer REQUIRETLS")
