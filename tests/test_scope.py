"""Sender scopes: parsing what admins type, and matching what clients send."""

from __future__ import annotations

import pytest

from mailrelay.model import Account, Kind, SmtpUser, canonical_username, kind_of
from mailrelay.scope import (
    Scope,
    ScopeError,
    is_address,
    is_domain,
    parse_addresses,
    parse_domains,
    to_ascii_domain,
)


@pytest.mark.parametrize(
    "text",
    ["doe.com", "Doe.COM", "mail.doe.com", "a-b.example.org", "x.xn--p1ai", "0.example.io"],
)
def test_valid_domains(text):
    assert is_domain(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "com",  # a single label
        "-doe.com",
        "doe-.com",
        "doe..com",
        ".doe.com",
        "doe.com.",  # trailing dot
        "doe.c0m",  # last label not alphabetic
        "1.2.3.4",
        "doe.com\n",  # a trailing newline must not slip through "$"
        "do e.com",
        "a" * 64 + ".com",  # a label over 63
        ".".join(["a" * 60] * 5) + ".com",  # over 253
        "bücher.de",  # only the A-label form is a domain; see to_ascii_domain
    ],
)
def test_invalid_domains(text):
    assert not is_domain(text)


@pytest.mark.parametrize(
    "text", ["john@doe.com", "John.Smith@Doe.com", "a+tag@doe.com", "o'neil@doe.com", "x@a.b.co"]
)
def test_valid_addresses(text):
    assert is_address(text)


@pytest.mark.parametrize(
    "text",
    [
        "doe.com",
        "@doe.com",
        "john@",
        "john@doe",
        ".john@doe.com",
        "john.@doe.com",
        "jo..hn@doe.com",
        '"john smith"@doe.com',  # quoted local parts are not accepted in scopes
        "jo hn@doe.com",
        "jo(hn)@doe.com",
        "john@doe.com\n",
        "a" * 65 + "@doe.com",
        "jöhn@doe.com",  # SMTPUTF8 local part
    ],
)
def test_invalid_addresses(text):
    assert not is_address(text)


def test_parse_lowercases_and_trims():
    assert parse_domains(" Doe.COM ; b.org") == {"doe.com", "b.org"}
    assert parse_addresses("John@Doe.com;x@B.org ") == {"john@doe.com", "x@b.org"}
    assert parse_domains("") == frozenset()
    assert parse_domains("   ") == frozenset()


def test_parse_refuses_commas_naming_the_fix():
    with pytest.raises(ScopeError, match="semicolons, not commas"):
        parse_domains("a.com,b.com")
    with pytest.raises(ScopeError, match="semicolons, not commas"):
        parse_addresses("x@a.com, y@b.com")


@pytest.mark.parametrize("text", ["a.com;", ";a.com", "a.com;;b.com", "a.com; ;b.com"])
def test_parse_refuses_empty_entries(text):
    with pytest.raises(ScopeError, match="empty entry"):
        parse_domains(text)


def test_parse_names_the_bad_entry():
    with pytest.raises(ScopeError, match="'x@a.com' is an address, not a domain"):
        parse_domains("b.com;x@a.com")
    with pytest.raises(ScopeError, match="'nope' is not a valid domain name"):
        parse_domains("b.com;nope")
    with pytest.raises(ScopeError, match="'a.com' is not a valid email address"):
        parse_addresses("x@b.com;a.com")
    with pytest.raises(ScopeError, match="separate entries with semicolons"):
        parse_domains("a.com b.com")


def test_idna_names_are_stored_as_a_labels():
    assert to_ascii_domain("Bücher.DE") == "xn--bcher-kva.de"
    assert parse_domains("bücher.de;xn--bcher-kva.de") == {"xn--bcher-kva.de"}
    assert parse_addresses("info@Bücher.de") == {"info@xn--bcher-kva.de"}
    with pytest.raises(ScopeError, match="internationalized"):
        parse_domains("bü\u200dcher.de")  # a joiner outside its permitted context


