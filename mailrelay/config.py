"""The configuration: an INI file checked completely before anything starts.

Every setting, its type and its default is declared once in SCHEMA; etc/mailrelay.ini
documents them. An unknown section or key, or a bad value, is a ConfigError that names the
file, the setting and what is wrong, so ``twistd`` can stop with one clear line.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote, urlsplit

from mailrelay.scope import ScopeError, is_address, is_domain, to_ascii_domain
from mailrelay.spool.queueid import is_node_id

DEFAULT_DATA_DIR = "/var/lib/mailrelay"


class ConfigError(Exception):
    """One line: ``FILE: [section] key: what is wrong``."""

    def __init__(self, source: str, section: str | None, key: str | None, message: str) -> None:
        where = source
        if section:
            where += f": [{section}]"
        if key:
            where += f" {key}"
        super().__init__(f"{where}: {message}")


# ---- value parsers: each takes the raw text and returns the value or raises ValueError ----

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def size(text: str) -> int:
    """``50M``, ``512k``, ``1048576``: bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", text, re.I)
    if not m:
        raise ValueError(f"{text!r} is not a size (examples: 50M, 512k, 1048576)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``1h``, ``5d``: seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text, re.I)
    if not m:
        raise ValueError(f"{text!r} is not a duration (examples: 30s, 5m, 1h, 5d)")
    return float(m.group(1)) * _SECONDS[m.group(2).lower()]


def boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"{text!r} is not a whole number")
        if low is not None and value < low or high is not None and value > high:
            raise ValueError(f"{value} is outside {low}..{high if high is not None else 'inf'}")
        return value

    return parse


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return value

    return parse


def text(value: str) -> str:
    return value.strip()


def hostport(default_port: int) -> Callable[[str], tuple[str, int]]:
    """``host``, ``host:port``, ``[v6]:port``, ``v6``."""

    def parse(value: str) -> tuple[str, int]:
        value = value.strip()
        if value.count(":") > 1 and not value.startswith("["):
            # A bare IPv6 address ("::1") has no port; "[::1]:53" has one.
            try:
                return str(ipaddress.IPv6Address(value)), default_port
            except ValueError:
                raise ValueError(f"{value!r} is not host or host:port (write [v6]:port)")
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?|([^:\s]+)(?::(\d+))?", value)
        if not m:
            raise ValueError(f"{value!r} is not host or host:port")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4) or default_port)
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is outside 1..65535")
        return host, port

    return parse


def hostport_list(default_port: int) -> Callable[[str], list[tuple[str, int]]]:
    one = hostport(default_port)
    return lambda value: [one(v) for v in re.split(r"[\s,]+", value.strip()) if v]


def word_list(value: str) -> list[str]:
    return [v for v in re.split(r"[\s,]+", value.strip()) if v]


def ip_list(value: str) -> list[str]:
    """IPv4/IPv6 addresses separated by spaces or commas, normalised (``2001:DB8::0:1``
    becomes ``2001:db8::1``)."""
    out = []
    for v in word_list(value):
        try:
            out.append(str(ipaddress.ip_address(v)))
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address")
    return out


def _networks(value: str) -> tuple:
    """``127.0.0.1/32, 10.0.0.0/8, fd00::/8``: IPv4 and IPv6 networks (a bare address is
    one host)."""
    from mailrelay.auth.ipauth import parse_network

    return tuple(parse_network(v) for v in word_list(value))


def _durations(value: str) -> tuple[float, ...]:
    """``5s, 5m, 30m``: durations separated by commas or spaces, at least one."""
    found = tuple(duration(v) for v in word_list(value))
    if not found:
        raise ValueError("give at least one duration (examples: 5s, 5m, 30m)")
    return found


def _domain(value: str) -> str:
    """A domain name, lower case, in ASCII (IDNA); empty stays empty."""
    from mailrelay.scope import ScopeError, to_ascii_domain

    name = value.strip().rstrip(".")
    if not name:
        return ""
    try:
        name = to_ascii_domain(name)
    except ScopeError as e:
        raise ValueError(str(e))
    if not is_domain(name):
        raise ValueError(f"{value.strip()!r} is not a domain name")
    return name.lower()


def _ip_auth(value: str):
    from mailrelay.auth.ipauth import IpAuthTable

    return IpAuthTable.parse(value)


