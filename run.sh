#!/usr/bin/env bash
# Install mailrelay into ./.venv (first time only) and run it in the foreground.
# Arguments go to the plugin, e.g.: ./run.sh --config etc/mailrelay.ini
set -euo pipefail
cd "$(dirname "$0")"
. ./scripts/venv.sh
ensure_venv
"$VENV/bin/pip" install -q --disable-pip-version-check .
exec "$VENV/bin/twistd" -n mailrelay "$@"
