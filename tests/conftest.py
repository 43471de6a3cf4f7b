"""Test setup shared by every test: the repository root is importable, and under
``CI=true`` nothing is skipped: a test that cannot run is a feature that fails."""

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
for path in (str(ROOT), str(ROOT / "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_tools() -> list[str]:
    """What ./test.sh installs and some tests need, where it is missing."""
    missing = [f"{name} ({path})" for name, path in (
        ("slapd", "/usr/sbin/slapd"), ("slapadd", "/usr/sbin/slapadd"),
        ("chromium", "/usr/bin/chromium"), ("chromium-driver", "/usr/bin/chromedriver"),
        ("haproxy", "/usr/sbin/haproxy"),
        ("postfix", "/usr/sbin/postfix"),
        ("unbound", "/usr/sbin/unbound"),  # the validating resolver of tests/test_dane.py
        ("redis-server", "/usr/bin/redis-server"),
    ) if not os.path.exists(path)]
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):  # tests/pg_server.py
        missing.append("postgresql (/usr/lib/postgresql/N/bin)")
    missing += [name for name in ("swaks", "openssl", "ldapadd") if not shutil.which(name)]
    # DKIM's independent verifier, run in a namespace of its own (tests/dkim_verify.py).
    missing += [f"{name} ({package})" for name, package in (
        ("opendkim-testmsg", "opendkim-tools"), ("unshare", "util-linux"), ("ip", "iproute2"),
    ) if not shutil.which(name)]
    # swaks speaks TLS through Net::SSLeay, which Debian only recommends.
    if shutil.which("perl") and subprocess.run(["perl", "-MNet::SSLeay", "-e1"],
                                               capture_output=True).returncode != 0:
        missing.append("Net::SSLeay (libnet-ssleay-perl)")
    return missing


def pytest_sessionstart(session):
    if STRICT and (missing := missing_tools()):
        raise pytest.UsageError("CI=true and the tests' tools are missing: "
                                + ", ".join(missing) + " (./test.sh installs them)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tuned(name): tests the optimisation NAME of mailrelay/tuning.py itself; "
        "left out of a run where MAILRELAY_STOCK turns it off")


def pytest_collection_modifyitems(config, items):
    """Under MAILRELAY_STOCK (test.sh's second pass) the tests of an optimisation that is
    off are left out (deselected, not skipped): the stock path has no such behaviour."""
    from mailrelay import tuning

    keep, off = [], []
    for item in items:
        names = [m.args[0] for m in item.iter_markers("tuned")]
        (off if any(not tuning.on(n) for n in names) else keep).append(item)
    if off:
        config.hook.pytest_deselected(items=off)
        items[:] = keep