def _tls_ciphers(value: str) -> str:
    from mailrelay.tls import tls12_ciphers

    tls12_ciphers(value.strip())
    return value.strip()


def _address_auth(value: str):
    from mailrelay.auth.ipauth import AddressAuth

    return AddressAuth.parse(value)


def _postgres_dsn(value: str) -> str:
    """A libpq connection string (URI or key=value), checked for syntax only."""
    if not value:
        return ""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(value)
    except ProgrammingError as e:
        raise ValueError(f"{value!r} is not a PostgreSQL connection string: {e}") from None
    return value


def redis_url_parts(url: str) -> dict:
    """``unix:/run/redis/redis.sock`` (or a bare path), ``redis://[:password@]host[:port][/db]``
    or ``rediss://...`` as a dict: ``path``, or ``host``, ``port``, ``tls`` (rediss://), or
    ``sentinels`` and ``master`` (sentinel://...), and those of ``password``, ``username``,
    ``dbid`` the URL has. Raises ValueError."""
    if url.startswith("/") or url.startswith("unix:"):
        path = url.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"{url!r}: a unix socket needs an absolute path")
        return {"path": path}
    if url.startswith("sentinel://"):
        return _sentinel_url_parts(url)
    if "sentinel" in url.partition("://")[0]:
        raise ValueError(f"{url!r}: Sentinel is asked without TLS only (sentinel://)")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ValueError(f"{url!r} is not unix:/PATH, redis://HOST:PORT or rediss://HOST:PORT "
                         "(or sentinel://HOST:PORT,HOST:PORT/NAME)")
    args = {"host": parts.hostname, "port": parts.port or 6379,
            "tls": parts.scheme == "rediss"}
    if parts.password:
        args["password"] = unquote(parts.password)
    if parts.username:
        args["username"] = unquote(parts.username)
    if parts.path.strip("/"):
        args["dbid"] = int(parts.path.strip("/"))
    return args


def _sentinel_url_parts(url: str) -> dict:
    """``sentinel://[:password@]host:port,host:port/name[/db]``: ``sentinels`` (host, port)
    asked in turn for the primary of ``master``; the password is the primary's, as in
    redis://. No TLS: a primary is named by its address, which a certificate rarely
    carries."""
    rest = url.removeprefix("sentinel://")
    hosts, _, path = rest.partition("/")
    userinfo, _, hosts = hosts.rpartition("@")
    args: dict = {}
    if userinfo:
        user, _, password = userinfo.partition(":")
        if user:
            args["username"] = unquote(user)
        if password:
            args["password"] = unquote(password)
    sentinels = []
    for item in hosts.split(","):
        host, port = _host_port(url, item.strip(), 26379)
        sentinels.append((host, port))
    name, _, db = path.partition("/")
    if not name:
        raise ValueError(f"{url!r}: the master's name is missing (sentinel://HOST:PORT/NAME)")
    if db.strip("/"):
        if not db.strip("/").isdigit():
            raise ValueError(f"{url!r}: {db!r} is not a database number")
        args["dbid"] = int(db.strip("/"))
    return {"sentinels": sentinels, "master": unquote(name), **args}


def _host_port(url: str, item: str, default: int) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"{url!r}: a sentinel without a host (sentinel://HOST:PORT,...)")
    if not port:
        return host, default
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{url!r}: {port!r} is not a port")
    return host, int(port)


def _node_id(value: str) -> str:
    value = value.strip()
    if value and not is_node_id(value):
        raise ValueError(f"{value!r} is not a node id (4 characters of 0-9 and a-v)")
    return value


def _redis_url(value: str) -> str:
    value = value.strip()
    if value:
        redis_url_parts(value)
    return value


# ---- the schema: section -> key -> (parser, default); None default means "derived" ----

