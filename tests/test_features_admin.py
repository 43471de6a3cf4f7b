"""mailrelay-admin suppression, stats and archive, run as the real command."""

from __future__ import annotations

import json
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
    assert neither.returncode == 2  # argparse: one of --user, --account, --global required


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
