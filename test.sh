#!/usr/bin/env bash
# Install everything the tests need (Debian packages, a venv with the test extras) and run
# the suite: whole, as the relay runs; then the tests that reach the optimisations' sites
# again with MAILRELAY_STOCK=all, every optimisation that reaches into Twisted's (or
# glibc's) private parts switched off (mailrelay/tuning.py). A test that fails only in the
# first pass after a Twisted upgrade names the optimisation that broke; the second pass
# shows the stock paths still serve.
# The second pass is narrowed to the modules that run those sites (STOCK_TESTS): real
# listeners and the Redis connection (prompt_writes), the delivery client (client_setattr), log lines (log_text),
# password hashing (mmap_threshold), and the end-to-end tests that carry a session, a
# delivery and a log line through twistd. Running everything twice no longer fits CI's 15
# minutes on 2 cores. Tests of an optimisation itself are marked tuned(NAME) and left out
# of the second pass (tests/conftest.py).
# Extra arguments replace the test selection of both passes, e.g.: ./test.sh tests/test_scope.py
set -euo pipefail
cd "$(dirname "$0")"
. ./scripts/venv.sh
# swaks needs libnet-ssleay-perl for TLS (only recommended, and recommends are left out).
# Postfix is a client in tests/test_e2e_dsn.py, as a private instance (bench/postfix.py);
# "No configuration" leaves the system instance without a main.cf, never started.
# redis-server and postgresql serve the cluster tests as private instances on loopback
# (tests/redis_server.py, tests/pg_server.py); policy-rc.d keeps the system ones stopped.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
ensure_debs slapd ldap-utils swaks libnet-ssleay-perl openssl chromium chromium-driver \
    opendkim-tools iproute2 haproxy postfix unbound redis-server postgresql
ensure_venv
"$VENV/bin/pip" install -q --disable-pip-version-check '.[test]'
# Run the checkout's code (not the installed copy); twistd finds the plugin on PYTHONPATH.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/ruff" check mailrelay tests twisted bench
# Both passes run whatever the first gives: which one fails is what tells.
unset MAILRELAY_STOCK
status=0
"$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" -q --durations=15 "$@" || status=$?
echo "test.sh: again with MAILRELAY_STOCK=all (the stock Twisted paths)"
STOCK_TESTS=(tests/test_listener.py tests/test_proxyproto.py tests/test_tls.py
    tests/test_smtp_tls.py tests/test_smtp_submission.py tests/test_delivery_client.py
    tests/test_delivery_verp.py tests/test_logtext.py tests/test_auth.py tests/test_tuning.py
    tests/test_e2e_submission.py tests/test_e2e_delivery.py tests/test_e2e_log.py
    tests/test_e2e_tls.py tests/test_e2e_proxy.py tests/test_e2e_memory.py
    tests/test_cluster_connection.py)
if [ "$#" -gt 0 ]; then STOCK_TESTS=("$@"); fi
MAILRELAY_STOCK=all "$VENV/bin/python" -m pytest -n "${TEST_WORKERS:-2}" -q "${STOCK_TESTS[@]}" \
    || status=$?
exit "$status"