SCHEMA: dict[str, dict[str, tuple[Callable[[str], Any], Any]]] = {
    "server": {
        "hostname": (text, None),  # default: this machine's FQDN
        "data_dir": (text, DEFAULT_DATA_DIR),
        "postmaster": (text, None),  # default: postmaster@hostname
        "log_format": (choice("text", "json"), "text"),  # the log's lines (mailrelay/logtext.py)
        "node_id": (_node_id, ""),  # ends this node's queue ids; default: <data_dir>/node_id
        # On stop: how long sessions may finish the command in progress (smtp/goodbye.py).
        "shutdown_grace": (duration, 10.0),
    },
    "tls": {
        "certificate": (text, None),  # default: <data_dir>/tls/cert.pem, made on first start
        "key": (text, None),  # default: <data_dir>/tls/key.pem
        "key_type": (choice("ecdsa", "rsa"), "ecdsa"),  # for the self-signed certificate
        # OpenSSL cipher string for TLS 1.2 on the listeners: AEAD suites only by default.
        "ciphers": (_tls_ciphers, "ECDHE+AESGCM:ECDHE+CHACHA20"),
    },
    "limits": {
        "max_message_size": (size, 50 * 2**20),
        "max_recipients": (integer(1, 100000), 400),
        "max_messages_per_connection": (integer(1), 2500),
        "idle_timeout": (duration, 300.0),
        "data_timeout": (duration, 600.0),
        "session_timeout": (duration, 3600.0),
        "max_connections": (integer(0), 500),
        "max_connections_per_ip": (integer(0), 50),
        "max_connections_per_user": (integer(0), 40),
        "rate_per_hour": (integer(0), 200000),
        "rate_per_minute": (integer(0), 0),
        "rate_counts": (choice("messages", "recipients"), "messages"),
        "quota_per_day": (integer(0), 0),
        "quota_per_month": (integer(0), 0),
    },
    "policy": {
        "ip_auth": (_ip_auth, None),
        "address_auth": (_address_auth, None),
        "ipv6_prefix": (integer(8, 128), 64),
        "login_window": (duration, 600.0),
        "login_delay_after": (integer(1), 3),
        "login_block_after": (integer(1), 10),
        "login_block_time": (duration, 900.0),
        "login_max_delay": (duration, 16.0),
        "login_user_alert_after": (integer(1), 20),
        "notify_interval": (duration, 600.0),
        "dormant_after": (duration, 0.0),  # 0: users are never disabled for not logging in
    },
    "directory": {
        "backend": (choice("file", "ldap"), "file"),
        "file": (text, None),  # default: <data_dir>/users.json
        "login_cache_ttl": (duration, 60.0),
        "logins_db": (text, None),  # default: <data_dir>/logins.sqlite (last logins)
    },
    "ldap": {
        "uris": (word_list, ["ldap://127.0.0.1:389"]),
        "start_tls": (boolean, False),
        "ca_file": (text, ""),
        "bind_dn": (text, ""),
        "bind_password": (text, ""),
        "base_dn": (text, ""),
        "user_filter": (text, "(|(uid={username})(mail={username}))"),
        "user_list_filter": (text, "(objectClass=mailrelayUser)"),
        "account_base": (text, ""),  # default: base_dn
        "account_list_filter": (text, "(objectClass=mailrelayAccountEntry)"),
        "password_mode": (choice("bind", "compare"), "bind"),
        "cache_ttl": (duration, 60.0),
        "pool_size": (integer(1, 64), 4),
        "timeout": (duration, 5.0),
    },
    "spool": {
        "directory": (text, None),  # default: <data_dir>/spool
        "min_free_space": (size, 100 * 2**20),
    },
    "delivery": {
        "mode": (choice("mx", "smarthost"), "mx"),
        "smarthost": (hostport(25), None),
        "smarthost_tls": (choice("required", "opportunistic", "none"), "required"),
        "smarthost_verify": (boolean, True),
        "smarthost_username": (text, ""),
        "smarthost_password": (text, ""),
        "smarthost_ca_file": (text, ""),  # PEM trust roots for smarthost_verify; empty: system
        "mx_tls": (choice("opportunistic", "none"), "opportunistic"),
        "dns_servers": (hostport_list(53), []),  # empty: the system resolver
        # DNSSEC status for DANE (delivery/dnssec.py): auto asks with DO when the
        # resolvers are trusted (loopback, or any with dns_trusted = yes); off never.
        "dnssec": (choice("auto", "off"), "auto"),
        "dns_trusted": (boolean, False),
        # PEM trust roots for verify and MTA-STS (certificates of MX hosts and policy
        # servers); empty: the system's.
        "tls_ca_file": (text, ""),
        "mta_sts": (boolean, True),  # MTA-STS policies of recipient domains (RFC 8461)
        "mta_sts_port": (integer(1, 65535), 443),  # where policies are fetched (tests)
        "mta_sts_cache": (text, None),  # default: <data_dir>/mta-sts
        # TLS reports (RFC 8460): sessions counted, a daily report to each domain's rua
        "tls_reports": (boolean, True),
        "tls_report_dir": (text, None),  # default: <data_dir>/tls-rpt
        "tls_report_org": (text, ""),  # the organization-name; default: [server] hostname
        "tls_report_contact": (text, ""),  # contact-info; default: [server] postmaster
        "outbound_addresses": (ip_list, []),  # what SPF must authorize; empty: not checked
        "port": (integer(1, 65535), 25),  # the port MX hosts are contacted on
        "allow_local_mx": (boolean, False),  # MX hosts on loopback/private addresses (tests)
        "max_concurrency": (integer(1, 10000), 50),
        "max_per_host": (integer(1, 1000), 10),
        "retry_first": (duration, 60.0),
        "retry_max": (duration, 3600.0),
        "lifetime": (duration, 5 * 86400.0),
        "delay_warning": (duration, 0.0),  # 0: off
        "dsn_delay_warning": (duration, 4 * 3600.0),  # for NOTIFY=DELAY; 0: off
        "connect_timeout": (duration, 30.0),
        "connection_cache_time": (duration, 2.0),  # 0: QUIT as soon as the queue is empty
        "nice": (integer(0, 19), 5),  # the delivery process's priority below the relay's
        "enabled": (boolean, True),
    },
}

