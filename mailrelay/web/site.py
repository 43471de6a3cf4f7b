"""The control panel's listener: the API at /api/v1, the web admin page everywhere else,
and /metrics when ``[metrics]`` is served here (mailrelay/metrics/web.py).

``make_admin_site`` builds the twisted.web Site from plain objects (what tests use);
``make_admin_service`` reads the ``[admin]`` settings and builds the listening service
(what mailrelay.service calls).
"""

from __future__ import annotations

import sqlite3
from types import SimpleNamespace

from twisted.application.service import IService, MultiService
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server

from mailrelay.auth.ipauth import AddressAuth, IpAuthTable
from mailrelay.config import SCHEMA
from mailrelay.features.archive import Archive
from mailrelay.listener import ListenerService
from mailrelay.manage.access import AccessError, AccessFile, access_path
from mailrelay.manage.dkim import keys_of_config
from mailrelay.manage.queue import QueueControl, QueueReader
from mailrelay.manage.stores import threaded, user_store
from mailrelay.manage.suppressions import SuppressionLists
from mailrelay.manage.users import UserManager, forget_account, forget_user
from mailrelay.policy.bruteforce import LoginGuard
from mailrelay.web import api as api_module
from mailrelay.web.confirm import ConfirmPages
from mailrelay.web.ops import Services
from mailrelay.web.pages import Panel
from mailrelay.web.routing import MAX_BODY, HttpError, run_handler
from mailrelay.web.sessions import Sessions

log = Logger()

# [admin] settings and their defaults (the configuration's schema should hold the same).
# The [admin] settings and their defaults are declared once, in the config schema.
DEFAULTS = {key: default for key, (_parse, default) in SCHEMA["admin"].items()}