def test_u_labels_and_a_labels_are_one_domain():
    scope = Scope.parse("example.рф;xn--bcher-kva.de", "info@xn--80akhbyknj4f.test")
    assert scope.domains == {"example.xn--p1ai", "xn--bcher-kva.de"}
    for address in ["x@example.рф", "x@EXAMPLE.xn--p1ai", "x@bücher.de", "x@BÜCHER.de",
                    "info@испытание.test", "info@xn--80akhbyknj4f.test"]:
        assert scope.allows(address), address
    assert not scope.allows("x@испытание.test")
    assert not scope.allows("x@bücher.de.evil.org")


def test_utf8_local_parts_are_allowed_by_a_domain_only():
    scope = Scope.parse("doe.com", "info@b.org")
    assert scope.allows("jöhn@doe.com")
    assert scope.allows("用户@doe.com")
    assert not scope.allows("jöhn@b.org")  # address entries are ASCII
    assert not scope.allows('"jö hn"@doe.com')  # quoted: refused as for ASCII
    assert not scope.allows("jö\u00a0hn@doe.com")
    assert not scope.allows("jö\u0085hn@doe.com")
    assert not scope.allows("ö" * 33 + "@doe.com")  # 66 octets


def test_invalid_local_parts_in_scopes():
    for bad in ['"x y"@a.com', "jöhn@a.com", "x..y@a.com", "x@@a.com"]:
        with pytest.raises(ScopeError):
            parse_addresses(bad)


def test_allows_domain_exactly_and_case_insensitively():
    scope = Scope.parse("doe.com")
    assert scope.allows("john@doe.com")
    assert scope.allows("JOHN@DOE.COM")
    assert scope.allows(" john@doe.com ")
    assert not scope.allows("john@mail.doe.com")  # subdomains are listed explicitly
    assert not scope.allows("john@notdoe.com")
    assert not scope.allows("john@doe.com.evil.org")
    assert not scope.allows("doe.com")
    assert not scope.allows("")  # the null sender is never in scope
    assert not scope.allows("john\n@doe.com")


def test_allows_addresses_only_those():
    scope = Scope.parse("", "john@doe.com;Jane@B.org")
    assert scope.allows("John@doe.com")
    assert scope.allows("jane@b.org")
    assert not scope.allows("mary@doe.com")
    assert not scope.allows("jane@x.b.org")


def test_allows_internationalized_sender_domains():
    scope = Scope.parse("bücher.de")
    assert scope.allows("info@xn--bcher-kva.de")
    assert scope.allows("info@BÜCHER.de")
    assert not scope.allows("info@bucher.de")


def test_within_and_outside_account_domains():
    scope = Scope.parse("a.com;b.com", "x@a.com;y@c.com")
    account = frozenset({"a.com"})
    assert scope.within(account) == Scope.parse("a.com", "x@a.com")
    assert scope.outside(account) == ["b.com", "y@c.com"]
    assert Scope.parse("a.com").outside(account) == []


def test_text_forms_round_trip():
    scope = Scope.parse("b.com;a.com", "y@b.com;x@a.com")
    assert scope.domains_text() == "a.com;b.com"
    assert scope.addresses_text() == "x@a.com;y@b.com"
    assert str(scope) == "a.com;b.com;x@a.com;y@b.com"
    assert Scope.parse(scope.domains_text(), scope.addresses_text()) == scope
    assert Scope().empty and not scope.empty


def test_kinds_and_effective_scopes():
    assert kind_of("doe.com") is Kind.DOMAIN
    assert kind_of("john@doe.com") is Kind.ADDRESS
    assert kind_of("webmail") is Kind.NAMED
    account = Account("default", frozenset({"doe.com"}))
    assert SmtpUser("doe.com").effective_scope(account) == Scope.parse("doe.com")
    assert SmtpUser("john@doe.com").effective_scope(account) == Scope.parse("", "john@doe.com")
    # A domain-level user of a domain its account does not authorize may send nothing.
    assert SmtpUser("b.org").effective_scope(account).empty
    named = SmtpUser("app", scope=Scope.parse("doe.com;b.org"))
    assert named.effective_scope(account) == Scope.parse("doe.com")
    assert named.effective_scope() == Scope.parse("doe.com;b.org")


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("Doe.COM", "doe.com"),
        ("John@Doe.com", "john@doe.com"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("Webmail", "Webmail"),  # named usernames are case-sensitive
        ("@doe.com", "@doe.com"),
        ("a b", "a b"),
    ],
)
def test_canonical_username(given, canonical):
    assert canonical_username(given) == canonical