SCHEMA["admin"] = {
    # The control panel: JSON API under /api/v1 and the web admin page.
    "enabled": (boolean, True),
    "endpoint": (text, "tcp:8080:interface=127.0.0.1"),
    "tls": (boolean, False),  # HTTPS with the relay's [tls] certificate
    "public_url": (text, ""),  # how people reach the panel (links); default from endpoint
    "session_lifetime": (duration, 8 * 3600.0),
    "verify_senders": (boolean, True),
    "verify_link_lifetime": (duration, 7 * 86400.0),
    "dns_check_interval": (duration, 600.0),  # pending domain TXT checks; 0: on demand
    "access_file": (text, ""),  # default: <data_dir>/admin.json
    "key_file": (text, ""),  # default: <data_dir>/panel.key
}

SCHEMA["features"] = {
    # Per-user message features (mailrelay/features/); paths default under data_dir.
    "suppressions_db": (text, ""),  # default: <data_dir>/suppressions.sqlite
    "stats_db": (text, ""),  # default: <data_dir>/stats.sqlite
    "archive_dir": (text, ""),  # default: <data_dir>/archive
    "archive_retention": (duration, 90 * 86400.0),  # 0: keep everything
    "stats_flush_interval": (duration, 1.0),
    # Unsubscribe footer templates ($url, $recipient): inline text, or a file; empty: built in.
    "footer_text": (text, ""),
    "footer_text_file": (text, ""),
    "footer_html": (text, ""),
    "footer_html_file": (text, ""),
}

SCHEMA["tracking"] = {
    # The HTTP endpoint of unsubscribe links, open pixels and click redirects.
    "enabled": (boolean, False),
    "endpoint": (text, "tcp:8081:interface=127.0.0.1"),
    "base_url": (text, ""),  # how recipients reach it; default http://<hostname>:<port>
    "key_file": (text, ""),  # default: <data_dir>/tracking.key (signs the links)
    "unsubscribe_mailto": (text, ""),  # an address for mailto: List-Unsubscribe; empty: none
}

SCHEMA["dkim"] = {
    # DKIM signing at delivery (mailrelay/dkim.py); keys are made with mailrelay-admin dkim.
    "sign": (boolean, True),
    "directory": (text, ""),  # default: <data_dir>/dkim (private keys and keys.json)
    # The relay looks every key's record up this often; a pending key seen is activated.
    "check_interval": (duration, 3600.0),  # 0: never (dkim activate by hand)
    "retire_after": (duration, 7 * 86400.0),  # a retiring key's record may go after this
    "relay_domain": (_domain, ""),  # signs what no key of the message's account signs
}

