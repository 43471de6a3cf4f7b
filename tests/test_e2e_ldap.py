"""End to end through twistd with users in a real OpenLDAP slapd (issue 4)."""

from __future__ import annotations

import contextlib
import json
import smtplib
import subprocess

import ldap3
import pytest
from harness import Relay, message, run_twistd, wait_for
from ldap_server import start_slapd

DOE = ("doe.test", "doe-domain-secret")
JOHN = ("john@doe.test", "john-secret")
WEBMAIL = ("webmail", "webmail-secret")
WEBMAIL_DN = "uid=webmail,ou=smtp-users,dc=example,dc=test"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    server = start_slapd(tmp_path_factory.mktemp("slapd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def relay(slapd, tmp_path_factory):
    r = Relay(
        tmp_path_factory.mktemp("relay"),
        config="[directory]\nbackend = ldap\n"
        + slapd.config_text(cache_ttl="1s", timeout="2s")
        + "[delivery]\nenabled = no\n"
        # Many deliberate failures from 127.0.0.1 here: no brute-force delays in this test.
        + "[policy]\nlogin_delay_after = 1000\nlogin_block_after = 1000\n",
    )
    r.start()
    yield r
    r.stop()


def mail_from(relay, login, sender) -> tuple[int, bytes]:
    with relay.smtp(login=login) as c:
        return c.docmd("MAIL", f"FROM:<{sender}>")


def test_domain_level_login_and_scope(relay):
    assert mail_from(relay, DOE, "anyone@doe.test")[0] == 250
    code, text = mail_from(relay, DOE, "anyone@lists.doe.test")
    assert code == 550 and b"5.7.1" in text


def test_user_level_login_and_scope(relay):
    assert mail_from(relay, JOHN, "john@doe.test")[0] == 250
    assert mail_from(relay, ("JOHN@DOE.TEST", JOHN[1]), "john@doe.test")[0] == 250
    assert mail_from(relay, JOHN, "jane@doe.test")[0] == 550


def test_named_user_scope_and_full_submission(relay):
    with relay.smtp(login=WEBMAIL) as c:
        c.mail("info@doe.test")
        c.rcpt("someone@example.net")
        code, text = c.data(message("info@doe.test", "someone@example.net"))
    assert code == 250
    queue_id = text.decode().rsplit(" ", 1)[-1]
    envelope = json.loads((relay.data / "spool" / "queue" / queue_id).read_bytes()
                          .partition(b"\n")[0])
    assert envelope["user"] == "webmail"
    assert mail_from(relay, WEBMAIL, "x@lists.doe.test")[0] == 250
    assert mail_from(relay, WEBMAIL, "x@doe.test")[0] == 550


@pytest.mark.parametrize("username", ["*", "doe.test)(uid=*", "*)(|(uid=*", "doe.test\\",
                                      "webmail*", "(uid=webmail)"])
def test_filter_injection_never_logs_in(relay, username):
    for password in (DOE[1], WEBMAIL[1], "*"):
        with relay.smtp() as c, pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login(username, password)
        assert e.value.smtp_code == 535


def test_wrong_password_and_unknown_user_look_the_same(relay):
    replies = []
    for user in ("doe.test", "nobody.test"):
        with relay.smtp() as c, pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login(user, "wrong password")
        replies.append((e.value.smtp_code, e.value.smtp_error))
    assert replies[0] == replies[1] and replies[0][0] == 535


def test_scope_change_in_ldap_is_seen_after_the_cache_ttl(relay, slapd):
    assert mail_from(relay, WEBMAIL, "x@new.doe.test")[0] == 550
    admin = slapd.admin()
    admin.modify(WEBMAIL_DN, {"mailrelaySenderDomain": [(ldap3.MODIFY_ADD, ["new.doe.test"])]})
    try:
        # The account must authorize the domain too (a scope lies within its account).
        admin.modify("cn=default,ou=accounts,dc=example,dc=test",
                     {"mailrelayAccountDomain": [(ldap3.MODIFY_ADD, ["new.doe.test"])]})
        wait_for(lambda: mail_from(relay, WEBMAIL, "x@new.doe.test")[0] == 250, timeout=15,
                 interval=0.5, what="the new scope after the cache TTL")
    finally:
        admin.modify(WEBMAIL_DN,
                     {"mailrelaySenderDomain": [(ldap3.MODIFY_DELETE, ["new.doe.test"])]})
        admin.unbind()


def test_ldap_down_gives_454_then_recovers(relay, slapd):
    slapd.stop()
    try:
        # A password not in the login cache, so the directory must be asked.
        with relay.smtp() as c, pytest.raises(smtplib.SMTPAuthenticationError) as e:
            c.login("newsletter", "newsletter-secret")
        assert e.value.smtp_code == 454 and b"4.7.0" in e.value.smtp_error
    finally:
        slapd.start()
    wait_for(lambda: _logs_in(relay, ("newsletter", "newsletter-secret")), timeout=20,
             interval=0.5, what="recovery after slapd restarted")


def _logs_in(relay, login) -> bool:
    try:
        relay.smtp(login=login).quit()
        return True
    except smtplib.SMTPAuthenticationError:
        return False


def test_admin_lists_ldap_users_read_only(relay):
    users = json.loads(relay.admin("user", "list", "--json").stdout)
    assert {"doe.test", "john@doe.test", "webmail"} <= {u["username"] for u in users}
    refused = relay.admin("user", "add", "x.test", check=False)
    assert refused.returncode == 1 and "LDAP" in refused.stderr


def start_with_ldap(directory, ldap_config: str) -> subprocess.CompletedProcess:
    """twistd with the LDAP directory ``ldap_config`` sets up, run until it exits."""
    return run_twistd(directory, f"[server]\ndata_dir = {directory}/data\n[directory]\n"
                      f"backend = ldap\n{ldap_config}"
                      "[listener:smtp]\nendpoint = tcp:0:interface=127.0.0.1\n")  # fmt: skip


def test_wrong_bind_dn_stops_startup_clearly(slapd, tmp_path):
    result = start_with_ldap(tmp_path, slapd.config_text().replace("cn=mailrelay,",
                                                                   "cn=nobody,"))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "mailrelay: LDAP bind as cn=nobody,ou=services,dc=example,dc=test failed: "
        "invalid credentials"]


def test_wrong_base_stops_startup_clearly(slapd, tmp_path):
    result = start_with_ldap(tmp_path, slapd.config_text().replace(
        "base_dn = dc=example", "base_dn = ou=none,dc=example"))
    assert result.returncode != 0
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def _same_second_changes(admin, dn: str, *changes: dict) -> None:
    """Apply ``changes`` one after another within one second of the server's clock (the
    resolution of modifyTimestamp), so that the entry's stamp does not change between
    them; retried until the server's stamps show they fell in the same second."""
    for _ in range(10):
        stamps = []
        for change in changes:
            assert admin.modify(dn, change), admin.result
            admin.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["modifyTimestamp"])
            stamps.append(admin.entries[0].modifyTimestamp.value)
        if len(set(stamps)) == 1:
            return
    raise AssertionError("could not make two changes within one second")


