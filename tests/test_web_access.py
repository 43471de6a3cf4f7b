"""mailrelay-admin apikey and admin: keys printed once and stored hashed, admin logins with
argon2id hashes, clear refusals; and the daemon's view of the file."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

from harness import env
from twisted.internet.task import Clock

from mailrelay.auth.passwords import verify_password
from mailrelay.manage.access import Access, AccessFile, AccessStore, key_hash


def admin(config, *args, input=None):
    return subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c", str(config),
                           *args], input=input, capture_output=True, text=True, env=env(),
                          timeout=60)  # fmt: skip


def make_config(tmp_path):
    path = tmp_path / "mailrelay.ini"
    path.write_text(f"[server]\nhostname = relay.test\ndata_dir = {tmp_path}/data\n")
    return path


def test_api_keys(tmp_path):
    config = make_config(tmp_path)
    result = admin(config, "apikey", "add", "deploy", "--read-write")
    assert result.returncode == 0, result.stderr
    key = result.stdout.splitlines()[1]
    assert key.startswith("mrk_") and len(key) > 40
    assert "shown only this once" in result.stderr
    path = tmp_path / "data" / "admin.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    text = path.read_text()
    assert key not in text and key_hash(key) in text

    assert admin(config, "apikey", "add", "ro", "--read-only").returncode == 0
    result = admin(config, "apikey", "add", "deploy", "--read-only")
    assert (result.returncode, result.stderr.strip()) == (
        1, "mailrelay-admin: API key 'deploy' already exists")
    assert admin(config, "apikey", "add", "x").returncode == 2  # --read-only|--read-write
    assert admin(config, "apikey", "add", "bad name", "--read-only").returncode == 1
    listed = json.loads(admin(config, "apikey", "list", "--json").stdout)
    assert [(k["name"], k["access"]) for k in listed] == [("deploy", "read-write"),
                                                          ("ro", "read-only")]
    table = admin(config, "apikey", "list").stdout
    assert "deploy" in table and key not in table

    store = AccessStore(str(path))
    store.load()
    assert store.data.key_for(key).access is Access.READ_WRITE
    assert store.data.key_for(key + "x") is None
    assert admin(config, "apikey", "del", "deploy").returncode == 0
    assert admin(config, "apikey", "del", "deploy").returncode == 1
    store.load()
    assert store.data.key_for(key) is None


def test_admin_logins(tmp_path):
    config = make_config(tmp_path)
    result = admin(config, "admin", "add", "alice")
    assert result.returncode == 0, result.stderr
    password = result.stdout.splitlines()[-1].rpartition(": ")[2]
    store = AccessStore(str(tmp_path / "data" / "admin.json"))
    store.load()
    assert verify_password(store.data.admins["alice"].password_hash, password)
    assert password not in (tmp_path / "data" / "admin.json").read_text()
    assert admin(config, "admin", "add", "alice").returncode == 1
    assert admin(config, "admin", "passwd", "bob", "--password-stdin",
                 input="long enough\n").returncode == 1  # fmt: skip
    assert admin(config, "admin", "passwd", "alice", "--password-stdin",
                 input="short\n").returncode == 1  # fmt: skip
    assert admin(config, "admin", "passwd", "alice", "--password-stdin",
                 input="long enough\n").returncode == 0  # fmt: skip
    store.load()
    assert verify_password(store.data.admins["alice"].password_hash, "long enough")
    assert "alice" in admin(config, "admin", "list").stdout
    assert admin(config, "admin", "del", "alice").returncode == 0
    assert "no admins" in admin(config, "admin", "list").stderr


def test_daemon_view_reloads_and_survives_a_broken_file(tmp_path):
    path = str(tmp_path / "admin.json")
    clock = Clock()
    view = AccessFile(path, clock)
    assert view.current().api_keys == {}
    store = AccessStore(path)
    with store.change():
        key = store.add_key("k", Access.READ_ONLY)
    assert view.current().key_for(key) is None  # checked at most once a second
    clock.advance(1)
    assert view.current().key_for(key).name == "k"
    with open(path, "w") as f:
        f.write("{broken")
    clock.advance(1)
    assert view.current().key_for(key).name == "k"  # the last good version stays


def test_account_limited_admins_and_keys(tmp_path):
    config = make_config(tmp_path)
    assert admin(config, "account", "add", "acme", "--domains", "acme.test").returncode == 0
    result = admin(config, "apikey", "add", "acme-deploy", "--read-write", "--account", "acme")
    assert result.returncode == 0, result.stderr
    assert "limited to account acme" in result.stdout.splitlines()[0]
    key = result.stdout.splitlines()[1]
    result = admin(config, "admin", "add", "acme-ops", "--account", "acme")
    assert result.returncode == 0, result.stderr
    assert "limited to account acme" in result.stdout
    assert admin(config, "admin", "add", "root").returncode == 0

    # An account that does not exist, or is not a name, makes nothing.
    result = admin(config, "apikey", "add", "typo", "--read-only", "--account", "acmee")
    assert (result.returncode, result.stderr.strip()) == (
        1, "mailrelay-admin: unknown account 'acmee' (see mailrelay-admin account list)")
    assert admin(config, "admin", "add", "x", "--account", "bad name").returncode == 1
    assert "--account" in admin(config, "apikey", "add", "--help").stdout
    assert "--account" in admin(config, "admin", "add", "--help").stdout

    listed = json.loads(admin(config, "apikey", "list", "--json").stdout)
    assert [(k["name"], k["account"]) for k in listed] == [("acme-deploy", "acme")]
    assert "acme" in admin(config, "apikey", "list").stdout
    table = admin(config, "admin", "list").stdout.splitlines()
    assert any(line.split() == ["acme-ops", "acme"] for line in table)
    assert any(line.split() == ["root", "(all)"] for line in table)

    store = AccessStore(str(tmp_path / "data" / "admin.json"))
    store.load()
    assert store.data.key_for(key).account == "acme"
    assert store.data.admins["acme-ops"].account == "acme"
    assert store.data.admins["root"].account is None
    # A new password keeps the account; the session fingerprint changes with either.
    before = store.data.admins["acme-ops"].fingerprint
    assert admin(config, "admin", "passwd", "acme-ops", "--password-stdin",
                 input="long enough\n").returncode == 0  # fmt: skip
    store.load()
    assert store.data.admins["acme-ops"].account == "acme"
    assert store.data.admins["acme-ops"].fingerprint != before
    assert "typo" not in store.data.api_keys and "x" not in store.data.admins