SCHEMA["bounces"] = {
    # The inbound listener of the accounts' bounce domains (mailrelay/bounces/); off when
    # endpoint is empty. It takes mail for the relay's VERP return paths only.
    "endpoint": (text, ""),  # e.g. tcp:25
    "key_file": (text, ""),  # default: <data_dir>/bounce.key (signs the VERP addresses)
    "db": (text, ""),  # default: <data_dir>/bounces.sqlite (what each VERP address names)
    "retention": (duration, 30 * 86400.0),  # records kept this long; later reports dropped
    "max_message_size": (size, 10 * 2**20),
    "max_connections": (integer(1), 100),
    "mx_host": (text, ""),  # what a bounce domain's MX must name; default: [server] hostname
}

SCHEMA["cluster"] = {
    # Limits shared by several relays (mailrelay/cluster/): counted in one Redis.
    # unix:/PATH, redis[s]://[:PASSWORD@]HOST[:PORT][/DB] or
    # sentinel://[:PASSWORD@]HOST:PORT,HOST:PORT/NAME[/DB]; empty: off
    "redis": (_redis_url, ""),
    "redis_password": (text, ""),  # AUTH, unless the URL has one
    "redis_sentinel_password": (text, ""),  # sentinel://: the sentinels' own AUTH
    "redis_ca_file": (text, ""),  # rediss://: PEM trust roots; empty: the system's
    "redis_certificate": (text, ""),  # rediss://: a client certificate (PEM), if Redis asks
    "redis_key": (text, ""),  # and its key
    "redis_timeout": (duration, 1.0),  # a check not answered within this: Redis is down
    "redis_down": (choice("refuse", "local"), "refuse"),
    "nodes": (integer(1, 1000), 1),  # redis_down = local: each node keeps limit / nodes
    "node_id": (text, ""),  # names this node's connection leases; default hostname-pid
    "lease_time": (duration, 30.0),  # a dead node's connections stop counting after this
    "prefix": (text, "mailrelay:"),  # of every key, so several relay groups share a Redis
    # The stores shared by the nodes (mailrelay/postgres/): a libpq URI or key=value string.
    "postgres": (_postgres_dsn, ""),  # postgresql://USER@HOST[:PORT]/DB; empty: local files
    "postgres_password": (text, ""),  # unless the DSN, PGPASSWORD or ~/.pgpass has one
    "postgres_connections": (integer(1, 100), 4),  # per node and process, at most
}

SCHEMA["metrics"] = {
    # Prometheus metrics at /metrics (mailrelay/metrics/): on the control panel's listener
    # ("admin"), or on a Twisted endpoint of their own.
    "enabled": (boolean, True),
    "endpoint": (text, "admin"),
    "token": (text, ""),  # a bearer token scrapes must send; empty: none asked
}

SCHEMA["webhooks"] = {
    # Events POSTed to the accounts' endpoints (mailrelay/webhooks/), kept in an outbox.
    "enabled": (boolean, True),
    "db": (text, ""),  # default: <data_dir>/webhooks.sqlite (endpoints and outbox)
    "allow_private": (_networks, ()),  # private/loopback targets allowed, e.g. 127.0.0.0/8
    "retry_delays": (_durations, (5.0, 300.0, 1800.0, 7200.0, 18000.0)),
    "timeout": (duration, 10.0),  # one request, from connecting to the end of the answer
    "concurrency": (integer(1, 1000), 10),
    "poll_interval": (duration, 1.0),  # how often the outbox is looked at
    "flush_interval": (duration, 0.1),  # events are written to the outbox this often
    "secret_overlap": (duration, 86400.0),  # rotate-secret: the old secret signs this long
    "failed_retention": (duration, 30 * 86400.0),
}

LISTENER_KEYS: dict[str, tuple[Callable[[str], Any], Any]] = {
    "endpoint": (text, None),
    "tls": (choice("starttls", "implicit", "none"), "starttls"),
    "plaintext_auth": (boolean, False),
    "proxy_protocol": (boolean, False),
    "proxy_from": (_networks, ()),
    "proxy_timeout": (duration, 5.0),
}

# Endpoint kinds whose connections the PROXY protocol wrapper reads (listener.py).
PROXY_ENDPOINTS = ("tcp", "tcp6", "ssl")