def test_password_status_and_deletion_in_ldap_take_effect_within_the_cache_ttl(relay, slapd):
    """A change made in the same second as the entry's previous change (one modifyTimestamp
    for both) is in force within [ldap] cache_ttl (1 s here), not [directory]
    login_cache_ttl (60 s): the old password, a blocked status and a deleted entry stop
    working although the stamp the relay sees is unchanged."""
    dn = "uid=rotate,ou=smtp-users,dc=example,dc=test"
    admin = slapd.admin()
    try:
        assert admin.add(dn, ["account", "simpleSecurityObject", "mailrelayUser"],
                         {"userPassword": "first-secret", "description": "rotation test",
                          "mailrelaySenderDomain": "doe.test"}), admin.result
        wait_for(lambda: _logs_in(relay, ("rotate", "first-secret")), timeout=15,
                 interval=0.3, what="the new LDAP user")
        _same_second_changes(
            admin, dn, {"description": [(ldap3.MODIFY_REPLACE, ["touched"])]},
            {"userPassword": [(ldap3.MODIFY_REPLACE, ["second-secret"])]})
        wait_for(lambda: not _logs_in(relay, ("rotate", "first-secret")), timeout=5,
                 interval=0.3, what="the old password refused")
        assert _logs_in(relay, ("rotate", "second-secret"))

        _same_second_changes(
            admin, dn, {"description": [(ldap3.MODIFY_REPLACE, ["touched again"])]},
            {"mailrelayStatus": [(ldap3.MODIFY_REPLACE, ["blocked"])]})
        wait_for(lambda: mail_from(relay, ("rotate", "second-secret"), "a@doe.test")[0] == 550,
                 timeout=5, interval=0.3, what="the blocked status")
        assert admin.modify(dn, {"mailrelayStatus": [(ldap3.MODIFY_DELETE, [])]})
        wait_for(lambda: mail_from(relay, ("rotate", "second-secret"), "a@doe.test")[0] == 250,
                 timeout=5, interval=0.3, what="the status back to allowed")
        assert admin.delete(dn), admin.result
        wait_for(lambda: not _logs_in(relay, ("rotate", "second-secret")), timeout=5,
                 interval=0.3, what="the deleted user refused")
    finally:
        with contextlib.suppress(ldap3.core.exceptions.LDAPNoSuchObjectResult):
            admin.delete(dn)
        admin.unbind()
