"""The control panel for tests: the real site on a loopback port, over a real user file,
spool, SQLite stores and a loopback DNS server, with an HTTP client (twisted.web Agent).

In-process, for trial tests::

    panel = yield Panel.start(tmp_dir)     # listening; panel.url, panel.rw_key, panel.ro_key
    code, headers, doc = yield panel.call("GET", "/api/v1/users")
    yield panel.stop()

As a process of its own (tests/panel_server.py), for clients that block::

    with panel_process(tmp_path) as info:  # info["url"], info["keys"], ...
        ...
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

from dns_server import DNSServer
from harness import env, stop_process, wait_for
from twisted.internet import defer, endpoints, reactor
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from mailrelay.auth.passwords import hash_password
from mailrelay.config import load_config
from mailrelay.directory import open_directory
from mailrelay.directory.filedir import UserStore
from mailrelay.features.stats import StatsStore
from mailrelay.features.suppressions import SuppressionStore
from mailrelay.manage.access import Access, AccessStore, access_path
from mailrelay.model import Account, SmtpUser
from mailrelay.scope import Scope
from mailrelay.spool.spool import Spool
from mailrelay.web.site import make_admin_site, make_services, make_verifier

PASSWORD = "initial-password"
ADMIN_PASSWORD = "admin-password-1"


def write_config(directory: str, dns_port: int, extra: str = "") -> str:
    path = os.path.join(directory, "mailrelay.ini")
    with open(path, "w") as f:
        f.write(
            f"[server]\nhostname = relay.test\ndata_dir = {directory}/data\n\n"
            f"[delivery]\ndns_servers = 127.0.0.1:{dns_port}\n\n"
            "[policy]\nip_auth = 127.0.0.2/32 = app; 2001:db8::/32 = doe.test\n"
            "address_auth = printer@doe.test\n" + extra
        )
    return path


def seed(config) -> dict[str, str]:
    """Accounts, users (added as mailrelay-admin would: verified), two API keys, an admin."""
    store = UserStore(config.directory.file)
    with store.change():
        store.update_account("default", domains=frozenset({"doe.test", "shop.test", "new.test",
                                                           "other.test"}))
        store.add_account(Account("acme", frozenset({"acme.test"}), "ops@acme.test", "Acme"))
        password_hash = hash_password(PASSWORD)
        store.add_user(SmtpUser("doe.test", note="office"), password_hash)
        store.add_user(SmtpUser("webapp", scope=Scope.parse("shop.test", "")), password_hash)
        store.add_user(SmtpUser("news@acme.test", account="acme"), password_hash)
    access = AccessStore(access_path(config))
    with access.change():
        keys = {"rw": access.add_key("automation", Access.READ_WRITE),
                "ro": access.add_key("monitoring", Access.READ_ONLY)}  # fmt: skip
        access.set_admin("alice", hash_password(ADMIN_PASSWORD), new=True)
    return keys


def listen_dns(tries: int = 10) -> DNSServer:
    """A started DNSServer. Its listen() reuses one UDP protocol across its own retries
    (an AssertionError when the first UDP port is taken for TCP): start afresh instead."""
    for _ in range(tries):
        server = DNSServer({})
        try:
            server.listen()
            return server
        except AssertionError:
            continue
    raise RuntimeError("no port for the DNS server")


class Panel:
    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.agent = Agent(reactor)

    @classmethod
    @defer.inlineCallbacks
    def start(cls, directory: str, extra_config: str = "", directory_override=None,
              logins=None):  # fmt: skip
        """``logins``: the LoginGuard of the web login (default: one of the panel's own)."""
        self = cls(directory)
        self.dns = listen_dns()
        self.config = load_config(write_config(directory, self.dns.address[1], extra_config))
        self.keys = seed(self.config) if directory_override is None else {}
        self.spool = Spool(self.config.spool.directory, reactor=reactor)
        self.spool.open()
        self.directory = directory_override or open_directory(self.config, reactor)
        self.suppressions = SuppressionStore(os.path.join(directory, "data", "supp.sqlite"))
        self.stats = StatsStore(os.path.join(directory, "data", "stats.sqlite"))
        self.verifier = make_verifier(self.config, self.spool, reactor)
        self.services = make_services(self.config, self.directory, self.spool,
                                      self.suppressions, self.stats, reactor,
                                      verifier=self.verifier)  # fmt: skip
        endpoint = endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = yield endpoint.listen(make_admin_site(self.services, logins=logins))
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        if self.verifier is not None:
            self.verifier.base_url = self.url
        return self

    @property
    def rw_key(self) -> str:
        return self.keys["rw"]

    @property
    def ro_key(self) -> str:
        return self.keys["ro"]

    @defer.inlineCallbacks
    def stop(self):
        yield self.port.stopListening()
        yield self.dns.stop()
        yield self.spool.close()
        self.suppressions.close()
        self.stats.close()
        close = getattr(self.directory, "close", None)
        if close is not None:
            close()

    @defer.inlineCallbacks
    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None):  # fmt: skip
        """(code, headers, body bytes)."""
        raw = Headers({k.encode(): [v.encode()] for k, v in (headers or {}).items()})
        producer = FileBodyProducer(BytesIO(body)) if body is not None else None
        response = yield self.agent.request(method.encode(), (self.url + path).encode(), raw,
                                            producer)  # fmt: skip
        content = yield readBody(response)
        return response.code, response.headers, content

    @defer.inlineCallbacks
    def call(self, method: str, path: str, doc: Any = None, key: str | None = "rw",
             headers: dict[str, str] | None = None):  # fmt: skip
        """An API call: (code, headers, parsed JSON or None). ``key``: "rw", "ro", None or
        a literal key."""
        h = dict(headers or {})
        if key is not None:
            h["authorization"] = f"Bearer {self.keys.get(key, key)}"
        body = None
        if doc is not None:
            body = json.dumps(doc).encode()
            h.setdefault("content-type", "application/json")
        code, response_headers, content = yield self.request(method, path, body, h)
        parsed = json.loads(content) if content else None
        return code, response_headers, parsed


@contextlib.contextmanager
def panel_process(directory: Path) -> Iterator[dict[str, Any]]:
    """tests/panel_server.py seeded in ``directory``: yields what it wrote to its info file
    (url, keys, admin login, paths) once it answers, and stops it by its PID."""
    info_file = directory / "panel.json"
    with open(directory / "panel.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("panel_server.py")),
             str(directory / "panel"), str(info_file)], env=env(), stdout=log, stderr=log,
        )  # fmt: skip
    try:

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError((directory / "panel.log").read_text())
            return info_file.exists()

        wait_for(ready, what="the panel server")
        yield json.loads(info_file.read_text())
    finally:
        stop_process(process)