DEFAULT_LISTENERS = {
    "smtp": {"endpoint": "tcp:2525:interface=127.0.0.1", "tls": "starttls"},
    "smtps": {"endpoint": "tcp:8465:interface=127.0.0.1", "tls": "implicit"},
}


@dataclass(frozen=True)
class Listener:
    name: str
    endpoint: str  # a Twisted server endpoint string
    tls: str  # "starttls", "implicit" or "none"
    plaintext_auth: bool  # allow AUTH without TLS (off unless set)
    proxy_protocol: bool = False  # a PROXY header first (mailrelay/proxyproto.py)
    proxy_from: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()  # balancers
    proxy_timeout: float = 5.0  # seconds the header may take


@dataclass
class Config:
    source: str
    server: SimpleNamespace
    tls: SimpleNamespace
    limits: SimpleNamespace
    directory: SimpleNamespace
    ldap: SimpleNamespace
    spool: SimpleNamespace
    policy: SimpleNamespace
    admin: SimpleNamespace
    delivery: SimpleNamespace
    listeners: list[Listener]
    routes: dict[str, tuple[str, int]]  # recipient domain -> host, port
    tls_policy: dict[str, str]  # recipient domain (or .parent) -> TLS level (delivery/dane.py)
    features: SimpleNamespace
    tracking: SimpleNamespace
    dkim: SimpleNamespace
    bounces: SimpleNamespace
    metrics: SimpleNamespace
    cluster: SimpleNamespace | None = None
    webhooks: SimpleNamespace | None = None


EMBEDDED = "<embedded defaults>"  # Config.source without a file


def load_config(path: str | None) -> Config:
    """Read and check ``path`` (None: the embedded defaults). Raises ConfigError."""
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none")
    parser.optionxform = str  # keys are case-sensitive; routes keep their domain
    source = path or EMBEDDED
    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f, source=path)
        except OSError as e:
            raise ConfigError(path, None, None, f"cannot read: {e.strerror}")
        except configparser.Error as e:
            raise ConfigError(path, None, None, str(e).splitlines()[0])
        except UnicodeDecodeError:
            raise ConfigError(path, None, None, "not UTF-8 text")

    values: dict[str, SimpleNamespace] = {}
    listeners: list[Listener] = []
    routes: dict[str, tuple[str, int]] = {}
    tls_policy: dict[str, str] = {}
    ldap_attributes: dict[str, str] = {}
    for section in parser.sections():
        if section.startswith("listener:"):
            listeners.append(_listener(source, section, parser[section]))
        elif section == "routes":
            routes = _routes(source, parser[section])
        elif section == "tls_policy":
            tls_policy = _tls_policy(source, parser[section])
        elif section == "ldap.attributes":
            ldap_attributes = _ldap_attributes(source, parser[section])
        elif section not in SCHEMA:
            known = ", ".join([*SCHEMA, "ldap.attributes", "routes", "tls_policy",
                               "listener:NAME"])
            raise ConfigError(source, section, None, f"unknown section (known: {known})")
    for section, keys in SCHEMA.items():
        raw = parser[section] if parser.has_section(section) else {}
        values[section] = _section(source, section, keys, raw)
    if not listeners:
        listeners = [
            Listener(name, spec["endpoint"], spec["tls"], False)
            for name, spec in DEFAULT_LISTENERS.items()
        ]
    values["ldap"].attributes = ldap_attributes
    config = Config(source=source, listeners=listeners, routes=routes,
                    tls_policy=tls_policy, **values)
    _derive(config)
    return config


def _section(source: str, section: str, keys: dict, raw) -> SimpleNamespace:
    for key in raw:
        if key not in keys:
            raise ConfigError(source, section, key, f"unknown setting (known: {', '.join(keys)})")
    out = {}
    for key, (parse, default) in keys.items():
        if key in raw:
            try:
                out[key] = parse(raw[key])
            except ValueError as e:
                raise ConfigError(source, section, key, str(e))
        else:
            out[key] = default
    return SimpleNamespace(**out)


