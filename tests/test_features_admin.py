"""mailrelay-admin suppression, stats and archive, run as the real command."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from harness import env

from mailrelay.features.archive import Archive
from mailrelay.features.stats import HOUR, StatsStore
from mailrelay.features.suppressions import SuppressionStore


@pytest.fixture
def admin(tmp_path):
    config = tmp_path / "mailrelay.ini"
    config.write_text(f"[server]\ndata_dir = {tmp_path / 'data'}\n")

    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "mailrelay.admin.cli", "-c", str(config), *args],
            capture_output=True,
            text=True,
            env=env(),
            timeout=60,
        )
        if ok:
            assert done.returncode == 0, done.stderr
        return done

    run("account", "add", "acme", "--domains", "acme.example")
    run("user", "add", "news@acme.example", "--account", "acme")
    run.data = tmp_path / "data"
    return run


def test_suppression_commands(admin):
    admin(
        "suppression",
        "add",
        "Alice@Example.org",
        "--user",
        "NEWS@acme.example",
        "--reason",
        "unsubscribe",
    )
    admin("suppression", "add", "bob@example.org", "c@example.org", "--account", "acme")
    admin("suppression", "add", "carol@example.org", "--global")
    again = admin("suppression", "add", "carol@example.org", "--global")
    assert "carol@example.org: already suppressed" in again.stderr
    table = admin("suppression", "list").stdout.splitlines()
    assert table[0].split() == ["ADDRESS", "ACCOUNT", "USER", "REASON", "SINCE", "(UTC)"]
    assert [line.split()[:4] for line in table[1:]] == [
        ["carol@example.org", "(global)", "(all", "users)"],
        ["bob@example.org", "acme", "(all", "users)"],
        ["c@example.org", "acme", "(all", "users)"],
        ["alice@example.org", "acme", "news@acme.example", "unsubscribe"],
    ]
    mine = json.loads(admin("suppression", "list", "--user", "news@acme.example", "--json").stdout)
    assert [(e["address"], e["account"], e["reason"]) for e in mine] == [
        ("alice@example.org", "acme", "unsubscribe")
    ]
    # What the daemon's store sees is what the command wrote.
    store = SuppressionStore(str(admin.data / "suppressions.sqlite"))
    assert store.suppressed(
        "acme",
        "news@acme.example",
        ["alice@example.org", "bob@example.org", "carol@example.org", "d@example.org"],
    ) == {"alice@example.org", "bob@example.org", "carol@example.org"}
    store.close()
    admin("suppression", "del", "alice@example.org", "--user", "news@acme.example")
    gone = admin("suppression", "del", "alice@example.org", "--user", "news@acme.example", ok=False)
    assert (gone.returncode, gone.stderr.strip()) == (
        1,
        "mailrelay-admin: not on that list: alice@example.org",
    )
    bad = admin("suppression", "add", "not-an-address", "--global", ok=False)
    assert bad.returncode == 1 and "not an email address: not-an-address" in bad.stderr
    unknown = admin("suppression", "add", "x@example.org", "--user", "nobody@x.example", ok=False)
    assert unknown.returncode == 1 and "unknown user 'nobody@x.example'" in unknown.stderr
    neither = admin("suppression", "add", "x@example.org", ok=False)
    assert neither.returncode == 1 and "which list: --user USER, --account" in neither.stderr
    both = admin("suppression", "del", "x@example.org", "--global", "--account", "acme", ok=False)
    assert both.returncode == 1 and "--global goes alone" in both.stderr


def listed(admin, *level: str) -> list[tuple[str, str | None, str | None]]:
    rows = json.loads(admin("suppression", "list", *level, "--json").stdout)
    return [(e["address"], e["account"], e["user"]) for e in rows]


def test_deleting_a_user_removes_its_suppressions_and_keeps_its_statistics(admin):
    user = "news@acme.example"
    admin("suppression", "add", "a@example.org", "b@example.org", "--user", user)
    admin("suppression", "add", "all@example.org", "--account", "acme")
    store = StatsStore(str(admin.data / "stats.sqlite"))
    hour = 1_795_000_000 // HOUR
    store.add({("acme", user, hour, "accepted"): 5, ("acme", user, hour, "delivered"): 4})
    store.close()

    lines = admin("user", "del", user).stdout.splitlines()
    assert lines[0] == f"deleted user {user}"
    label = re.fullmatch(r"its suppressions and statistics: 2 suppressed address\(es\) removed, "
                         r"statistics kept as user '(.+)'", lines[1]).group(1)  # fmt: skip
    assert re.fullmatch(rf"{re.escape(user)} \(deleted \d{{4}}-\d\d-\d\d [\d:]{{8}} UTC\)",
                        label)  # fmt: skip
    assert listed(admin) == [("all@example.org", "acme", None)]
    history = json.loads(admin("stats", "--account", "acme", "--by", "day", "--json").stdout)
    assert history["totals"]["accepted"] == 5
    assert [(p["user"], p["accepted"]) for p in history["periods"]] == [(label, 5)]

    # A new user of that name starts with nothing.
    added = admin("user", "add", user, "--account", "acme").stdout
    assert "left by an earlier user" not in added
    assert listed(admin, "--user", user) == []
    assert json.loads(admin("stats", user, "--json").stdout)["totals"]["accepted"] == 0
    gone = admin("user", "del", user).stdout.splitlines()[1]
    assert gone == ("its suppressions and statistics: 0 suppressed address(es) removed, "
                    "no statistics")  # fmt: skip


def test_a_new_user_of_a_deleted_name_does_not_see_its_archive(admin):
    user = "news@acme.example"
    Archive(str(admin.data / "archive")).store(user, "31a2aaaaaaaaaaaaaa",
                                                 b"Subject: old\r\n\r\nhi\r\n",
                                                 user, ["r@example.org"])  # fmt: skip
    assert len(json.loads(admin("archive", "list", user, "--json").stdout)) == 1
    said = admin("user", "del", user).stdout.splitlines()[1]
    label = re.search(r"archive kept as '(.+)'$", said).group(1)
    admin("user", "add", user, "--account", "acme")
    assert json.loads(admin("archive", "list", user, "--json").stdout) == []
    # The old copies are kept under the retired name until the retention removes them.
    assert [len(Archive(str(admin.data / "archive")).list(label))] == [1]


def test_a_new_account_of_a_deleted_name_starts_with_no_lists_or_statistics(admin):
    admin("suppression", "add", "all@example.org", "--account", "acme")
    store = StatsStore(str(admin.data / "stats.sqlite"))
    hour = 1_795_000_000 // HOUR
    store.add({("acme", "gone@acme.example", hour, "accepted"): 3})
    store.close()
    admin("user", "del", "news@acme.example")
    lines = admin("account", "del", "acme").stdout.splitlines()
    assert lines[0] == "deleted account acme"
    label = re.fullmatch(r"its suppressions and statistics: 1 suppressed address\(es\) "
                         r"removed, statistics kept as account '(acme \(deleted .+\))'",
                         lines[1]).group(1)  # fmt: skip
    admin("account", "add", "acme", "--domains", "acme.example")
    assert listed(admin, "--account", "acme") == []
    assert json.loads(admin("stats", "--account", "acme", "--json").stdout)["totals"][
        "accepted"] == 0
    assert json.loads(admin("stats", "--account", label, "--json").stdout)["totals"][
        "accepted"] == 3


def test_suppressions_of_a_user_that_no_longer_exists(admin):
    user = "news@acme.example"
    admin("suppression", "add", "a@example.org", "b@example.org", "c@example.org", "--user", user)
    # The user is deleted by editing the user file, as a sysadmin may.
    users_file = admin.data / "users.json"
    doc = json.loads(users_file.read_text())
    del doc["users"][user]
    users_file.write_text(json.dumps(doc))

    assert listed(admin, "--user", user) == [
        ("a@example.org", "acme", user), ("b@example.org", "acme", user),
        ("c@example.org", "acme", user)]  # fmt: skip
    assert ("a@example.org", "acme", user) in listed(admin)
    admin("suppression", "del", "a@example.org", "--user", "NEWS@acme.example")
    admin("suppression", "del", "b@example.org", "--user", user, "--account", "acme")
    assert listed(admin, "--user", user) == [("c@example.org", "acme", user)]
    missing = admin("suppression", "del", "a@example.org", "--user", user, ok=False)
    assert missing.stderr.strip() == "mailrelay-admin: not on that list: a@example.org"
    nobody = admin("suppression", "list", "--user", "nobody@acme.example", ok=False)
    assert nobody.returncode == 1
    assert "unknown user 'nobody@acme.example'" in nobody.stderr
    assert "no suppressed address is stored for that name" in nobody.stderr
    refused = admin("suppression", "add", "d@example.org", "--user", user, ok=False)
    assert refused.returncode == 1 and "unknown user" in refused.stderr

    # Its name given to a new user: the leftover is not inherited.
    added = admin("user", "add", user, "--account", "acme").stdout.splitlines()
    assert f"left by an earlier user {user}: 1 suppressed address(es) removed, no statistics" \
        in added
    assert listed(admin) == []


def test_stats_command(admin):
    store = StatsStore(str(admin.data / "stats.sqlite"))
    day = 1_795_000_000 // 86400 * 86400
    h = day // HOUR
    store.add(
        {
            ("acme", "news@acme.example", h, "accepted"): 5,
            ("acme", "news@acme.example", h + 1, "delivered"): 4,
            ("acme", "news@acme.example", h + 30, "opens"): 2,
            ("other", "x", h, "accepted"): 9,
        }
    )
    store.close()
    text = admin("stats", "news@acme.example").stdout.splitlines()
    assert text[0].split() == ["EVENT", "TOTAL"]
    assert dict(line.split() for line in text[1:])["accepted"] == "5"
    everyone = json.loads(admin("stats", "--json").stdout)
    assert everyone["totals"]["accepted"] == 14 and everyone["user"] is None
    by_day = json.loads(
        admin("stats", "NEWS@acme.example", "--by", "day", "--json", "--since", "2026-01-01").stdout
    )
    assert by_day["user"] == "news@acme.example" and by_day["account"] == "acme"
    assert [(p["start"], p.get("accepted", 0), p.get("opens", 0)) for p in by_day["periods"]] == [
        (day, 5, 0),
        (day + 86400, 0, 2),
    ]
    later = json.loads(admin("stats", "--since", "2099-01-01", "--json").stdout)
    assert later["totals"]["accepted"] == 0
    table = admin("stats", "--account", "acme", "--by", "hour").stdout.splitlines()
    assert table[0].split()[:4] == ["HOUR", "ACCOUNT", "USER", "ACCEPTED"]
    bad = admin("stats", "--since", "yesterday", ok=False)
    assert bad.returncode == 1 and "not a date" in bad.stderr


def test_archive_command(admin):
    archive = Archive(str(admin.data / "archive"))
    msg = b"From: News <news@acme.example>\r\nSubject: Hello\r\n\r\nbody\r\n"
    key = archive.store(
        "news@acme.example", "q1", msg, "news@acme.example", ["a@example.org"], when=1_795_000_000
    )
    lines = admin("archive", "list", "News@acme.example").stdout.splitlines()
    assert lines[0].split() == ["ID", "ARCHIVED", "(UTC)", "FROM", "SIZE", "SUBJECT"]
    assert lines[1].split()[0] == key and lines[1].split()[-1] == "Hello"
    (entry,) = json.loads(admin("archive", "list", "news@acme.example", "--json").stdout)
    assert (entry["id"], entry["sender"], entry["subject"]) == (key, "news@acme.example", "Hello")
    empty = admin("archive", "list", "other@acme.example")
    assert "no archived messages for other@acme.example" in empty.stderr
