"""mailrelay-admin user and account commands, as an admin runs them.

Most tests call main(argv) in the test process (fast); the ones about the real command
line, exit statuses and a failing disk run ``python -m mailrelay.admin.cli`` as a
subprocess.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailrelay.admin.cli import main
from mailrelay.auth.passwords import verify_password

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    status: int
    out: str
    err: str

    @property
    def password(self) -> str:
        found = re.findall(r"^password for \S+: (\S+)$", self.out, re.M)
        assert len(found) == 1, self
        return found[0]


class Admin:
    def __init__(self, tmp_path: Path, capsys, monkeypatch) -> None:
        self.data_dir = tmp_path / "data"  # does not exist until the first change
        self.users_file = self.data_dir / "users.json"
        self.config = tmp_path / "mailrelay.ini"
        self.config.write_text(f"[server]\ndata_dir = {self.data_dir}\nhostname = relay.test\n")
        self._capsys = capsys
        self._monkeypatch = monkeypatch

    def __call__(self, *argv: str, stdin: str = "") -> Result:
        self._monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        try:
            status = main(["-c", str(self.config), *argv])
        except SystemExit as e:  # argparse usage errors
            status = e.code
        captured = self._capsys.readouterr()
        return Result(status, captured.out, captured.err)

    def ok(self, *argv: str, stdin: str = "") -> Result:
        result = self(*argv, stdin=stdin)
        assert result.status == 0, result
        return result

    def file(self) -> dict:
        return json.loads(self.users_file.read_text())

    def stored_hash(self, username: str) -> str:
        return self.file()["users"][username]["password_hash"]

    def subprocess(self, *argv: str, stdin: str = "", preexec_fn=None) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "mailrelay.admin.cli", "-c", str(self.config), *argv],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            preexec_fn=preexec_fn,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def admin(tmp_path, capsys, monkeypatch) -> Admin:
    return Admin(tmp_path, capsys, monkeypatch)


@pytest.fixture
def populated(admin) -> Admin:
    admin.ok("account", "set", "default", "--add-domain", "doe.com;b.org")
    admin.ok("user", "add", "doe.com", "--note", "office clients")
    admin.ok("user", "add", "john@doe.com")
    admin.ok("user", "add", "app", "--domains", "b.org", "--addresses", "x@doe.com")
    return admin


# ---- through the real command line ----


def test_add_prints_the_password_once_and_stores_only_its_hash(admin):
    result = admin.subprocess("account", "set", "default", "--add-domain", "doe.com")
    assert result.status == 0, result
    assert stat.S_IMODE(os.stat(admin.data_dir).st_mode) == 0o700
    result = admin.subprocess("user", "add", "Doe.com", "--note", "office")
    assert result.status == 0, result
    assert result.out.startswith("added user doe.com to account default (domain-level")
    password = result.password
    assert (result.out + result.err).count(password) == 1
    assert "shown only this once" in result.err
    stored = admin.stored_hash("doe.com")
    assert stored.startswith("$argon2id$") and verify_password(stored, password)
    assert password not in admin.users_file.read_text()
    assert stat.S_IMODE(os.stat(admin.users_file).st_mode) == 0o600
    # Neither show nor list ever prints the hash.
    for argv in (["user", "show", "doe.com"], ["user", "show", "doe.com", "--json"]):
        shown = admin.subprocess(*argv)
        assert shown.status == 0 and "$argon2" not in shown.out and "password_hash" not in shown.out
    listed = admin.subprocess("user", "list", "--json")
    assert listed.status == 0 and "$argon2" not in listed.out


@pytest.mark.parametrize(
    ("argv", "status", "message"),
    [
        (["user", "add", "x@c.org"], 1, "x@c.org is outside the domains of account 'default'"),
        (["user", "add", "app2", "--domains", "a.com,b.org"], 1, "semicolons, not commas"),
        (["user", "add", "app2", "--domains", "b..org"], 1, "'b..org' is not a valid domain"),
        (["user", "add", "app2", "--addresses", "nobody"], 1, "'nobody' is not a valid email"),
        (["user", "add", "doe.com"], 1, "user 'doe.com' already exists"),
        (["user", "set", "nobody", "--note", "x"], 1, "unknown user 'nobody'"),
        (["user", "set", "app", "--priority", "9"], 1, "priority 9 is outside 1..5"),
        (["user", "set", "app", "--priority", "high"], 2, "invalid int value: 'high'"),
        (["user", "set", "app", "--status", "paused"], 2, "invalid choice: 'paused'"),
        (["account", "del", "default"], 1, "still has 3 user(s)"),
        (["account", "set", "default", "--remove-domain", "b.org"], 1, "users app (b.org)"),
    ],
)
def test_bad_input_is_one_line_and_changes_nothing(populated, argv, status, message):
    before = populated.users_file.read_bytes()
    result = populated.subprocess(*argv)
    assert result.status == status, result
    assert message in result.err
    assert result.out == ""
    if status == 1:
        assert result.err.count("\n") == 1 and result.err.startswith("mailrelay-admin: ")
    assert "Traceback" not in result.err
    assert populated.users_file.read_bytes() == before


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_old_file(populated):
    before = populated.users_file.read_bytes()

    def small_disk() -> None:  # writes past 8 KiB fail with EFBIG, like ENOSPC
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    result = populated.subprocess(
        "user", "set", "app", "--note", "x" * 20000, preexec_fn=small_disk
    )
    assert result.status == 1, result
    assert result.err == f"mailrelay-admin: {populated.users_file}: File too large\n"
    assert populated.users_file.read_bytes() == before
    assert sorted(os.listdir(populated.data_dir)) == ["users.json", "users.json.lock"]


def test_a_bad_config_is_exit_status_2(admin):
    admin.config.write_text("[directory]\nbackend = sql\n")
    result = admin.subprocess("user", "list")
    assert result.status == 2
    assert result.err == f"mailrelay-admin: {admin.config}: [directory] backend: " + (
        "'sql' is not one of file, ldap\n"
    )


# ---- users ----


def test_list_and_show(populated):
    users = json.loads(populated.ok("user", "list", "--json").out)
    assert [u["username"] for u in users] == ["app", "doe.com", "john@doe.com"]
    app = users[0]
    assert app["kind"] == "named"
    assert app["domains"] == "b.org" and app["addresses"] == "x@doe.com"
    assert app["sender_scope"] == "b.org;x@doe.com"
    assert app["priority"] == 3 and app["status"] == "allowed" and app["rate_limit"] is None
    assert "password_hash" not in app
    assert users[1]["kind"] == "domain" and users[1]["note"] == "office clients"
    assert users[2]["kind"] == "address" and users[2]["sender_scope"] == "john@doe.com"

    table = populated.ok("user", "list").out.splitlines()
    assert table[0].split() == [
        "USERNAME", "KIND", "ACCOUNT", "STATUS", "SENDERS", "LAST", "LOGIN", "NOTE"
    ]
    assert table[2].split() == [
        "doe.com",
        "domain",
        "default",
        "allowed",
        "doe.com",
        "never",
        "office",
        "clients",
    ]

    shown = populated.ok("user", "show", "JOHN@doe.com").out
    assert "username:             john@doe.com\n" in shown
    assert "kind:                 user-level: may send only from its address\n" in shown
    assert "password:             set (argon2id)\n" in shown
    assert json.loads(populated.ok("user", "show", "app", "--json").out) == app


def test_list_by_account(populated):
    populated.ok("account", "add", "sales", "--domains", "sales.com")
    populated.ok("user", "add", "sales.com", "--account", "sales")
    users = json.loads(populated.ok("user", "list", "--account", "sales", "--json").out)
    assert [u["username"] for u in users] == ["sales.com"]
    result = populated("user", "list", "--account", "nope")
    assert result.status == 1 and "unknown account 'nope'" in result.err


def test_list_with_no_users(admin):
    assert admin.ok("user", "list", "--json").out == "[]\n"
    assert admin.ok("user", "list").err == "no users\n"
    assert not admin.users_file.exists()  # reading never creates the file


def test_add_with_every_option(populated):
    populated.ok(
        "user", "add", "app2",
        "--domains", "B.org", "--addresses", "x@doe.com;y@b.org", "--note", "newsletter",
        "--status", "sandboxed", "--rate-limit", "500", "--priority", "1",
        "--max-connections", "5", "--quota-day", "100", "--quota-month", "0",
        "--quota-action", "hold", "--archive", "--audit-bcc", "audit@doe.com",
        "--bounce-notify", "bounces@doe.com", "--unsubscribe-footer", "--open-tracking",
        "--click-tracking", "--expires", "2027-01-31T18:00+01:00",
        "--allow-from", "2001:db8::/32;203.0.113.0/24",
    )  # fmt: skip
    user = json.loads(populated.ok("user", "show", "app2", "--json").out)
    assert user | {"updated": 0} == {
        "username": "app2",
        "kind": "named",
        "account": "default",
        "domains": "b.org",
        "addresses": "x@doe.com;y@b.org",
        "sender_scope": "b.org;x@doe.com;y@b.org",
        "note": "newsletter",
        "status": "sandboxed",
        "rate_limit": 500,
        "priority": 1,
        "max_connections": 5,
        "quota_day": 100,
        "quota_month": 0,
        "quota_action": "hold",
        "archive": True,
        "audit_bcc": "audit@doe.com",
        "bounce_notify": "bounces@doe.com",
        "unsubscribe_footer": True,
        "open_tracking": True,
        "click_tracking": True,
        "updated": 0,
        "expires": "2027-01-31T17:00:00Z",
        "allow_from": "2001:db8::/32;203.0.113.0/24",
        "last_login": None,
        "last_login_ip": None,
    }


def test_set_changes_only_what_is_given(populated):
    populated.ok("user", "set", "app", "--rate-limit", "100", "--archive", "--status", "blocked")
    before = json.loads(populated.ok("user", "show", "app", "--json").out)
    assert (before["rate_limit"], before["archive"], before["status"]) == (100, True, "blocked")
    populated.ok("user", "set", "app", "--rate-limit", "default", "--no-archive", "--note", "n")
    after = json.loads(populated.ok("user", "show", "app", "--json").out)
    assert (after["rate_limit"], after["archive"], after["note"]) == (None, False, "n")
    assert after["status"] == "blocked" and after["domains"] == "b.org"
    assert after["updated"] >= before["updated"]
    # Replacing one half of the scope keeps the other.
    populated.ok("user", "set", "app", "--addresses", "")
    after = json.loads(populated.ok("user", "show", "app", "--json").out)
    assert (after["domains"], after["addresses"]) == ("b.org", "")
    result = populated("user", "set", "app")
    assert result.status == 1 and "nothing to change" in result.err


def test_scope_options_are_only_for_named_users(populated):
    result = populated("user", "add", "b.org", "--domains", "b.org")
    assert result.status == 1
    assert "a domain-level user's sender scope is its username" in result.err
    result = populated("user", "add", "app2")
    assert result.status == 1 and "a named user needs authorized domains" in result.err


def test_passwd_prints_a_new_password_once(populated):
    old = populated.stored_hash("app")
    result = populated.ok("user", "passwd", "app")
    assert result.out.startswith("changed the password of user app\n")
    new = populated.stored_hash("app")
    assert new != old and verify_password(new, result.password)
    result = populated("user", "passwd", "nobody")
    assert result.status == 1 and "unknown user 'nobody'" in result.err


def test_password_from_stdin_is_not_printed(populated):
    result = populated.ok("user", "passwd", "app", "--password-stdin", stdin="my own secret\n")
    assert "my own secret" not in result.out + result.err
    assert verify_password(populated.stored_hash("app"), "my own secret")
    populated.ok("user", "add", "b.org", "--password-stdin", stdin="another secret\n")
    assert verify_password(populated.stored_hash("b.org"), "another secret")
    before = populated.users_file.read_bytes()
    for stdin, message in [("", "no password on standard input"), ("short\n", "shorter than 8")]:
        result = populated("user", "passwd", "app", "--password-stdin", stdin=stdin)
        assert result.status == 1 and message in result.err
    assert populated.users_file.read_bytes() == before


def test_del(populated):
    assert populated.ok("user", "del", "JOHN@DOE.COM").out == (
        "deleted user john@doe.com\n"
        "its suppressions and statistics: 0 suppressed address(es) removed, no statistics\n")
    assert "john@doe.com" not in populated.file()["users"]
    result = populated("user", "del", "john@doe.com")
    assert result.status == 1 and "unknown user" in result.err


# ---- accounts ----


def test_account_bounce_domain_is_set_checked_and_removed(populated):
    populated.ok("account", "set", "default", "--bounce-domain", "Bounces.DOE.com")
    shown = json.loads(populated.ok("account", "show", "default", "--json").out)
    assert shown["bounce_domain"] == "bounces.doe.com"
    assert "bounces:  bounces.doe.com\n" in populated.ok("account", "show", "default").out
    # Not under one of the account's domains (no DMARC alignment, not the account's own).
    result = populated("account", "set", "default", "--bounce-domain", "bounces.other.net")
    assert result.status == 1 and "not a subdomain of an authorized domain" in result.err
    result = populated("account", "set", "default", "--bounce-domain", "doe.com")
    assert result.status == 1 and "not a subdomain" in result.err
    # One account per bounce domain.
    populated.ok("account", "add", "sales", "--domains", "doe.com")
    result = populated("account", "set", "sales", "--bounce-domain", "bounces.doe.com")
    assert result.status == 1 and "already the bounce domain of account 'default'" in result.err
    # The domain it lives under cannot be withdrawn while it is there.
    result = populated("account", "set", "default", "--domains", "b.org")
    assert result.status == 1 and "bounce domain" in result.err
    populated.ok("account", "set", "default", "--no-bounce-domain")
    shown = json.loads(populated.ok("account", "show", "default", "--json").out)
    assert shown["bounce_domain"] is None


def test_account_lifecycle(populated):
    populated.ok("account", "add", "sales", "--domains", "sales.com", "--notify", "ops@sales.com")
    result = populated("account", "add", "sales")
    assert result.status == 1 and "account 'sales' already exists" in result.err
    populated.ok("account", "set", "sales", "--add-domain", "sales.org", "--note", "team",
                 "--quota-day", "1000")
    populated.ok("user", "add", "sales.org", "--account", "sales")
    accounts = json.loads(populated.ok("account", "list", "--json").out)
    assert accounts == [
        {
            "name": "default",
            "domains": "b.org;doe.com",
            "notify": None,
            "note": "",
            "bounce_domain": None,
            "quota_day": None,
            "quota_month": None,
            "users": ["app", "doe.com", "john@doe.com"],
        },
        {
            "name": "sales",
            "domains": "sales.com;sales.org",
            "notify": "ops@sales.com",
            "note": "team",
            "bounce_domain": None,
            "quota_day": 1000,
            "quota_month": None,
            "users": ["sales.org"],
        },
    ]
    table = populated.ok("account", "list").out.splitlines()
    assert table[0].split() == ["NAME", "USERS", "DOMAINS", "NOTIFY", "NOTE"]
    assert table[2].split() == ["sales", "1", "sales.com;sales.org", "ops@sales.com", "team"]
    shown = populated.ok("account", "show", "sales").out
    assert "domains:  sales.com;sales.org\n" in shown and "  sales.org\n" in shown
    assert "quota:    1000 per day, none per month\n" in shown
    assert json.loads(populated.ok("account", "show", "sales", "--json").out) == accounts[1]

    result = populated("account", "set", "sales", "--domains", "sales.com")
    assert result.status == 1 and "still used by users sales.org (sales.org)" in result.err
    populated.ok("account", "set", "sales", "--remove-domain", "sales.com", "--notify", "")
    assert json.loads(populated.ok("account", "show", "sales", "--json").out)["notify"] is None
    result = populated("account", "set", "sales", "--remove-domain", "other.com")
    assert result.status == 1 and "has no domain other.com" in result.err
    result = populated("account", "del", "sales")
    assert result.status == 1 and "still has 1 user(s): sales.org" in result.err
    populated.ok("user", "del", "sales.org")
    assert populated.ok("account", "del", "sales").out == (
        "deleted account sales\nits suppressions and statistics: 0 suppressed address(es) "
        "removed, no statistics\n")
    result = populated("account", "show", "sales")
    assert result.status == 1 and "unknown account 'sales'" in result.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["account", "add", "a/b"], "account name 'a/b' is not valid"),
        (["account", "add", "x", "--notify", "ops"], "notify 'ops' is not a valid email"),
        (["account", "add", "x", "--domains", "a.com b.com"], "separate entries with semicolons"),
        (["account", "set", "default", "--domains", "a.com", "--add-domain", "b.com"], "replaces"),
        (["account", "set", "default"], "nothing to change"),
        (["account", "set", "nope", "--note", "x"], "unknown account 'nope'"),
        (["account", "del", "default"], "'default' always exists"),
    ],
)
def test_account_refusals(admin, argv, message):
    admin.ok("account", "set", "default", "--note", "the first")
    before = admin.users_file.read_bytes()
    result = admin(*argv)
    assert result.status == 1, result
    assert message in result.err and result.err.count("\n") == 1
    assert admin.users_file.read_bytes() == before


def test_moving_a_user_between_accounts(populated):
    populated.ok("account", "add", "sales", "--domains", "b.org")
    result = populated("user", "set", "doe.com", "--account", "sales")
    assert result.status == 1 and "doe.com is outside the domains of account 'sales'" in result.err
    populated.ok("user", "set", "app", "--account", "sales", "--addresses", "")
    assert populated.file()["users"]["app"]["account"] == "sales"


# ---- an LDAP directory is read-only here ----


@pytest.mark.parametrize(
    "argv",
    [
        ["user", "add", "doe.com"],
        ["user", "passwd", "doe.com"],
        ["user", "set", "doe.com", "--note", "x"],
        ["user", "del", "doe.com"],
        ["account", "add", "sales"],
        ["account", "set", "default", "--note", "x"],
        ["account", "del", "sales"],
    ],
)
def test_changes_are_refused_when_users_live_in_ldap(admin, argv):
    admin.config.write_text("[directory]\nbackend = ldap\n[ldap]\nbase_dn = dc=doe,dc=com\n")
    result = admin(*argv)
    assert result.status == 1
    assert result.err == (
        "mailrelay-admin: users and accounts are managed in the LDAP directory; change them there\n"
    )


def test_list_and_show_read_a_real_ldap_directory(admin, tmp_path):
    from ldap_server import start_slapd

    (tmp_path / "slapd").mkdir()
    server = start_slapd(tmp_path / "slapd")
    try:
        s = server.settings()
        admin.config.write_text(
            "[directory]\nbackend = ldap\n"
            f"[ldap]\nuris = {s['uris'][0]}\nbase_dn = {s['base_dn']}\n"
            f"bind_dn = {s['bind_dn']}\nbind_password = {s['bind_password']}\ntimeout = 5\n"
        )
        result = admin.subprocess("user", "list", "--json")
        assert result.status == 0, result
        users = {u["username"]: u for u in json.loads(result.out)}
        assert {"doe.test", "john@doe.test", "webmail", "newsletter"} <= set(users)
        assert users["webmail"]["kind"] == "named"
        assert users["webmail"]["addresses"] == "billing@doe.test;info@doe.test"
        assert users["webmail"]["rate_limit"] == 500
        result = admin.subprocess("user", "show", "John@Doe.test")
        assert result.status == 0, result
        assert "username:             john@doe.test\n" in result.out
        assert "password" not in result.out
        result = admin.subprocess("user", "show", "nobody")
        assert (result.status, result.err) == (
            1,
            "mailrelay-admin: unknown user 'nobody' (see mailrelay-admin user list)\n",
        )
        result = admin.subprocess("account", "show", "default", "--json")
        assert result.status == 0, result
        assert json.loads(result.out)["domains"] == "doe.test;lists.doe.test"
        result = admin.subprocess("user", "passwd", "webmail")
        assert result.status == 1 and "managed in the LDAP directory" in result.err

        server.stop()
        result = admin.subprocess("user", "list")
        assert result.status == 1, result
        assert result.err.startswith("mailrelay-admin: the directory cannot answer now: ")
        assert result.err.count("\n") == 1
    finally:
        server.close()
