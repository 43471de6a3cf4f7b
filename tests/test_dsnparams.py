"""DSN parameters (RFC 3461): xtext, the checks of RET, ENVID, NOTIFY and ORCPT, and the
parameters passed on."""

from __future__ import annotations

import pytest

from mailrelay import dsnparams
from mailrelay.model import Envelope
from mailrelay.reply import Reply


def test_xtext_round_trip_and_strictness():
    assert dsnparams.xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert dsnparams.xtext_decode("a+2Bb+3Dc+20d") == b"a+b=c d"
    for bad in ("a+2b", "a+2", "a=b", "a b", "a+G0", "\u00e9"):
        with pytest.raises(ValueError):
            dsnparams.xtext_decode(bad)


def refusal(call, params) -> str:
    with pytest.raises(Reply) as e:
        call(params)
    return f"{e.value.code} {e.value.status}"


def test_mail_parameters_checked_and_taken_out():
    found, rest = dsnparams.take_mail({"SIZE": "10", "RET": "hdrs", "ENVID": "QQ+2B1"})
    assert found == {"ret": "HDRS", "envid": "QQ+1"} and rest == {"SIZE": "10"}
    assert dsnparams.take_mail({"BODY": "7BIT"}) == ({}, {"BODY": "7BIT"})
    for params in ({"RET": "BODY"}, {"RET": None}, {"ENVID": None}, {"ENVID": "x" * 101},
                   {"ENVID": "a+2"}, {"ENVID": "a+0A"}):
        assert refusal(dsnparams.take_mail, params) == "501 5.5.4", params
    assert dsnparams.take_mail({"ENVID": "x" * 100})[0] == {"envid": "x" * 100}


def test_rcpt_parameters_checked_and_taken_out():
    found, rest = dsnparams.take_rcpt({"NOTIFY": "success,Delay",
                                       "ORCPT": "RFC822;a+2Bb@c.test"})
    assert found == {"notify": "SUCCESS,DELAY", "orcpt": "rfc822;a+b@c.test"} and rest == {}
    assert dsnparams.take_rcpt({"NOTIFY": "never"})[0] == {"notify": "NEVER"}
    assert dsnparams.take_rcpt({"ORCPT": "utf-8;j\\x{E9}r\\x{F4}me@b.test"})[0] == {
        "orcpt": "utf-8;j\u00e9r\u00f4me@b.test"}
    for params in ({"NOTIFY": "NEVER,SUCCESS"}, {"NOTIFY": "SUCCESS,SUCCESS"},
                   {"NOTIFY": "ALWAYS"}, {"NOTIFY": None}, {"NOTIFY": "SUCCESS,"},
                   {"ORCPT": "a@b.test"}, {"ORCPT": "rfc822;"}, {"ORCPT": ";a@b.test"},
                   {"ORCPT": "rfc822;a+2"}, {"ORCPT": "rfc822;a+0Ab@c.test"},
                   {"ORCPT": "utf-8;a\\x{0A}b"}, {"ORCPT": "utf-8;a\\b"},
                   {"ORCPT": "utf-8;\\x{110000}"}):
        assert refusal(dsnparams.take_rcpt, params) == "501 5.5.4", params


def test_parameters_passed_on_encoded_as_received():
    assert dsnparams.mail_params("FULL", "QQ+1") == " RET=FULL ENVID=QQ+2B1"
    assert dsnparams.mail_params(None, None) == ""
    assert dsnparams.rcpt_params({"notify": "NEVER", "orcpt": "rfc822;a+b@c.test"}) == (
        " NOTIFY=NEVER ORCPT=rfc822;a+2Bb@c.test")
    assert dsnparams.rcpt_params({"orcpt": "utf-8;j\u00e9r+me@b.test"}) == (
        " ORCPT=utf-8;j\\x{E9}r\\x{2B}me@b.test")
    assert dsnparams.rcpt_params(None) == dsnparams.rcpt_params({}) == ""
    assert dsnparams.orcpt_field("utf-8;j\u00e9@b.test") == "utf-8; j\\x{E9}@b.test"


def test_what_a_recipient_asked_for():
    assert dsnparams.wants(None, "FAILURE") is None
    assert dsnparams.wants({"orcpt": "rfc822;a@b.test"}, "DELAY") is None
    assert dsnparams.wants({"notify": "SUCCESS,DELAY"}, "DELAY") is True
    assert dsnparams.wants({"notify": "NEVER"}, "FAILURE") is False


def test_an_envelope_spooled_before_dsn_reads_with_nothing_asked():
    old = {"id": "q1", "sender": "a@b.test", "recipients": ["c@d.test"], "user": "u",
           "account": "default", "client_ip": None, "helo": None, "tls": False,
           "received_at": 1.0}
    envelope = Envelope.from_json(old)
    assert (envelope.ret, envelope.envid, envelope.dsn) == (None, None, {})
    asked = Envelope.from_json({**old, "ret": "HDRS", "envid": "x",
                                "dsn": {"c@d.test": {"notify": "NEVER"}}})
    assert Envelope.from_json(asked.to_json()) == asked