class AdminRoot(resource.Resource):
    """One leaf resource: routes /api/v1/... to the API and the rest to the web page."""

    isLeaf = True

    def __init__(self, api: api_module.Api, panel: Panel, metrics=None) -> None:
        super().__init__()
        self.api = api
        self.panel = panel
        self.metrics = metrics  # the /metrics resource, or None

    def render(self, request):
        if self.metrics is not None and request.path == b"/metrics":
            return self.metrics.render(request)
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"same-origin")
        path = request.path.decode("utf-8", "replace")
        is_api = path == api_module.PREFIX or path.startswith(api_module.PREFIX + "/")
        on_error = api_module.error_response if is_api else self.panel.error_page
        length = request.getHeader(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return run_handler(request, _refuse(HttpError(413, "the body is too large")),
                               on_error)  # fmt: skip
        if is_api:
            sub = path[len(api_module.PREFIX):] or "/"
            return run_handler(request, lambda: self.api.dispatch(request, sub), on_error)
        return run_handler(request, lambda: self.panel.dispatch(request, path), on_error)


def _refuse(error: HttpError):
    async def respond():
        raise error

    return respond


def make_admin_site(
    services: Services, secure_cookies: bool = False, session_lifetime: float = 8 * 3600.0,
    logins: LoginGuard | None = None, metrics=None,
) -> server.Site:
    """``logins``: the daemon's LoginGuard (without one, a LoginGuard of the panel's own
    with the default settings); ``metrics``: the resource served at /metrics, if any."""
    def credentials(name: str) -> str | None:
        admin = services.access.current().admins.get(name)
        return None if admin is None else admin.fingerprint

    sessions = Sessions(services.reactor, session_lifetime, secure_cookies, credentials)
    panel = Panel(services, sessions, ConfirmPages(services),
                  logins or LoginGuard(services.reactor))  # fmt: skip
    site = server.Site(AdminRoot(api_module.Api(services), panel, metrics))
    site.displayTracebacks = False
    site.noisy = False  # no "Starting factory <...Site object at 0x...>": "Site starting on"
    return site


def admin_settings(config) -> SimpleNamespace:
    """``config.admin`` with every key present (the defaults above for missing ones)."""
    section = getattr(config, "admin", None)
    return SimpleNamespace(**{k: getattr(section, k, v) for k, v in DEFAULTS.items()})


def public_url(settings: SimpleNamespace, hostname: str) -> str:
    """``public_url``, or http(s)://<hostname>:<port of the endpoint>."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    parts = settings.endpoint.split(":")
    port = parts[1] if len(parts) > 1 and parts[1].isdigit() else "8080"
    return f"{'https' if settings.tls else 'http'}://{hostname}:{port}"


def make_services(config, directory, spool, suppressions, stats, reactor, control=None,
                  verifier=None) -> Services:  # fmt: skip
    """The panel's Services from the relay's parts (the file directory is writable, LDAP
    is not); ``control``: the relay's IQueueControl (without one, a QueueControl with no
    delivery)."""
    from mailrelay.delivery.router import make_resolver

    settings = admin_settings(config)
    call = threaded(reactor)

    archive = Archive(config.features.archive_dir)

    def forget(username: str, when: float):
        return forget_user(suppressions, stats, username, when, archive)

    def forget_gone_account(name: str, when: float):
        return forget_account(suppressions, stats, name, when)

    manager = UserManager(user_store(directory, config.directory.file, call), call, forget,
                          reactor, settings.verify_senders,
                          forget_account=forget_gone_account)  # fmt: skip
    policy = getattr(config, "policy", None)
    return Services(
        directory=directory,
        manager=manager,
        queue=QueueReader(spool, reactor, call),
        control=control or QueueControl(spool, reactor),
        suppressions=SuppressionLists(suppressions, call),
        stats=stats,
        access=open_access(config, reactor),
        verifier=verifier,
        ip_auth=getattr(policy, "ip_auth", None) or IpAuthTable(),
        address_auth=getattr(policy, "address_auth", None) or AddressAuth(),
        reactor=reactor,
        dkim=keys_of_config(config, call),  # RSA generation in the thread pool
        resolver=make_resolver(getattr(getattr(config, "delivery", None), "dns_servers", []),
                               reactor),  # fmt: skip
        config=config,
        last_logins=open_last_logins(config),
        webhooks=open_webhooks(config, call),
    )


def open_webhooks(config, call):
    """The IWebhooks the panel manages (None when ``[webhooks]`` is off)."""
    w = getattr(config, "webhooks", None)
    if w is None or not w.enabled:
        return None
    from mailrelay.manage.webhooks import Webhooks
    from mailrelay.service import open_webhooks as open_store

    return Webhooks(open_store(config), call, w.allow_private, w.secret_overlap)


def open_last_logins(config):
    """The relay's record of last logins, for reading (None when it cannot be opened: the
    users are shown without it)."""
    from mailrelay.auth.lifecycle import LoginStore, shared_login_store

    path = getattr(getattr(config, "directory", None), "logins_db", None)
    if not path:
        return None
    try:
        return shared_login_store(config) or LoginStore(path)
    except (sqlite3.Error, OSError) as e:
        log.warn("last logins unavailable ({path}): {error}", path=path, error=str(e))
        return None


def open_access(config, clock):
    """What the panel reads its admins and keys from: the tables of ``[cluster] postgres``
    (postgres/access.py, a service: it listens for changes) or the access file (re-read
    when it changes); StartupError when what is there now cannot be used."""
    from mailrelay.postgres.db import UNAVAILABLE, of_config
    from mailrelay.service import StartupError

    try:
        db = of_config(config)
    except UNAVAILABLE as e:
        raise StartupError(f"[cluster] postgres: the admin access cannot be read: "
                           f"{str(e).strip()}")
    try:
        if db is not None:
            from mailrelay.postgres.access import PgAccessView

            return PgAccessView(db, clock)
        return AccessFile(access_path(config), clock)
    except AccessError as e:
        where = "[cluster] postgres: admin access" if db is not None else "[admin] access_file"
        raise StartupError(f"{where} {e}")


def verification_key_file(config) -> str:
    return config.admin.key_file  # by default <data_dir>/panel.key (config.DATA_FILES)


def make_verifier(config, spool, reactor):
    """The Verifier for ``[admin] verify_senders`` (None when it is off): links signed with
    the key file, TXT lookups through ``[delivery] dns_servers`` (or the system's)."""
    from mailrelay.delivery.router import make_resolver
    from mailrelay.verification import VerificationTokens, Verifier

    settings = admin_settings(config)
    if not settings.verify_senders:
        return None
    from mailrelay.service import read_key_file

    delivery = getattr(config, "delivery", None)
    return Verifier(
        VerificationTokens(read_key_file("admin", verification_key_file(config), config)),
        spool,
        make_resolver(getattr(delivery, "dns_servers", []), reactor),
        public_url(settings, config.server.hostname),
        config.server.hostname,
        config.server.postmaster,
        reactor,
        settings.verify_link_lifetime,
    )


def make_admin_service(config, directory, spool, suppressions, stats, tls_options=None,
                       control=None, reactor=None, logins=None,
                       metrics=None) -> MultiService:  # fmt: skip
    """The panel's listener and its periodic DNS check, from ``[admin]``; an empty
    MultiService when ``enabled = no``. ``tls_options``: the relay's server TLS options
    (needed when ``tls = yes``); ``control``: the relay's IQueueControl (retry, flush, delete);
    ``logins``: the relay's LoginGuard (without one, a new one from ``[policy]``);
    ``metrics``: the resource served at /metrics (None: none)."""
    if reactor is None:
        from twisted.internet import reactor
    from mailrelay.web.domaincheck import DomainChecker

    top = MultiService()
    settings = admin_settings(config)
    if not settings.enabled:
        return top
    verifier = make_verifier(config, spool, reactor)
    services = make_services(config, directory, spool, suppressions, stats, reactor, control,
                             verifier)  # fmt: skip
    if logins is None:
        from mailrelay.service import login_guard

        logins = login_guard(config, reactor)
    if IService.providedBy(services.access):  # listens for changes made on other nodes
        services.access.setServiceParent(top)
    site = make_admin_site(services, settings.tls, settings.session_lifetime, logins, metrics)
    factory = TLSMemoryBIOFactory(tls_options, False, site) if settings.tls else site
    ListenerService("admin", settings.endpoint, factory, reactor).setServiceParent(top)
    if verifier is not None and services.users is not None and settings.dns_check_interval > 0:
        DomainChecker(services, settings.dns_check_interval, reactor).setServiceParent(top)
    return top