def _listener(source: str, section: str, raw) -> Listener:
    name = section.partition(":")[2].strip()
    if not name:
        raise ConfigError(source, section, None, "a listener needs a name: [listener:NAME]")
    ns = _section(source, section, LISTENER_KEYS, raw)
    if not ns.endpoint:
        raise ConfigError(source, section, "endpoint", "missing (example: tcp:587)")
    if ns.endpoint.startswith("ssl:") and ns.tls == "starttls":
        raise ConfigError(
            source, section, "tls", "an ssl: endpoint is already implicit TLS; set tls = implicit"
        )
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, ns.endpoint)
    except Exception as e:
        # Parsing an ssl: endpoint reads its key and certificate: OSError, OpenSSL errors.
        raise ConfigError(source, section, "endpoint", f"{ns.endpoint!r}: {e}")
    _check_proxy(source, section, ns)
    return Listener(name, ns.endpoint, ns.tls, ns.plaintext_auth, ns.proxy_protocol,
                    ns.proxy_from, ns.proxy_timeout)


def _check_proxy(source: str, section: str, ns: SimpleNamespace) -> None:
    if not ns.proxy_protocol:
        if ns.proxy_from:
            raise ConfigError(source, section, "proxy_from",
                              "only means something with proxy_protocol = yes")
        return
    if not ns.proxy_from:
        raise ConfigError(source, section, "proxy_protocol",
                          "yes needs proxy_from, the load balancers' networks")
    if ns.endpoint.partition(":")[0].strip().lower() not in PROXY_ENDPOINTS:
        raise ConfigError(source, section, "proxy_protocol",
                          "needs a tcp:, tcp6: or ssl: endpoint")
    if ns.proxy_timeout <= 0:
        raise ConfigError(source, section, "proxy_timeout", "must be more than 0")


def _routes(source: str, raw) -> dict[str, tuple[str, int]]:
    routes = {}
    parse = hostport(25)
    for domain, target in raw.items():
        try:
            name = to_ascii_domain(domain)  # bücher.de and xn--bcher-kva.de: one route
        except ScopeError:
            name = ""
        if not is_domain(name):
            raise ConfigError(source, "routes", domain, "not a valid domain name")
        try:
            routes[name] = parse(target)
        except ValueError as e:
            raise ConfigError(source, "routes", domain, str(e))
    return routes


TLS_LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "verify")  # delivery/dane.py


def _tls_policy(source: str, raw) -> dict[str, str]:
    policy = {}
    for domain, level in raw.items():
        if not is_domain(domain.removeprefix(".")):
            raise ConfigError(source, "tls_policy", domain,
                              "not a valid domain name (or .parent.domain)")
        level = level.strip().lower()
        if level not in TLS_LEVELS:
            raise ConfigError(source, "tls_policy", domain,
                              f"{level!r} is not one of {', '.join(TLS_LEVELS)}")
        policy[domain.lower()] = level
    return policy


def _ldap_attributes(source: str, raw) -> dict[str, str]:
    from mailrelay.directory.ldap_mapping import attribute_names

    out = {key: value.strip() for key, value in raw.items()}
    for key, value in out.items():
        try:
            attribute_names({key: value})
        except ValueError as e:
            raise ConfigError(source, "ldap.attributes", key, str(e))
    return out


# Where the relay keeps its files under [server] data_dir when a setting names no other
# place: derived here, once, by _derive; every other module reads the setting itself.
DATA_FILES = (
    ("directory", "file", "users.json"),
    ("directory", "logins_db", "logins.sqlite"),
    ("spool", "directory", "spool"),
    ("tls", "certificate", "tls/cert.pem"),
    ("tls", "key", "tls/key.pem"),
    ("features", "suppressions_db", "suppressions.sqlite"),
    ("features", "stats_db", "stats.sqlite"),
    ("features", "archive_dir", "archive"),
    ("tracking", "key_file", "tracking.key"),
    ("admin", "access_file", "admin.json"),
    ("admin", "key_file", "panel.key"),
    ("dkim", "directory", "dkim"),
    ("bounces", "key_file", "bounce.key"),
    ("bounces", "db", "bounces.sqlite"),
    ("webhooks", "db", "webhooks.sqlite"),
    ("delivery", "mta_sts_cache", "mta-sts"),
    ("delivery", "tls_report_dir", "tls-rpt"),
)


