#!/usr/bin/env bash
# Install everything the tests need (Debian packages, a venv with the test extras) and run
# the whole suite twice: as the relay runs, then with MAILRELAY_STOCK=all, every
# optimisation that reaches into Twisted's (or glibc's) private parts switched off
# (mailrelay/tuning.py). A test that fails only in the first pass after a Twisted upgrade
# names the optimisation that broke; the second pass shows the stock paths still serve.
# Both passes run everything: one takes 3.5-5 minutes on 2 cores (both with the Debian
# packages in place: 9 min 50 s on 2026-12-06), inside CI's 15, and a broken optimisation
# can show wherever a session, a delivery or a log line goes, not only in the tests of its
# own module. If the suite outgrows that, the second pass is the one to narrow. Tests of an optimisation itself are
# marked tuned(NAME) and left out of the second pass (tests/conftest.py).
# Extra arguments go to both passes, e.g.: ./test.sh tests/test_scope.py
set -euo pipefail
cd "$(dirname "$0")"
. ./scripts/venv.sh
# swaks needs libnet-ssleay-perl for TLS (only recommended, and recommends are left out).
# Postfix is a client in tests/test_e2e_dsn.py, as a private instance (bench/postfix.py);
# "No configuration" leaves the system instance without a main.cf, never started.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
ensure_debs slapd ldap-utils swaks libnet-ssleay-perl openssl chromium chromium-driver \
    opendkim-tools iproute2 haproxy postfix redis-server
ensure_venv
"$VENV/bin/pip" install -q --disable-pip-version-check '.[test]'
# Run the checkout's code (not the installed copy); twistd finds the plugin on PYTHONPATH.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/ruff" check mailrelay tests twisted bench
# Both passes run whatever the first gives: which one fails is what tells.
unset MAILRELAY_STOCK
status=0
"$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" -q "$@" || status=$?
echo "test.sh: again with MAILRELAY_STOCK=all (the stock Twisted paths)"
MAILRELAY_STOCK=all "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" -q "$@" || status=$?
exit "$status"
