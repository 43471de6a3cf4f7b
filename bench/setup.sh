#!/bin/sh
# Installs what the bench needs on a fresh Debian machine: Postfix (which also ships
# smtp-source and smtp-sink in /usr/sbin) and Cyrus SASL (saslpasswd2, the sasldb and
# PLAIN/LOGIN plugins) for Postfix's AUTH figures, and OpenDKIM (the milter and
# opendkim-genkey) for the signing figure. Idempotent: installs only what is missing.
# Debconf answers "No configuration", so the system Postfix instance gets no main.cf and
# does not run; the bench runs a private instance of its own (bench/postfix.py). The
# bench does not use the system opendkim either (with systemd, Debian starts it on a local
# socket): it starts its own (bench/opendkim.py).
set -eu

need=""
[ -x /usr/sbin/postfix ] && [ -x /usr/sbin/smtp-source ] || need="$need postfix"
[ -x /usr/sbin/saslpasswd2 ] || need="$need sasl2-bin"
dpkg-query -W -f='${Status}' libsasl2-modules 2>/dev/null | grep -q "install ok installed" \
    || need="$need libsasl2-modules"
[ -x /usr/sbin/opendkim ] || need="$need opendkim"
[ -x /usr/sbin/opendkim-genkey ] || need="$need opendkim-tools"

if [ -z "$need" ]; then
    echo "bench/setup.sh: postfix, sasl2-bin, libsasl2-modules and opendkim are installed"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
$SUDO apt-get update -q
# shellcheck disable=SC2086
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $need
echo "bench/setup.sh: installed$need"
