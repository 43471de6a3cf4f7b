"""The configuration: defaults, and one clear ConfigError per bad setting."""

from __future__ import annotations

import os
import textwrap

import pytest

from mailrelay.config import DEFAULT_DATA_DIR, ConfigError, Listener, load_config


@pytest.fixture
def write(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "mailrelay.ini"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return str(path)

    return write


def test_embedded_defaults():
    config = load_config(None)
    assert config.source == "<embedded defaults>"
    assert config.server.data_dir == DEFAULT_DATA_DIR
    assert config.server.hostname
    assert config.server.postmaster == f"postmaster@{config.server.hostname}"
    assert config.limits.max_message_size == 50 * 2**20
    assert config.limits.max_recipients == 400
    assert config.limits.max_messages_per_connection == 2500
    assert config.directory.backend == "file"
    assert config.directory.file == os.path.join(DEFAULT_DATA_DIR, "users.json")
    assert config.directory.login_cache_ttl == 60.0
    assert config.spool.directory == os.path.join(DEFAULT_DATA_DIR, "spool")
    assert config.tls.generate
    assert config.tls.certificate == os.path.join(DEFAULT_DATA_DIR, "tls", "cert.pem")
    assert config.listeners == [
        Listener("smtp", "tcp:2525:interface=127.0.0.1", "starttls", False),
        Listener("smtps", "tcp:8465:interface=127.0.0.1", "implicit", False),
    ]
    assert config.routes == {}


def test_empty_file_is_the_defaults(write):
    config = load_config(write(""))
    assert config.limits.max_recipients == 400
    assert len(config.listeners) == 2


def test_values_are_parsed(write, tmp_path):
    config = load_config(
        write(
            f"""
            [server]
            hostname = relay.example.org
            data_dir = {tmp_path}/data
            [limits]
            max_message_size = 10M
            idle_timeout = 5m
            [directory]
            login_cache_ttl = 30s
            [delivery]
            mode = smarthost
            smarthost = [2001:db8::1]:587
            smarthost_verify = no
            dns_servers = 127.0.0.1:5353, ::1
            retry_max = 2h
            """
        )
    )
    assert config.server.postmaster == "postmaster@relay.example.org"
    assert config.directory.file == f"{tmp_path}/data/users.json"
    assert config.limits.max_message_size == 10 * 2**20
    assert config.limits.idle_timeout == 300.0
    assert config.directory.login_cache_ttl == 30.0
    assert config.delivery.smarthost == ("2001:db8::1", 587)
    assert config.delivery.smarthost_verify is False
    assert config.delivery.dns_servers == [("127.0.0.1", 5353), ("::1", 53)]
    assert config.delivery.retry_max == 7200.0


def test_relative_data_dir_is_made_absolute(write):
    config = load_config(write("[server]\ndata_dir = data\n"))
    assert config.server.data_dir == os.path.abspath("data")


def test_every_file_under_data_dir_is_derived_in_the_configuration(write, tmp_path):
    """Each file the relay keeps is a setting of the loaded configuration, under data_dir
    unless the setting names another place; nothing else derives them."""
    data = f"{tmp_path}/data"
    config = load_config(write(f"[server]\ndata_dir = {data}\n"))
    assert (config.directory.file, config.spool.directory, config.tls.certificate,
            config.tls.key, config.server.control_socket) == (
        f"{data}/users.json", f"{data}/spool", f"{data}/tls/cert.pem", f"{data}/tls/key.pem",
        f"{data}/control.sock")
    assert (config.features.suppressions_db, config.features.stats_db,
            config.features.archive_dir, config.admin.access_file) == (
        f"{data}/suppressions.sqlite", f"{data}/stats.sqlite", f"{data}/archive",
        f"{data}/admin.json")
    assert (config.tracking.key_file, config.admin.key_file) == (
        f"{data}/tracking.key", f"{data}/panel.key")
    config = load_config(write(f"[server]\ndata_dir = {data}\n[admin]\n"
                               f"access_file = {tmp_path}/a.json\nkey_file = {tmp_path}/p.key\n"))
    assert (config.admin.access_file, config.admin.key_file) == (
        f"{tmp_path}/a.json", f"{tmp_path}/p.key")


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("limits", "max_message_size", "big", "is not a size"),
        ("limits", "max_recipients", "0", "outside 1..100000"),
        ("limits", "max_recipients", "many", "not a whole number"),
        ("limits", "idle_timeout", "soon", "is not a duration"),
        ("directory", "backend", "sql", "is not one of file, ldap"),
        ("directory", "login_cache_ttl", "-1", "is not a duration"),
        ("ldap", "start_tls", "maybe", "is not yes or no"),
        ("ldap", "pool_size", "65", "outside 1..64"),
        ("delivery", "smarthost", "relay.example.org:0", "outside 1..65535"),
        ("delivery", "smarthost", "a b", "is not host or host:port"),
        ("delivery", "port", "70000", "outside 1..65535"),
        ("delivery", "dns_servers", "127.0.0.1 ::zz", "write [v6]:port"),
        ("delivery", "mode", "carrier-pigeon", "is not one of mx, smarthost"),
        ("delivery", "nice", "20", "outside 0..19"),
        ("tls", "key_type", "dsa", "is not one of ecdsa, rsa"),
    ],
)
def test_bad_value_names_file_section_and_key(write, section, key, value, message):
    path = write(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert text.startswith(f"{path}: [{section}] {key}: ")
    assert message in text
    assert "\n" not in text


def test_unknown_section_lists_the_known_ones(write):
    path = write("[sever]\nhostname = x\n")
    with pytest.raises(ConfigError, match=r"\[sever\]: unknown section \(known: server, "):
        load_config(path)


def test_default_section_is_not_special(write):
    with pytest.raises(ConfigError, match=r"\[DEFAULT\]: unknown section"):
        load_config(write("[DEFAULT]\nhostname = x\n"))


def test_unknown_key_lists_the_known_ones(write):
    path = write("[limits]\nmax_size = 1M\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: [limits] max_size: unknown setting (known: ")
    assert "max_message_size" in str(e.value)


def test_keys_are_case_sensitive(write):
    with pytest.raises(ConfigError, match=r"\[directory\] Backend: unknown setting"):
        load_config(write("[directory]\nBackend = file\n"))


def test_unreadable_and_malformed_files(write, tmp_path):
    missing = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError, match=f"^{missing}: cannot read: No such file"):
        load_config(missing)
    with pytest.raises(ConfigError, match="no section headers"):
        load_config(write("hostname = x\n"))
    with pytest.raises(ConfigError, match="already exists"):
        load_config(write("[limits]\nmax_recipients = 1\nmax_recipients = 2\n"))
    path = tmp_path / "latin1.ini"
    path.write_bytes(b"[server]\nhostname = caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(str(path))


def test_cross_setting_rules(write):
    with pytest.raises(ConfigError, match=r"\[delivery\] smarthost: required when mode"):
        load_config(write("[delivery]\nmode = smarthost\n"))
    with pytest.raises(ConfigError, match=r"\[delivery\] retry_max: must be >= retry_first"):
        load_config(write("[delivery]\nretry_first = 2h\nretry_max = 1h\n"))
    with pytest.raises(ConfigError, match=r"\[ldap\] base_dn: required when backend = ldap"):
        load_config(write("[directory]\nbackend = ldap\n"))
    with pytest.raises(ConfigError, match=r"\[tls\] key: set both certificate and key"):
        load_config(write("[tls]\ncertificate = /etc/ssl/cert.pem\n"))


def test_own_certificate_turns_generation_off(write):
    config = load_config(write("[tls]\ncertificate = /c.pem\nkey = /k.pem\n"))
    assert not config.tls.generate
    assert (config.tls.certificate, config.tls.key) == ("/c.pem", "/k.pem")


def test_listener_sections_replace_the_defaults(write):
    config = load_config(
        write(
            """
            [listener:submission]
            endpoint = tcp:587
            [listener:submissions]
            endpoint = tcp:465
            tls = implicit
            [listener:lan]
            endpoint = tcp:2526:interface=10.0.0.1
            tls = none
            plaintext_auth = yes
            """
        )
    )
    assert config.listeners == [
        Listener("submission", "tcp:587", "starttls", False),
        Listener("submissions", "tcp:465", "implicit", False),
        Listener("lan", "tcp:2526:interface=10.0.0.1", "none", True),
    ]


@pytest.mark.parametrize(
    ("text", "where", "message"),
    [
        ("[listener:]\nendpoint = tcp:25\n", "[listener:]", "needs a name"),
        ("[listener:a]\ntls = none\n", "[listener:a] endpoint", "missing"),
        ("[listener:a]\nendpoint = tcp:abc\n", "[listener:a] endpoint", "'tcp:abc'"),
        ("[listener:a]\nendpoint = foo:1\n", "[listener:a] endpoint", "Unknown endpoint"),
        ("[listener:a]\nendpoint = tcp:25:bogus=1\n", "[listener:a] endpoint", "bogus"),
        ("[listener:a]\nendpoint = tcp:25\ntls = maybe\n", "[listener:a] tls", "not one of"),
        ("[listener:a]\nendpoint = tcp:25\nport = 25\n", "[listener:a] port", "unknown"),
        ("[listener:a]\nendpoint = ssl:465\n", "[listener:a] tls", "set tls = implicit"),
        (
            "[listener:a]\nendpoint = ssl:465:privateKey=/nonexistent/key.pem\ntls = implicit\n",
            "[listener:a] endpoint",
            "No such file",
        ),
    ],
)
def test_bad_listeners(write, text, where, message):
    path = write(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: {where}")
    assert message in str(e.value)


def test_ssl_listener_with_a_broken_key_is_a_config_error(write, tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    path = write(f"[listener:a]\nendpoint = ssl:465:privateKey={key}\ntls = implicit\n")
    with pytest.raises(ConfigError, match=r"\[listener:a\] endpoint: "):
        load_config(path)


def test_routes(write):
    config = load_config(write("[routes]\nExample.ORG = mx.example.org\nb.com = [::1]:2525\n"))
    assert config.routes == {"example.org": ("mx.example.org", 25), "b.com": ("::1", 2525)}
    config = load_config(write("[routes]\nBücher.de = mx.example.org\n"))
    assert config.routes == {"xn--bcher-kva.de": ("mx.example.org", 25)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[routes]\nnot_a_domain = mx.example.org\n", "not_a_domain: not a valid domain"),
        ("[routes]\nb\u00fc-.de = mx.example.org\n", "b\u00fc-.de: not a valid domain"),
        ("[routes]\nb.com =\n", "b.com: '' is not host or host:port"),
        ("[routes]\nb.com = mx:99999\n", "b.com: port 99999 is outside"),
    ],
)
def test_bad_routes(write, text, message):
    path = write(text)
    with pytest.raises(ConfigError, match=f"^{path}: \\[routes\\] {message}"):
        load_config(path)


# ---- mailrelay-admin check refuses what twistd refuses, with the same line ----

_LISTEN = "[listener:smtp]\nendpoint = tcp:0:interface=127.0.0.1\n[delivery]\nenabled = no\n"
_PANEL = "[admin]\nendpoint = tcp:0:interface=127.0.0.1\n"


def _broken_file(name: str, content: str):
    def make(data):
        data.mkdir(mode=0o700, exist_ok=True)
        (data / name).write_text(content)

    return make


def _newer_database(name: str):
    """A database file a newer mailrelay wrote: a schema version past this one's."""
    def make(data):
        import sqlite3

        data.mkdir(mode=0o700, exist_ok=True)
        db = sqlite3.connect(data / name)
        db.execute("CREATE TABLE later (x)")
        db.execute("PRAGMA user_version = 7")
        db.commit()
        db.close()

    return make


def _newer_postgres():
    """``[cluster] postgres`` naming a database a newer mailrelay wrote its users into."""
    import pg_server
    import psycopg

    dsn = pg_server.shared_server().create_database()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE mailrelay_schema (component TEXT PRIMARY KEY, "
                     "version INTEGER NOT NULL)")
        conn.execute("INSERT INTO mailrelay_schema VALUES ('users', 99)")
    return f"[admin]\nenabled = no\n[cluster]\npostgres = {dsn}\n"


@pytest.mark.parametrize("settings, make", [
    ("[admin]\nenabled = no\n[policy]\nlogin_delay_after = 20\nlogin_block_after = 10\n", None),
    ("[admin]\nendpoint = bogus:8080\n", None),
    (_PANEL, _broken_file("admin.json", '{"version": 1, "admins": {"x": {}}}')),
    ("[admin]\nenabled = no\n", _broken_file("stats.sqlite", "not a database " * 100)),
    (_PANEL + "key_file = {tmp}\n", None),
    ("[admin]\nenabled = no\n", _newer_database("suppressions.sqlite")),
    ("[admin]\nenabled = no\n", _broken_file("quota.sqlite", "not a database " * 100)),
    # Nothing listens on port 1 of the loopback.
    ("[admin]\nenabled = no\n[cluster]\npostgres = postgresql://mailrelay@127.0.0.1:1/x\n",
     None),
    (_newer_postgres, None),
], ids=["login-delay-after-block", "admin-endpoint", "access-file", "stats-db",
        "key-file", "newer-schema", "quota-db", "postgres-unreachable",
        "postgres-newer-schema"])  # fmt: skip
def test_check_refuses_what_twistd_refuses_with_the_same_line(tmp_path, settings, make):
    import subprocess
    import sys

    from harness import env, run_twistd

    data = tmp_path / "data"
    if callable(settings):
        settings = settings()
    text = (f"[server]\nhostname = relay.test\ndata_dir = {data}\n{_LISTEN}"
            + settings.format(tmp=tmp_path))  # fmt: skip
    if make is not None:
        make(data)
    config = tmp_path / "mailrelay.ini"
    config.write_text(text)
    check = subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c", str(config),
                            "check"], capture_output=True, text=True, env=env(), timeout=60)
    started = run_twistd(tmp_path, text)
    assert started.returncode != 0 and check.returncode != 0, check.stdout
    assert "Traceback" not in started.stderr + check.stderr
    (refused,) = started.stderr.strip().splitlines()
    assert refused.startswith("mailrelay: ")
    assert check.stderr.strip().splitlines() == ["mailrelay-admin: " + refused[len("mailrelay: "):]]
