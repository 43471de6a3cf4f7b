"""Signed tracking tokens: round trip, tampering, forgery, the key file."""

from __future__ import annotations

import base64
import os
import stat

import pytest

from mailrelay.features.links import Links, Recipient
from mailrelay.features.tokens import Kind, Token, TokenError, TokenSigner
from mailrelay.signing import load_or_create_key

R = Recipient("30193a2b4c5d6e7f8a9b", "acme", "news@acme.example", "alice@example.org")


@pytest.fixture
def signer(tmp_path):
    return TokenSigner.from_key_file(str(tmp_path / "keys" / "token.key"))


def test_round_trip(signer):
    for token in (
        R.token(Kind.OPEN),
        R.token(Kind.UNSUBSCRIBE),
        R.token(Kind.CLICK, "https://shop.example/é?a=1&b=2#x"),
    ):
        text = signer.sign(token)
        assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
        assert signer.verify(text) == token
        assert signer.verify(text, token.kind) == token


def test_wrong_kind_refused(signer):
    text = signer.sign(R.token(Kind.OPEN))
    with pytest.raises(TokenError, match="not a click token"):
        signer.verify(text, Kind.CLICK)


def test_tampered_payload_refused(signer):
    text = signer.sign(R.token(Kind.CLICK, "https://shop.example/"))
    payload, tag = text.split(".")
    evil = base64.urlsafe_b64decode(payload + "==").replace(b"shop.example", b"evil.example")
    forged = base64.urlsafe_b64encode(evil).rstrip(b"=").decode() + "." + tag
    with pytest.raises(TokenError, match="bad signature"):
        signer.verify(forged)
    flipped = text[:-1] + ("A" if text[-1] != "A" else "B")
    with pytest.raises(TokenError):
        signer.verify(flipped)


def test_forged_with_another_key_refused(signer):
    other = TokenSigner(os.urandom(32))
    with pytest.raises(TokenError, match="bad signature"):
        signer.verify(other.sign(R.token(Kind.UNSUBSCRIBE)))


@pytest.mark.parametrize("text", ["", "abc", "a.b.c", "!!!.???", "é.é", "x" * 9000 + ".y"])
def test_garbage_refused(signer, text):
    with pytest.raises(TokenError):
        signer.verify(text)


def test_tokens_differ_per_recipient_and_message(signer):
    other = Recipient("30193a2b4c5d6e7f8a9c", R.account, R.user, R.recipient)
    a, b = signer.sign(R.token(Kind.OPEN)), signer.sign(other.token(Kind.OPEN))
    assert a != b and a.split(".")[1] != b.split(".")[1]


def test_click_tokens_need_a_url(signer):
    with pytest.raises(ValueError):
        signer.sign(Token(Kind.CLICK, "q", "a", "u", "r"))
    with pytest.raises(ValueError):
        signer.sign(Token(Kind.OPEN, "q", "a", "u", "r", "https://x.example/"))


def test_key_file_made_once_private_and_reused(tmp_path):
    path = str(tmp_path / "token.key")
    key = load_or_create_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_key(path) == key
    assert os.listdir(tmp_path) == ["token.key"]  # no temporary file left behind
    text = TokenSigner(key).sign(R.token(Kind.OPEN))
    assert TokenSigner.from_key_file(path).verify(text).recipient == R.recipient


def test_bad_key_file(tmp_path):
    path = tmp_path / "token.key"
    path.write_text("not hex\n")
    with pytest.raises(ValueError, match="not hex"):
        load_or_create_key(str(path))
    path.write_text("abcd\n")
    with pytest.raises(ValueError, match="shorter than 16 bytes"):
        load_or_create_key(str(path))


def test_links(signer):
    links = Links(signer, "https://track.example/m/", "unsub@relay.example")
    assert links.open_url(R).startswith("https://track.example/m/o/")
    click = links.click_url(R, "https://shop.example/")
    assert signer.verify(click.rsplit("/", 1)[1], Kind.CLICK).url == "https://shop.example/"
    unsub = links.unsubscribe_url(R)
    assert signer.verify(unsub.rsplit("/", 1)[1], Kind.UNSUBSCRIBE) == R.token(Kind.UNSUBSCRIBE)
    assert links.mailto(R).startswith("mailto:unsub@relay.example?subject=unsubscribe%20")
    assert links.is_ours(unsub) and not links.is_ours("https://track.example/mx")
    assert Links(signer, "https://t.example").mailto(R) is None
    with pytest.raises(ValueError):
        Links(signer, "ftp://t.example")
