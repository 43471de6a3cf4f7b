"""Builds the running relay from a Config: one function, no globals.

listeners -> SubmissionFactory (session) -> Cred portal (directory) -> spool -> delivery
"""

from __future__ import annotations

import os

from twisted.application.service import MultiService, Service
from twisted.logger import Logger

from mailrelay.config import Config
from mailrelay.listener import ListenerService

log = Logger()


class StartupError(Exception):
    """Something outside the config file prevents startup (unreadable key, bad LDAP bind)."""


class DeliveryService(Service):
    """Runs the delivery manager while the relay runs."""

    name = "delivery"

    def __init__(self, manager) -> None:
        self.manager = manager

    def startService(self) -> None:
        super().startService()
        self.manager.start()

    def stopService(self):
        super().stopService()
        return self.manager.stop()


def make_service(config: Config, reactor=None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    from mailrelay.auth.checkers import make_portal
    from mailrelay.directory import open_directory
    from mailrelay.smtp.factory import SubmissionFactory, wrap_listener_factory
    from mailrelay.spool.spool import Spool
    from mailrelay.tls import TLSSetupError, server_options
    from mailrelay.web.site import make_admin_service

    try:
        os.makedirs(config.server.data_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise StartupError(f"[server] data_dir {config.server.data_dir}: {e.strerror}")
    try:
        tls_options = server_options(
            config.tls.certificate, config.tls.key, config.tls.generate,
            config.server.hostname, config.tls.key_type,
        )
    except (TLSSetupError, OSError) as e:
        raise StartupError(str(e))

    top = MultiService()
    spool = Spool(config.spool.directory, reactor=reactor,
                  min_free_bytes=config.spool.min_free_space)
    spool.setServiceParent(top)

    directory = open_directory(config, reactor=reactor)
    check_directory(directory)
    portal = make_portal(directory, config.directory.login_cache_ttl, clock=reactor,
                         ip_auth=config.policy.ip_auth, address_auth=config.policy.address_auth)

    manager = None
    if config.delivery.enabled:
        manager = make_delivery(config, spool, reactor)
        DeliveryService(manager).setServiceParent(top)
        spool.subscribe(manager.enqueue)

    policy, notifier = make_policy(config, spool, reactor)
    top.addService(_Stopping(notifier.stop))
    limits = config.limits
    for listener in config.listeners:
        factory = SubmissionFactory(
            portal=portal,
            spool=spool,
            hostname=config.server.hostname,
            tls_options=tls_options,
            tls_mode=listener.tls,
            plaintext_auth=listener.plaintext_auth,
            max_message_size=limits.max_message_size,
            max_recipients=limits.max_recipients,
            max_messages_per_connection=limits.max_messages_per_connection,
            idle_timeout=limits.idle_timeout,
            data_timeout=limits.data_timeout,
            session_timeout=limits.session_timeout,
            reactor=reactor,
            policy=policy,
            verify_senders=config.admin.enabled and config.admin.verify_senders,
        )
        wrapped = wrap_listener_factory(factory, listener.tls, tls_options, listener.endpoint)
        ListenerService(f"listener:{listener.name}", listener.endpoint, wrapped,
                        reactor).setServiceParent(top)

    suppressions, stats = open_feature_stores(config)
    make_admin_service(config, directory, spool, suppressions, stats, tls_options=tls_options,
                       manager=manager, reactor=reactor).setServiceParent(top)
    return top


def open_feature_stores(config: Config):
    """The suppression list and statistics (SQLite), shared by delivery and the panel."""
    from mailrelay.features.paths import feature_paths
    from mailrelay.features.stats import StatsStore
    from mailrelay.features.suppressions import SuppressionStore

    paths = feature_paths(config)
    return SuppressionStore(paths.suppressions_db), StatsStore(paths.stats_db)


def check_directory(directory) -> None:
    """A directory that can be checked (LDAP) is checked once before serving: a wrong bind
    DN or base stops startup; a server that is down only warns (AUTH gets 454 until it
    answers, and it is retried on every login)."""
    from mailrelay.interfaces import DirectoryUnavailable

    check_now = getattr(directory, "check_now", None)
    if check_now is None:
        return
    from mailrelay.directory.ldapdir import LdapConfigError

    try:
        check_now()
    except LdapConfigError as e:
        raise StartupError(str(e))
    except DirectoryUnavailable as e:
        log.warn("directory not reachable at startup: {reason}; logins get 454 until it is",
                 reason=str(e))


def make_policy(config: Config, spool, reactor):
    """The shared submission policy (limits, brute-force defence, sender notifications)."""
    from mailrelay.model import Envelope
    from mailrelay.policy.bruteforce import LoginGuard
    from mailrelay.policy.connections import ConnectionLimits
    from mailrelay.policy.notify import SenderNotifier
    from mailrelay.policy.ratelimit import RateLimiter
    from mailrelay.policy.submission import SubmissionPolicy

    limits, p = config.limits, config.policy

    def submit(sender: str, recipients: list[str], data: bytes):
        envelope = Envelope(id="", sender=sender, recipients=list(recipients), user=None,
                            account=None, client_ip=None, helo=None, tls=False,
                            received_at=reactor.seconds(), priority=2)
        return spool.submit(envelope, data)

    notifier = SenderNotifier(reactor, submit, config.server.postmaster,
                              config.server.hostname, interval=p.notify_interval)
    policy = SubmissionPolicy(
        ConnectionLimits(
            max_total=limits.max_connections,
            max_per_ip=limits.max_connections_per_ip,
            max_per_user=limits.max_connections_per_user,
            max_messages=0,  # the session counts messages per connection itself
            ipv6_prefix=p.ipv6_prefix,
        ),
        RateLimiter(reactor, per_hour=limits.rate_per_hour,
                    per_minute=limits.rate_per_minute or None, unit=limits.rate_counts),
        LoginGuard(reactor, window=p.login_window, delay_after=p.login_delay_after,
                   block_after=p.login_block_after, block_time=p.login_block_time,
                   max_delay=p.login_max_delay, user_alert_after=p.login_user_alert_after,
                   ipv6_prefix=p.ipv6_prefix),
        notifier,
    )
    return policy, notifier


class _Stopping(Service):
    """Calls ``stop`` when the relay stops (timers that must not outlive it)."""

    def __init__(self, stop) -> None:
        self._stop = stop

    def stopService(self):
        super().stopService()
        return self._stop()


def make_delivery(config: Config, spool, reactor):
    from mailrelay.delivery.manager import DeliveryManager
    from mailrelay.delivery.router import router_from_config

    d = config.delivery
    return DeliveryManager(
        spool,
        router_from_config(config, reactor),
        reactor,
        max_concurrency=d.max_concurrency,
        max_per_host=d.max_per_host,
        retry_first=d.retry_first,
        retry_max=d.retry_max,
        lifetime=d.lifetime,
        delay_warning=d.delay_warning,
        hostname=config.server.hostname,
        postmaster=config.server.postmaster,
        connect_timeout=d.connect_timeout,
    )
