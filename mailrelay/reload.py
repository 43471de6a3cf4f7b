"""SIGHUP: the configuration file read again, and what can change without a restart changed
in place (``kill -HUP PID``, or ``systemctl reload mailrelay``).

Without a handler, SIGHUP's default action ended the relay with no line in its log, so a
sysadmin's reflex took the service down. Now:

- ``[limits]`` (all but ``rate_counts``), ``[policy]``: in force for the next command of
  every session, open ones included; failed logins counted and addresses blocked stay so.
- ``[tls] certificate``, ``key``, ``ciphers``: read again even when unchanged (a renewed
  certificate at the same path). New TLS handshakes, on every listener and the panel's
  HTTPS, present it; a connection already in TLS keeps the one it began with, so no session
  is dropped.
- ``[routes]``: the delivery process reads the file again (it gets SIGHUP in turn).

A listener, or any other setting, that differs from the one in force is named in a warning
(``... changed: takes effect after a restart``) and the rest is applied. A file that would
stop startup (a setting, an unreadable certificate or key, a key that does not match its
certificate) changes nothing, and one error line says why. The file is read by the relay's
own user (after twistd's ``--uid``): it must be readable by that user.
"""

from __future__ import annotations

import dataclasses
import signal
from types import SimpleNamespace
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger

from mailrelay.config import EMBEDDED, SCHEMA, Config, ConfigError, load_config
from mailrelay.sdnotify import notify

log = Logger()

RELOADED = ("limits", "policy", "tls")  # sections applied in place, with [routes]
RESTART_ONLY = {("limits", "rate_counts"),  # counted units cannot change under reservations
                ("policy", "dormant_after")}  # the dormancy job is made at start-up


@dataclasses.dataclass
class Live:
    """The parts of a running relay that a reload changes (service.make_service)."""

    config: Config  # the configuration in force
    factories: list  # smtp.factory.SubmissionFactory, one per listener
    policy: Any  # policy.submission.SubmissionPolicy
    portal: Any  # the Cred portal (IP and address authentication)
    tls_options: Any  # tls.ServerOptions of the listeners and the panel
    delivery: Any = None  # delivery.process.DeliveryProcess, or None


def _plain(value: Any) -> Any:
    """A value settings can be compared by (tables compare by their contents)."""
    if isinstance(value, (str, int, float, bool, type(None), list, tuple, dict)):
        return value
    return vars(value) if hasattr(value, "__dict__") else repr(value)


def _changed(old: SimpleNamespace, new: SimpleNamespace) -> list[str]:
    return [key for key in vars(new)
            if _plain(getattr(old, key, None)) != _plain(getattr(new, key))]


def needs_restart(old: Config, new: Config) -> list[str]:
    """What differs between ``old`` and ``new`` that only a restart puts in force."""
    found = []
    listeners = {listener.name: listener for listener in old.listeners}
    for listener in new.listeners:
        if listeners.pop(listener.name, None) != listener:
            found.append(f"[listener:{listener.name}]")
    found += [f"[listener:{name}]" for name in listeners]
    for section in SCHEMA:
        keys = _changed(getattr(old, section), getattr(new, section))
        if section in RELOADED:
            keys = [key for key in keys if (section, key) in RESTART_ONLY]
        found += [f"[{section}] {key}" for key in keys]
    return found


def reloaded_settings(old: Config, new: Config) -> list[str]:
    """The settings a reload from ``old`` to ``new`` changes."""
    found = [f"[{section}] {key}" for section in RELOADED
             for key in _changed(getattr(old, section), getattr(new, section))
             if (section, key) not in RESTART_ONLY]
    if old.routes != new.routes:
        found.append("[routes]")
    return found


