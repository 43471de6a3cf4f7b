"""Test setup shared by every test: the repository root is importable, and under
``CI=true`` nothing is skipped: a test that cannot run is a feature that fails."""

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
    ) if not os.path.exists(path)]
    missing += [name for name in ("swaks", "openssl", "ldapadd") if not shutil.which(name)]
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
