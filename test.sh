#!/usr/bin/env bash
# Install everything the tests need (Debian packages, a venv with the test extras) and run
# the whole suite. Extra arguments go to pytest, e.g.: ./test.sh tests/test_scope.py
set -euo pipefail
cd "$(dirname "$0")"
. ./scripts/venv.sh
# swaks needs libnet-ssleay-perl for TLS (only recommended, and recommends are left out).
ensure_debs slapd ldap-utils swaks libnet-ssleay-perl openssl chromium chromium-driver
ensure_venv
"$VENV/bin/pip" install -q --disable-pip-version-check '.[test]'
# Run the checkout's code (not the installed copy); twistd finds the plugin on PYTHONPATH.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/ruff" check mailrelay tests twisted bench
exec "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" -q "$@"
