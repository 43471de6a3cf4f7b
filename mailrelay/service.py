"""Builds the running relay from a Config: one function, no globals.

listeners -> SubmissionFactory (session) -> Cred portal (directory) -> spool -> delivery
"""

from __future__ import annotations

import os

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.logger import Logger

from mailrelay.config import Config

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
    portal = make_portal(directory, config.directory.login_cache_ttl, clock=reactor)

    if config.delivery.enabled:
        manager = make_delivery(config, spool, reactor)
        DeliveryService(manager).setServiceParent(top)
        spool.subscribe(manager.enqueue)

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
            reactor=reactor,
        )
        endpoint = endpoints.serverFromString(reactor, listener.endpoint)
        svc = StreamServerEndpointService(
            endpoint, wrap_listener_factory(factory, listener.tls, tls_options)
        )
        svc.setName(f"listener:{listener.name}")
        svc._raiseSynchronously = True  # a port that cannot be bound stops startup
        svc.setServiceParent(top)
    return top


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