def _derive(config: Config) -> None:
    """Fill the defaults that depend on other settings, and check cross-setting rules."""
    s = config.server
    s.data_dir = os.path.abspath(os.path.expanduser(s.data_dir))
    s.hostname = s.hostname or socket.getfqdn()
    s.postmaster = s.postmaster or f"postmaster@{s.hostname}"
    config.tls.generate = not config.tls.certificate and not config.tls.key
    if bool(config.tls.certificate) != bool(config.tls.key):
        raise ConfigError(
            config.source, "tls", "key", "set both certificate and key, or neither (self-signed)"
        )
    for section, key, name in DATA_FILES:
        settings = getattr(config, section)
        setattr(settings, key, getattr(settings, key) or os.path.join(s.data_dir, name))
    if config.policy.ip_auth is None:
        config.policy.ip_auth = _ip_auth("")
    if config.policy.address_auth is None:
        config.policy.address_auth = _address_auth("")
    # The relay's control socket (control.py); sun_path holds 107 bytes and its NUL.
    s.control_socket = os.path.join(s.data_dir, "control.sock")
    if len(os.fsencode(s.control_socket)) > 107:
        raise ConfigError(config.source, "server", "data_dir",
                          f"{s.data_dir!r} is too long for the control socket in it "
                          "(at most 94 bytes)")
    d = config.delivery
    if d.mode == "smarthost" and d.smarthost is None:
        raise ConfigError(config.source, "delivery", "smarthost", "required when mode = smarthost")
    for domain, level in config.tls_policy.items():
        if level == "dane-only" and (d.mode != "mx" or domain in config.routes):
            raise ConfigError(config.source, "tls_policy", domain,
                              "dane-only needs MX delivery (a smarthost or a route has no "
                              "DNSSEC-validated MX records to start from)")
    if d.retry_max < d.retry_first:
        raise ConfigError(config.source, "delivery", "retry_max", "must be >= retry_first")
    if config.directory.backend == "ldap" and not config.ldap.base_dn:
        raise ConfigError(config.source, "ldap", "base_dn", "required when backend = ldap")
    p = config.policy
    if p.login_delay_after > p.login_block_after:
        raise ConfigError(config.source, "policy", "login_delay_after",
                          f"{p.login_delay_after} is more than login_block_after "
                          f"({p.login_block_after}): logins are slowed down before they are "
                          "blocked")  # fmt: skip
    if config.admin.enabled:
        _check_endpoint(config, "admin", config.admin.endpoint)
    if config.bounces.endpoint:
        _check_endpoint(config, "bounces", config.bounces.endpoint)
    config.bounces.mx_host = (config.bounces.mx_host or s.hostname).lower().rstrip(".")
    if config.cluster.redis and config.cluster.lease_time < 3:
        raise ConfigError(config.source, "cluster", "lease_time", "at least 3s")
    _derive_features(config)
    if config.metrics.enabled and config.metrics.endpoint != "admin":
        _check_endpoint(config, "metrics", config.metrics.endpoint)


def _check_endpoint(config: Config, section: str, endpoint: str) -> None:
    """An endpoint string Twisted can listen on (it is only parsed here, not listened on)."""
    from twisted.internet import endpoints, reactor

    try:
        endpoints.serverFromString(reactor, endpoint)
    except Exception as e:
        raise ConfigError(config.source, section, "endpoint", f"{endpoint!r}: {e}")


def _derive_features(config: Config) -> None:
    f, t = config.features, config.tracking
    for kind in ("text", "html"):
        if getattr(f, f"footer_{kind}") and getattr(f, f"footer_{kind}_file"):
            raise ConfigError(config.source, "features", f"footer_{kind}_file",
                              f"set footer_{kind} or footer_{kind}_file, not both")
    if t.unsubscribe_mailto and not is_address(t.unsubscribe_mailto):
        raise ConfigError(config.source, "tracking", "unsubscribe_mailto",
                          f"{t.unsubscribe_mailto!r} is not an address")
    if t.enabled:
        _check_endpoint(config, "tracking", t.endpoint)
    if t.base_url:
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", t.base_url):
            raise ConfigError(config.source, "tracking", "base_url",
                              f"{t.base_url!r} is not an http(s) URL without query")
        t.base_url = t.base_url.rstrip("/")
    else:
        m = re.match(r"(?:tcp6?|ssl):(\d+)", t.endpoint)
        port = m.group(1) if m else "8081"
        scheme = "https" if t.endpoint.startswith("ssl:") else "http"
        t.base_url = f"{scheme}://{config.server.hostname}:{port}"