def reload(live: Live) -> bool:
    """Read the configuration again and apply it (see the module docstring); False when
    the file was refused and nothing changed."""
    from mailrelay.tls import TLSSetupError, server_options

    old = live.config
    try:
        new = load_config(None if old.source == EMBEDDED else old.source)
        t = new.tls
        tls = server_options(t.certificate, t.key, t.generate, old.server.hostname,
                             t.key_type, t.ciphers)
    except (ConfigError, TLSSetupError, OSError) as e:
        log.error("reload: {problem}; nothing changed", problem=str(e))
        return False
    for what in needs_restart(old, new):
        log.warn("reload: {what} changed: takes effect after a restart", what=what)
    changed = reloaded_settings(old, new)
    limits = SimpleNamespace(**{**vars(new.limits), "rate_counts": old.limits.rate_counts})
    _apply(live, limits, new.policy, tls)
    if live.delivery is not None and old.routes != new.routes:
        live.delivery.hangup()
    live.config = dataclasses.replace(old, limits=limits, policy=new.policy, tls=new.tls,
                                      routes=new.routes)
    cert = tls.certificate
    log.info("reloaded {source}: {changed}; TLS certificate {subject}, valid until {until}",
             source=old.source, changed=", ".join(changed) or "no setting changed",
             subject=cert.subject.rfc4514_string(),
             until=cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M:%S UTC"))
    return True


def _apply(live: Live, limits: SimpleNamespace, p: SimpleNamespace, tls) -> None:
    from mailrelay.auth.checkers import NetworkChecker, SenderAddressChecker
    from mailrelay.auth.credentials import IClientAddress, ISenderAddress

    for factory in live.factories:
        for key in ("max_message_size", "max_recipients", "max_messages_per_connection",
                    "idle_timeout", "data_timeout", "session_timeout"):
            setattr(factory, key, getattr(limits, key))
    connections = live.policy.connections
    connections.max_total = limits.max_connections
    connections.max_per_ip = limits.max_connections_per_ip
    connections.max_per_user = limits.max_connections_per_user
    connections.ipv6_prefix = p.ipv6_prefix
    rates = live.policy.rates
    rates.per_hour, rates.per_minute = limits.rate_per_hour, limits.rate_per_minute or None
    quotas = getattr(live.policy, "quotas", None)
    if quotas is not None:
        quotas.per_day, quotas.per_month = limits.quota_per_day, limits.quota_per_month
    live.policy.logins.configure(
        window=p.login_window, delay_after=p.login_delay_after,
        block_after=p.login_block_after, block_time=p.login_block_time,
        max_delay=p.login_max_delay, user_alert_after=p.login_user_alert_after,
        ipv6_prefix=p.ipv6_prefix)
    if live.policy.notifier is not None:
        live.policy.notifier.interval = p.notify_interval
    for interface, checker, table in ((IClientAddress, NetworkChecker, p.ip_auth),
                                      (ISenderAddress, SenderAddressChecker, p.address_auth)):
        if table:
            live.portal.registerChecker(checker(table), interface)
        else:
            live.portal.checkers.pop(interface, None)
    live.tls_options.use(tls)


def reload_routes(running: Config, manager, reactor) -> None:
    """In the delivery process (started with ``running``), on the SIGHUP the relay passes
    on: ``[routes]`` from the file again, over the MX or smarthost routing it started with
    (the rest of ``[delivery]`` needs a restart), for the messages routed from now on."""
    from mailrelay.delivery.destinations import Routes
    from mailrelay.delivery.router import RoutedRouter

    source = running.source
    try:
        routes = load_config(None if source == EMBEDDED else source).routes
    except (ConfigError, OSError) as e:
        log.error("reload: {problem}; delivery keeps its routes", problem=str(e))
        return
    base = manager.router
    if isinstance(base, RoutedRouter):
        base = base.fallback
    policies = getattr(manager.router, "policies", None)  # [tls_policy] needs a restart
    router = (RoutedRouter(routes, base, tls=running.delivery.mx_tls, policies=policies,
                           ca_file=running.delivery.tls_ca_file or None)
              if routes else base)
    manager.router = router
    manager.routes = Routes(router, manager.routes.clock, manager.routes.ttl)  # cache afresh
    log.info("delivery: routes reloaded ({count} domains routed)", count=len(routes))


class HangupService(Service):
    """While the relay runs, SIGHUP reloads ``live`` (once the reactor takes it up: a
    signal handler must not touch the relay's state itself)."""

    name = "reload"

    def __init__(self, live: Live, reactor) -> None:
        self.live = live
        self._reactor = reactor

    def startService(self) -> None:
        super().startService()
        signal.signal(signal.SIGHUP, self._hangup)

    def _hangup(self, signum, frame) -> None:
        self._reactor.callFromThread(self._reload)

    def _reload(self) -> None:
        if not self.running:
            log.info("reload: ignored, the relay is stopping")
            return
        notify("RELOADING=1")
        try:
            reload(self.live)
        except Exception:
            log.failure("reload failed")
        notify("READY=1")
