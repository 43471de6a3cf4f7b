#!/bin/sh
# Installs what the bench needs on a fresh Debian machine: Postfix (which also ships
# smtp-source and smtp-sink) and Cyrus SASL for Postfix's AUTH figures. Idempotent: does
# nothing when everything is already there. The system Postfix instance is left unconfigured
# ("No configuration") and stopped; the bench runs its own private instance.
set -eu

need=""
command -v postfix >/dev/null 2>&1 || [ -x /usr/sbin/postfix ] || need="$need postfix"
[ -x /usr/sbin/smtp-source ] || need="$need postfix"
[ -x /usr/sbin/saslpasswd2 ] || need="$need sasl2-bin"
dpkg -s libsasl2-modules >/dev/null 2>&1 || need="$need libsasl2-modules"

if [ -z "$need" ]; then
    echo "bench/setup.sh: postfix, sasl2-bin and libsasl2-modules already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi

echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -q
# shellcheck disable=SC2086
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    postfix sasl2-bin libsasl2-modules
# Debian may start the system instance on install; the bench never uses it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet postfix 2>/dev/null; then
    $SUDO systemctl stop postfix || true
fi
echo "bench/setup.sh: installed$need"
