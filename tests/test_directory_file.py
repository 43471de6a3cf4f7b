"""The file directory: the user file's format and rules, atomic saves, and reloads."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from mailrelay.auth.passwords import hash_password
from mailrelay.config import ConfigError, load_config
from mailrelay.directory import open_directory
from mailrelay.directory.filedir import (
    DirectoryFileError,
    FileDirectory,
    UserStore,
    read_file,
)
from mailrelay.model import Account, SmtpUser, Status
from mailrelay.scope import Scope, ScopeError

# Hashing is the slow part of building fixtures: one hash serves every user here.
HASH = hash_password("correct horse")


def temp_users_file(case) -> str:
    """A users.json path in a directory removed after the test (trial's mktemp is relative
    to the working directory, which under pytest is the repository)."""
    directory = tempfile.mkdtemp(prefix="mailrelay-test-")
    case.addCleanup(shutil.rmtree, directory, True)
    return os.path.join(directory, "users.json")


def make_store(path, domains: str = "doe.com;b.org") -> UserStore:
    store = UserStore(str(path))
    with store.change():
        store.update_account("default", domains=frozenset(domains.split(";")))
        store.add_user(SmtpUser("doe.com", note="office"), HASH)
        store.add_user(SmtpUser("john@doe.com"), HASH)
        store.add_user(SmtpUser("app", scope=Scope.parse("b.org", "x@doe.com")), HASH)
    return store


# ---- UserStore and the file format ----


def test_save_writes_readable_sorted_json_with_mode_0600(tmp_path):
    path = tmp_path / "data" / "users.json"  # the data directory does not exist yet
    make_store(path)
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    doc = json.loads(text)
    assert text == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert doc["version"] == 1
    assert doc["accounts"] == {"default": {"domains": "b.org;doe.com", "notify": None, "note": "",
                                           "bounce_domain": None, "quota_day": None,
                                           "quota_month": None}}
    assert sorted(doc["users"]) == ["app", "doe.com", "john@doe.com"]
    app = doc["users"]["app"]
    assert app["domains"] == "b.org" and app["addresses"] == "x@doe.com"
    assert app["password_hash"] == HASH
    assert app["priority"] == 3 and app["status"] == "allowed" and app["rate_limit"] is None
    assert app["updated"] > 0
    # Nothing but the file and its lock is left in the directory.
    assert sorted(os.listdir(path.parent)) == ["users.json", "users.json.lock"]


def test_round_trip(tmp_path):
    store = make_store(tmp_path / "users.json")
    again = UserStore(store.path)
    again.load()
    assert again.data == store.data


def test_missing_file_is_an_empty_directory_with_the_default_account(tmp_path):
    data, stat_key = read_file(str(tmp_path / "nope.json"))
    assert stat_key is None
    assert data.users == {} and list(data.accounts) == ["default"]


def test_usernames_are_canonical(tmp_path):
    store = make_store(tmp_path / "users.json")
    assert store.user("DOE.com").username == "doe.com"
    assert store.user("John@DOE.COM").username == "john@doe.com"
    with pytest.raises(DirectoryFileError, match="unknown user 'APP'"):
        store.user("APP")  # named usernames are case-sensitive
    with pytest.raises(DirectoryFileError, match="user 'app' already exists"):
        store.add_user(SmtpUser("App", scope=Scope.parse("b.org")), HASH)
    with pytest.raises(DirectoryFileError, match="user 'doe.com' already exists"):
        store.add_user(SmtpUser("Doe.Com"), HASH)


@pytest.mark.parametrize(
    ("user", "message"),
    [
        (SmtpUser("c.org"), r"c.org is outside the domains of account 'default'; authorize it"),
        (
            SmtpUser("app2", scope=Scope.parse("c.org;e.org", "y@f.org")),
            "c.org, e.org, y@f.org are outside the domains of account 'default'; authorize "
            "them first: mailrelay-admin account set default --add-domain 'c.org;e.org;f.org'",
        ),
        (SmtpUser("x@c.org"), "x@c.org is outside"),
        (SmtpUser("app2"), "a named user needs authorized domains and/or addresses"),
        (SmtpUser("b.org", scope=Scope.parse("doe.com")), "a domain-level user's sender scope"),
        (SmtpUser("x@b.org", scope=Scope.parse("doe.com")), "a user-level user's sender scope"),
        (SmtpUser("b.org", account="nope"), "unknown account 'nope'"),
        (SmtpUser("b.org", priority=0), "priority 0 is outside 1..5"),
        (SmtpUser("b.org", priority=6), "priority 6 is outside 1..5"),
        (SmtpUser("b.org", rate_limit=-1), "rate limit -1 is below 0"),
        (SmtpUser("b.org", max_connections=0), "max connections 0 is below 1"),
        (SmtpUser("b.org", bounce_notify="nobody"), "bounce notify 'nobody' is not off, sender"),
        (SmtpUser("has space", scope=Scope.parse("b.org")), "not a valid named username"),
        (SmtpUser("x@nodomain", scope=Scope.parse("b.org")), "not a valid named username"),
        (SmtpUser("ip:app", scope=Scope.parse("b.org")), "not a valid named username"),
    ],
)
def test_add_user_refusals_name_the_problem_and_change_nothing(tmp_path, user, message):
    store = make_store(tmp_path / "users.json")
    before = store.data.users.copy()
    with pytest.raises(DirectoryFileError, match=message.replace("(", r"\(")):
        store.add_user(user, HASH)
    assert store.data.users == before


def test_update_user_checks_the_new_state(tmp_path):
    store = make_store(tmp_path / "users.json")
    old = store.user("app")
    with pytest.raises(DirectoryFileError, match="c.org is outside"):
        store.update_user("app", scope=Scope.parse("c.org"))
    with pytest.raises(DirectoryFileError, match="unknown account 'sales'"):
        store.update_user("app", account="sales")
    assert store.user("app") == old
    new = store.update_user("app", status=Status.SANDBOXED, priority=1)
    assert new.status is Status.SANDBOXED and new.updated >= old.updated


def test_set_password_moves_the_updated_stamp(tmp_path):
    store = make_store(tmp_path / "users.json")
    before = store.user("app").updated
    new_hash = hash_password("another one")
    store.set_password("app", new_hash)
    assert store.password_hash("app") == new_hash
    assert store.user("app").updated > before


def test_accounts(tmp_path):
    store = make_store(tmp_path / "users.json")
    store.add_account(Account("sales", frozenset({"sales.com"}), "ops@sales.com", "team"))
    store.add_user(SmtpUser("sales.com", account="sales"), HASH)
    with pytest.raises(DirectoryFileError, match="account 'sales' already exists"):
        store.add_account(Account("sales"))
    with pytest.raises(DirectoryFileError, match="account name '../x' is not valid"):
        store.add_account(Account("../x"))
    with pytest.raises(DirectoryFileError, match="notify 'ops' is not a valid email address"):
        store.add_account(Account("ops", notify="ops"))
    with pytest.raises(DirectoryFileError, match=r"still has 1 user\(s\): sales.com"):
        store.delete_account("sales")
    with pytest.raises(DirectoryFileError, match=r"still has 3 user\(s\)"):
        store.delete_account("default")
    # Accounts are separate: a user of one cannot use the other's domains.
    with pytest.raises(DirectoryFileError, match="outside the domains of account 'sales'"):
        store.add_user(SmtpUser("x@doe.com", account="sales"), HASH)
    store.delete_user("sales.com")
    store.delete_account("sales")
    assert [a.name for a in store.accounts()] == ["default"]


def test_default_account_always_exists(tmp_path):
    store = UserStore(str(tmp_path / "users.json"))
    with pytest.raises(DirectoryFileError, match="'default' always exists"):
        store.delete_account("default")


def test_removing_a_domain_in_use_names_the_users(tmp_path):
    store = make_store(tmp_path / "users.json")
    with pytest.raises(DirectoryFileError) as e:
        store.update_account("default", domains=frozenset({"b.org"}))
    assert "still used by users app (x@doe.com); doe.com (doe.com); john@doe.com" in str(e.value)
    store.update_account("default", domains=frozenset({"b.org", "doe.com", "new.org"}))
    assert store.account("default").domains == {"b.org", "doe.com", "new.org"}


def test_a_refused_change_writes_nothing(tmp_path):
    path = tmp_path / "users.json"
    store = make_store(path)
    before = path.read_bytes()
    with pytest.raises(DirectoryFileError), store.change():
        store.delete_user("app")
        store.add_user(SmtpUser("c.org"), HASH)  # refused: the deletion is not saved either
    assert path.read_bytes() == before


def test_change_sees_changes_made_since_load(tmp_path):
    path = tmp_path / "users.json"
    first = make_store(path)
    second = UserStore(str(path))
    with second.change():
        second.delete_user("app")
    with first.change():  # reloads under the lock: the deletion is not undone
        first.update_user("doe.com", note="changed")
    again = UserStore(str(path))
    again.load()
    assert sorted(again.data.users) == ["doe.com", "john@doe.com"]
    assert again.user("doe.com").note == "changed"


def test_a_failing_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    """The disk fills up mid-save (RLIMIT_FSIZE makes writes fail with EFBIG)."""
    path = tmp_path / "users.json"
    make_store(path)
    before = path.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, signal
        from mailrelay.directory.filedir import UserStore
        from mailrelay.model import SmtpUser
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        store = UserStore({str(path)!r})
        store.load()
        store.update_user("doe.com", note="x" * 100000)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            store.save()
        except OSError as e:
            print("refused", e.strerror)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.startswith("refused File too large"), out
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["users.json", "users.json.lock"]


# ---- hand-edited files ----


def write_doc(path, doc) -> None:
    path.write_text(json.dumps(doc))


def good_doc() -> dict:
    return {
        "accounts": {"default": {"domains": "doe.com"}},
        "users": {"doe.com": {"password_hash": HASH}},
    }


def test_a_minimal_hand_written_file_takes_the_defaults(tmp_path):
    path = tmp_path / "users.json"
    write_doc(path, good_doc())
    data, _ = read_file(str(path))
    assert data.users["doe.com"] == SmtpUser("doe.com")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["users"]["doe.com"].update(priority=9), "user 'doe.com': priority 9 is outs"),
        (lambda d: d["users"]["doe.com"].update(priority="1"), 'priority must be int, not "1"'),
        (lambda d: d["users"]["doe.com"].update(priority=True), "priority must be int, not true"),
        (lambda d: d["users"]["doe.com"].update(archive=1), "archive must be bool, not 1"),
        (lambda d: d["users"]["doe.com"].update(status="on"), "status 'on' is not one of"),
        (lambda d: d["users"]["doe.com"].update(colour="red"), "unknown field(s) colour"),
        (lambda d: d["users"]["doe.com"].update(password_hash="x"), "not an argon2 hash"),
        (lambda d: d["users"]["doe.com"].pop("password_hash"), "password_hash is missing"),
        (lambda d: d["users"].update({"Doe.COM": d["users"].pop("doe.com")}), "as 'doe.com'"),
        (lambda d: d["users"]["doe.com"].update(domains="a.com"), "sender scope is its username"),
        (lambda d: d["accounts"]["default"].update(domains="a.com,b.com"), "not commas"),
        (lambda d: d["accounts"]["default"].update(domains="b.org"), "doe.com is outside"),
        (lambda d: d.update(version=2), "version 2 is not 1"),
        (lambda d: d.update(extra=1), "unknown top-level field(s) extra"),
        (lambda d: d.update(users=[]), "users must be an object"),
    ],
)
def test_a_broken_file_names_the_entry_and_the_problem(tmp_path, change, message):
    path = tmp_path / "users.json"
    doc = good_doc()
    change(doc)
    write_doc(path, doc)
    with pytest.raises(DirectoryFileError) as e:
        read_file(str(path))
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)


def test_not_json(tmp_path):
    path = tmp_path / "users.json"
    path.write_text("{")
    with pytest.raises(DirectoryFileError, match="not valid JSON"):
        read_file(str(path))


def test_scope_errors_in_the_file_are_directory_errors(tmp_path):
    path = tmp_path / "users.json"
    doc = good_doc()
    doc["users"]["app"] = {"password_hash": HASH, "addresses": "not-an-address"}
    write_doc(path, doc)
    with pytest.raises(DirectoryFileError, match="user 'app': 'not-an-address' is not a valid"):
        read_file(str(path))
    assert issubclass(ScopeError, ValueError) and issubclass(DirectoryFileError, ValueError)


# ---- FileDirectory: what the daemon sees ----


class FileDirectoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = temp_users_file(self)
        self.store = make_store(self.path)
        self.clock = Clock()
        self.directory = FileDirectory(self.path, clock=self.clock)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def user(self, name: str):
        return self.successResultOf(self.directory.getUser(name))

    def test_lookups(self) -> None:
        assert self.user("DOE.COM") == self.store.user("doe.com")
        assert self.user("APP") is None
        assert self.user("nobody") is None
        users = self.successResultOf(self.directory.listUsers())
        assert [u.username for u in users] == ["app", "doe.com", "john@doe.com"]
        assert self.successResultOf(self.directory.listUsers("sales")) == []
        account = self.successResultOf(self.directory.getAccount("default"))
        assert account.domains == {"doe.com", "b.org"}
        assert self.successResultOf(self.directory.getAccount("nope")) is None
        accounts = self.successResultOf(self.directory.listAccounts())
        assert [a.name for a in accounts] == ["default"]
        assert self.directory.writable

    def test_changes_are_picked_up_after_the_check_interval(self) -> None:
        with self.store.change():
            self.store.add_user(SmtpUser("b.org"), HASH)
        # Within the interval the file is not even looked at.
        self.clock.advance(0.5)
        assert self.user("b.org") is None
        self.clock.advance(0.5)
        assert self.user("b.org") == self.store.user("b.org")
        with self.store.change():
            self.store.delete_user("b.org")
        self.clock.advance(1)
        assert self.user("b.org") is None

    def test_a_broken_file_keeps_the_last_good_data_and_logs_once(self) -> None:
        with open(self.path, "w") as f:
            f.write('{"users": ')
        self.clock.advance(1)
        assert self.user("doe.com") is not None
        errors = [e for e in self.events if e.get("log_level").name == "error"]
        assert len(errors) == 1
        assert "not valid JSON" in str(errors[0]["error"])
        self.clock.advance(1)
        self.user("doe.com")
        assert len([e for e in self.events if e.get("log_level").name == "error"]) == 1
        # Repaired (mailrelay-admin refuses to change a broken file: write it directly).
        self.store.delete_user("doe.com")
        self.store.save()
        self.clock.advance(1)
        assert self.user("doe.com") is None

    def test_a_deleted_file_is_an_empty_directory(self) -> None:
        os.unlink(self.path)
        self.clock.advance(1)
        assert self.user("doe.com") is None
        accounts = self.successResultOf(self.directory.listAccounts())
        assert [a.name for a in accounts] == ["default"]

    def test_a_missing_file_at_start_is_an_empty_directory(self) -> None:
        directory = FileDirectory(self.path + ".new", clock=self.clock)
        assert self.successResultOf(directory.listUsers()) == []
        assert any("No user file" in e["log_format"] for e in self.events)

    def test_a_broken_file_at_start_is_an_error(self) -> None:
        with open(self.path, "w") as f:
            f.write("[]")
        with self.assertRaises(DirectoryFileError):
            FileDirectory(self.path, clock=self.clock)


# ---- open_directory ----


def test_open_directory_file_backend(tmp_path):
    ini = tmp_path / "mailrelay.ini"
    ini.write_text(f"[server]\ndata_dir = {tmp_path}\nhostname = relay.test\n")
    make_store(tmp_path / "users.json")
    directory = open_directory(load_config(str(ini)), reactor=Clock())
    assert isinstance(directory, FileDirectory)
    assert directory.path == str(tmp_path / "users.json")


def test_open_directory_broken_file_is_a_config_error(tmp_path):
    ini = tmp_path / "mailrelay.ini"
    ini.write_text(f"[directory]\nfile = {tmp_path}/users.json\n")
    (tmp_path / "users.json").write_text("nope")
    with pytest.raises(ConfigError, match=r"\[directory\] file: .*users.json: not valid JSON"):
        open_directory(load_config(str(ini)), reactor=Clock())
