"""Builds the running relay from a Config: one function per process, no globals.

listeners -> SubmissionFactory (session) -> Cred portal (directory) -> spool -> delivery;
the per-user features (make_features) hook into the session's policy and into delivery.
Delivery runs in a process of its own (delivery/process.py), built by
make_delivery_worker from the same Config and meeting the relay at the spool.
"""

from __future__ import annotations

import os
import sqlite3
from functools import partial

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized

from mailrelay import tuning
from mailrelay.config import EMBEDDED, Config
from mailrelay.events import NO_EVENTS
from mailrelay.listener import ListenerService
from mailrelay.proxyproto import wrapper_for as proxy_wrapper
from mailrelay.reload import Live

log = Logger()


class StartupError(Exception):
    """Something outside the config file prevents startup (unreadable key, bad LDAP bind)."""


class StopInOrder(MultiService):
    """Stops its services one at a time, the last added first, each once the one added
    after it has stopped: delivery and the listeners finish their work with the spool
    before the spool closes. (A plain MultiService stops them all at once, and a spool
    closed under a delivery that is saving states left the delivery waiting for ever.)"""

    log_observer = None  # from the twistd plugin: what twistd's log file is written by

    def setServiceParent(self, parent) -> None:
        super().setServiceParent(parent)
        if (self.log_observer is not None and isinstance(parent, Componentized)
                and parent.getComponent(ILogObserver) is None):
            parent.setComponent(ILogObserver, self.log_observer)

    def stopService(self) -> Deferred:
        Service.stopService(self)
        return ensureDeferred(self._stop_all())

    async def _stop_all(self) -> None:
        for service in reversed(list(self)):
            try:
                await maybeDeferred(service.stopService)
            except Exception:
                log.failure("{service} did not stop cleanly", service=service.name)


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
    from mailrelay.bounces.store import Pruner
    from mailrelay.control import control_service
    from mailrelay.directory import open_directory
    from mailrelay.features.envelope import user_fields
    from mailrelay.features.policy import FeaturePolicy
    from mailrelay.manage.queue import QueueControl
    from mailrelay.manage.stores import threaded
    from mailrelay.policy.quotahold import QuotaRelease
    from mailrelay.smtp.factory import SubmissionFactory, wrap_listener_factory
    from mailrelay.smtp.goodbye import SessionDrain
    from mailrelay.spool.node import node_id
    from mailrelay.spool.spool import Spool
    from mailrelay.tls import TLSSetupError, server_options
    from mailrelay.web.site import make_admin_service

    if problem := tuning.startup_problem():
        raise StartupError(problem)
    tuning.log_state()
    try:
        os.makedirs(config.server.data_dir, mode=0o700, exist_ok=True)
    except OSError as e:
        raise StartupError(f"[server] data_dir {config.server.data_dir}: {e.strerror}")
    check_spool_directory(config)
    try:
        node = node_id(config.server.data_dir, config.server.node_id)
    except (OSError, ValueError) as e:
        raise StartupError(f"[server] node_id: {e}")
    try:
        tls_options = server_options(
            config.tls.certificate, config.tls.key, config.tls.generate,
            config.server.hostname, config.tls.key_type, config.tls.ciphers,
        )
    except (TLSSetupError, OSError) as e:
        raise StartupError(str(e))

    open_postgres(config)  # unreachable: one line now, not a store's error later

    top = StopInOrder()
    spool = Spool(config.spool.directory, reactor=reactor,
                  min_free_bytes=config.spool.min_free_space, node=node)
    spool.setServiceParent(top)
    events = make_events(config, reactor, top)  # stops after delivery and the listeners

    directory = open_directory(config, reactor=reactor)
    if IService.providedBy(directory):  # the database's: it listens for changes
        directory.setServiceParent(top)
    check_directory(directory)
    logins = open_logins(config, directory, reactor, top)
    portal = make_portal(directory, config.directory.login_cache_ttl, clock=reactor,
                         ip_auth=config.policy.ip_auth, address_auth=config.policy.address_auth,
                         logins=logins)

    suppressions, stats = open_feature_stores(config)
    features = make_features(config, suppressions, stats, reactor, top, events=events)
    if not config.tracking.enabled:
        reactor.callWhenRunning(warn_features_off, directory)

    delivery = None
    if config.delivery.enabled:
        from mailrelay.delivery.process import DeliveryProcess, worker_command
        from mailrelay.delivery.router import router_from_config

        router_from_config(config, reactor)  # a setting it refuses stops the relay here
        source = None if config.source == EMBEDDED else config.source
        delivery = DeliveryProcess(worker_command(source), reactor)
        delivery.setServiceParent(top)
        spool.subscribe(delivery.enqueue)
    metrics, metrics_page = make_metrics(config, spool, delivery, directory, reactor, top)

    policy, notifier = make_policy(config, spool, reactor, metrics, top, events)
    if config.policy.dormant_after > 0:
        from mailrelay.manage.dormancy import DormancyJob

        DormancyJob(directory, config.directory.file, logins, config.policy.dormant_after,
                    partial(submit_notice, spool, reactor), config.server.postmaster,
                    config.server.hostname, reactor, events=events).setServiceParent(top)
    if config.cluster.redis:  # this node's heartbeat: its connection leases stay alive
        from mailrelay.cluster.redis_counters import LeaseRenewal

        LeaseRenewal(policy.connections, reactor).setServiceParent(top)
    logins = policy.logins  # the panel's login counts its failures with SMTP AUTH's
    rates = policy.rates  # mailrelay-admin explain asks them over the control socket
    quotas = policy.quotas
    warner = policy.warner
    top.addService(_Stopping(notifier.stop))
    policy = FeaturePolicy(policy, features, spool)
    limits = config.limits
    factories = []
    # Joins before the listeners, so stops after them: the sessions' 421 (smtp/goodbye.py).
    SessionDrain(factories, config.server.shutdown_grace, reactor).setServiceParent(top)
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
            envelope_fields=user_fields,
        )
        factories.append(factory)
        factory.metrics = metrics.listener(listener.name)
        factory.events = events
        wrapped = wrap_listener_factory(factory, listener.tls, tls_options, listener.endpoint)
        ListenerService(f"listener:{listener.name}", listener.endpoint, wrapped, reactor,
                        outer=proxy_wrapper(listener, reactor)).setServiceParent(top)

    if config.dkim.check_interval > 0:
        dkim_checker(config, reactor).setServiceParent(top)
    verp, paths = make_verp(config)
    Pruner(paths, config.bounces.retention, reactor).setServiceParent(top)
    if config.bounces.endpoint:
        bounce_listener(config, verp, paths, features, spool, tls_options, reactor,
                        events).setServiceParent(top)

    if getattr(events, "store", None) is not None and hasattr(metrics, "outbox"):
        metrics.outbox = events.store  # its backlog, read from the file
    if delivery is None:  # no delivery process to send the outbox: the relay sends it
        webhook_sender(config, events, directory, spool, reactor, top, metrics)
    # Mail held over a quota: released when the quota resets, or by an admin.
    holds = QuotaRelease(spool, quotas, directory, warner, reactor, threaded(reactor))
    holds.setServiceParent(top)
    control = QueueControl(spool, reactor, delivery, holds)
    control_service(config.server.control_socket, control, reactor, rates,
                    logins, quotas).setServiceParent(top)
    make_admin_service(config, directory, spool, suppressions, stats, tls_options=tls_options,
                       control=control, reactor=reactor, logins=logins,
                       metrics=metrics_page).setServiceParent(top)
    # What a reload (SIGHUP, mailrelay/reload.py) changes in place.
    top.live = Live(config, factories, policy.policy, portal, tls_options, delivery)
    return top


def make_events(config: Config, reactor, parent):
    """This process's IEventSink (the relay's and the delivery process's alike): the
    webhook outbox's writer (webhooks/sink.py), a child service of ``parent``; NO_EVENTS
    when ``[webhooks] enabled = no``. Call it before what emits joins ``parent``, so that
    the last events are written after that has stopped."""

    w = config.webhooks
    if w is None or not w.enabled:
        return NO_EVENTS
    from mailrelay.webhooks.sink import WebhookSink

    store = open_webhooks(config)
    if hasattr(store, "listener"):  # endpoints shared in PostgreSQL: told of changes
        store.listener(reactor).setServiceParent(parent)
    sink = WebhookSink(store, reactor, interval=w.flush_interval)
    sink.setServiceParent(parent)
    return sink


def open_webhooks(config: Config):
    """The webhook endpoints and outbox: the outbox is always this node's SQLite file
    (webhooks/store.py); the endpoints are in it too, or in PostgreSQL with ``[cluster]
    postgres`` (webhooks/pgstore.py). StartupError if unusable."""
    import psycopg

    from mailrelay.postgres import db as pg
    from mailrelay.webhooks.store import WebhookStore

    try:
        shared = pg.of_config(config)
        if shared is None:
            return WebhookStore(config.webhooks.db)
        from mailrelay.webhooks.pgstore import SharedWebhookStore, endpoints_of

        return SharedWebhookStore(config.webhooks.db, endpoints_of(shared))
    except (sqlite3.Error, OSError) as e:
        raise StartupError(f"[webhooks] db {config.webhooks.db}: "
                           f"{getattr(e, 'strerror', None) or e}")
    except (*pg.UNAVAILABLE, psycopg.Error) as e:
        raise StartupError(f"[cluster] postgres: webhook endpoints: {str(e).strip()}")


def webhook_sender(config: Config, events, directory, spool, reactor, parent,
                   metrics) -> None:  # fmt: skip
    """The sender of the outbox ``events`` writes (webhooks/sender.py), a child of
    ``parent``; none without webhooks. The delivery process runs it, so that its requests
    take none of the CPU of the relay's SMTP sessions; the relay only with ``[delivery]
    enabled = no``. A 410 is told to the account by mail through ``spool`` (its
    notification address from ``directory``); ``metrics`` counts the requests."""
    store = getattr(events, "store", None)
    if store is None:
        return
    from mailrelay.manage.stores import threaded
    from mailrelay.webhooks.notice import GoneNotices
    from mailrelay.webhooks.sender import WebhookSender

    w = config.webhooks
    gone = GoneNotices(directory, partial(submit_notice, spool, reactor),
                       config.server.postmaster, config.server.hostname, reactor)
    WebhookSender(store, threaded(reactor), reactor, allowed=w.allow_private,
                  retry_delays=w.retry_delays, timeout=w.timeout,
                  poll_interval=w.poll_interval, concurrency=w.concurrency,
                  failed_retention=w.failed_retention, gone=gone,
                  metrics=metrics).setServiceParent(parent)


def make_verp(config: Config):
    """The VERP addresses (bounces/verp.py, their key made on first start) and the store of
    what they name (bounces/store.py)."""
    from mailrelay.bounces.store import ReturnPathStore
    from mailrelay.bounces.verp import Verp

    verp = Verp(read_key_file("bounces", config.bounces.key_file, config))
    if postgres(config) is not None:
        from mailrelay.postgres.returnpaths import PgReturnPathStore

        return verp, pg_store(config, PgReturnPathStore)
    try:
        return verp, ReturnPathStore(config.bounces.db)
    except (sqlite3.Error, OSError) as e:
        raise StartupError(f"[bounces] db {config.bounces.db}: "
                           f"{getattr(e, 'strerror', None) or e}")


def bounce_listener(config: Config, verp, paths, features, spool, tls_options, reactor,
                    events=NO_EVENTS):
    """The inbound listener of the bounce domains (``[bounces] endpoint``)."""
    from mailrelay.bounces.feed import BounceFeed
    from mailrelay.bounces.listener import BounceFactory

    b = config.bounces
    feed = BounceFeed(reactor, features, spool, paths, config.server.hostname,
                      config.server.postmaster, events=events)
    factory = BounceFactory(verp, feed, config.server.hostname, tls_options=tls_options,
                            max_size=b.max_message_size,
                            idle_timeout=config.limits.idle_timeout,
                            max_connections=b.max_connections)
    return ListenerService("bounces", b.endpoint, factory, reactor)




def make_metrics(config: Config, spool, delivery, directory, reactor, parent):
    """The relay's IMetrics from ``[metrics]`` and the /metrics page for the panel's
    listener (None when served by a listener of its own, which joins ``parent``);
    NO_METRICS when they are off or nowhere to be served."""
    from mailrelay.metrics import NO_METRICS

    m = config.metrics
    if not metrics_served(config):
        if m.enabled:
            log.info("no /metrics: [metrics] endpoint = admin, and [admin] is disabled")
        return NO_METRICS, None
    from mailrelay.metrics.prom import PrometheusMetrics
    from mailrelay.metrics.web import MetricsPage, metrics_site

    metrics = PrometheusMetrics(spool, delivery)
    if delivery is not None:
        delivery.metrics = metrics
    if hasattr(directory, "metrics"):  # LDAP: its calls are counted and timed
        directory.metrics = metrics
    page = MetricsPage(metrics.registry, m.token)
    if m.endpoint != "admin":
        ListenerService("metrics", m.endpoint, metrics_site(page), reactor).setServiceParent(
            parent)
        return metrics, None
    return metrics, page


def metrics_served(config: Config) -> bool:
    """Whether anything is counted: ``[metrics]`` on, with somewhere to serve them."""
    m = config.metrics
    return m.enabled and (m.endpoint != "admin" or config.admin.enabled)


def open_postgres(config: Config):
    """The pool of ``[cluster] postgres`` (None without it); StartupError naming the key
    and libpq's reason when the database does not take a connection, or when a newer
    mailrelay wrote one of its stores (checked read-only, before any store migrates)."""
    if config.cluster is None or not config.cluster.postgres:
        return None
    import importlib

    from mailrelay.postgres import STORE_MODULES
    from mailrelay.postgres.db import UNAVAILABLE, newer_schemas, of_config

    for name in STORE_MODULES:  # their schema versions (postgres.db.KNOWN)
        importlib.import_module(name)
    try:
        db = of_config(config)
        newer = newer_schemas(db)
    except UNAVAILABLE as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise StartupError(f"[cluster] postgres: {why}")
    if newer:
        raise StartupError("[cluster] postgres: " + "; ".join(newer))
    return db


def make_delivery_worker(config: Config, reactor) -> tuple[MultiService, object]:
    """The delivery process's services (the shared spool, the feature stores, the queue
    runner) and its DeliveryManager."""
    from mailrelay.metrics import NO_METRICS
    from mailrelay.metrics.forward import DeltaMetrics
    from mailrelay.spool.node import node_id
    from mailrelay.spool.spool import Spool

    open_postgres(config)
    top = StopInOrder()
    metrics = NO_METRICS
    if metrics_served(config):
        metrics = DeltaMetrics(reactor)
        metrics.setServiceParent(top)  # added first: stops last, with everything counted
    spool = Spool(config.spool.directory, reactor=reactor,
                  min_free_bytes=config.spool.min_free_space, owner=False,
                  node=node_id(config.server.data_dir, config.server.node_id))
    spool.setServiceParent(top)
    top.events = make_events(config, reactor, top)  # delivery's IEventSink: stops after it
    suppressions, stats = open_feature_stores(config)
    if postgres(config) is not None:  # asked per message: answered from memory
        from mailrelay.postgres.suppressions import cached

        suppressions = cached(suppressions, reactor, top)
    features = make_features(config, suppressions, stats, reactor, top, serve=False)
    manager = make_delivery(config, spool, reactor, features, metrics, top.events)
    listener = getattr(getattr(manager.dkim, "signer", None), "listener", None)
    if listener is not None:  # the shared keys' changes (postgres/dkim.py)
        listener.setServiceParent(top)
    DeliveryService(manager).setServiceParent(top)
    tls_reports(config, spool, reactor, manager, top)
    spool.subscribe(manager.enqueue)  # the DSNs and notices it writes itself
    if getattr(top.events, "store", None) is not None:  # the webhook sender: stops first
        webhook_sender(config, top.events, notice_directory(config, reactor, top), spool,
                       reactor, top, metrics)
    return top, manager


def notice_directory(config: Config, reactor, parent):
    """The delivery process's directory, where the webhook 410 notices find the accounts'
    notification addresses; None (logged) when it cannot be opened, e.g. a user file
    broken since the relay started: delivery and sending go on without those notices."""
    from mailrelay.config import ConfigError
    from mailrelay.directory import open_directory

    try:
        directory = open_directory(config, reactor=reactor)
    except ConfigError as e:
        log.error("webhook 410 notices cannot be mailed: {why}", why=str(e))
        return None
    if IService.providedBy(directory):  # the database's: it listens for changes
        directory.setServiceParent(parent)
    return directory


def tls_reports(config: Config, spool, reactor, manager, parent) -> None:
    """TLS reporting (RFC 8460, delivery/tlsrpt.py): the courier's sessions and the
    MTA-STS fetch failures counted, the daily reports sent through ``spool``."""
    d = config.delivery
    if not d.tls_reports or d.mode != "mx":
        return
    from mailrelay.delivery import mtasts, tlsrpt
    from mailrelay.delivery.router import dns_lookup

    counter = tlsrpt.Counter(d.tls_report_dir, reactor)
    manager.courier.on_session = counter.session
    mx = getattr(manager.router, "fallback", manager.router)  # under [routes]
    if getattr(mx, "sts", None) is not None:
        mx.sts.on_failure = counter.fetch_failed
        mx.on_session = counter.session
    reporter = tlsrpt.Reporter(
        d.tls_report_dir, dns_lookup(d, reactor)[0], spool.submit, reactor,
        d.tls_report_org or config.server.hostname,
        d.tls_report_contact or config.server.postmaster, config.server.postmaster,
        trust=mtasts.trust_root(d.tls_ca_file))
    tlsrpt.TlsReportService(counter, reporter).setServiceParent(parent)


def check_spool_directory(config: Config) -> None:
    """A spool path that is a file stops startup here, not in the spool's first write."""
    path = config.spool.directory
    if os.path.exists(path) and not os.path.isdir(path):
        raise StartupError(f"[spool] directory {path}: not a directory")


def open_feature_stores(config: Config):
    """The suppression list and statistics, shared by delivery and the panel: SQLite files,
    or PostgreSQL with ``[cluster] postgres`` (shared by the nodes)."""
    if postgres(config) is not None:
        from mailrelay.postgres.stats import PgStatsStore
        from mailrelay.postgres.suppressions import PgSuppressionStore

        return pg_store(config, PgSuppressionStore), pg_store(config, PgStatsStore)
    from mailrelay.features.paths import feature_paths
    from mailrelay.features.stats import StatsStore
    from mailrelay.features.suppressions import SuppressionStore

    paths = feature_paths(config)
    stores = []
    for kind, key, path in ((SuppressionStore, "suppressions_db", paths.suppressions_db),
                            (StatsStore, "stats_db", paths.stats_db)):  # fmt: skip
        try:
            stores.append(kind(path))
        except (sqlite3.Error, OSError) as e:
            raise store_error(key, path, e)
    return tuple(stores)


def postgres(config: Config):
    """The process's PostgreSQL pool (postgres/db.py), None without ``[cluster] postgres``;
    StartupError when it cannot be reached or its schema is from a newer mailrelay."""
    if not (config.cluster and config.cluster.postgres):
        return None
    import psycopg

    from mailrelay.postgres.db import UNAVAILABLE, of_config

    try:
        return of_config(config)
    except (*UNAVAILABLE, psycopg.Error) as e:
        raise StartupError(f"[cluster] postgres: {str(e).strip() or type(e).__name__}")


def pg_store(config: Config, kind):
    """``kind`` (a postgres.db.PgStore) on the process's pool, its schema migrated;
    StartupError when that fails."""
    import psycopg

    try:
        return kind(postgres(config))
    except psycopg.Error as e:
        raise StartupError(f"[cluster] postgres: {kind.COMPONENT}: {str(e).strip()}")


def open_logins(config: Config, directory, reactor, parent):
    """The last-login recorder (auth/lifecycle.py), a child service of ``parent``."""
    from mailrelay.auth.lifecycle import LoginRecorder, LoginStore, shared_login_store

    path = config.directory.logins_db
    try:
        store = shared_login_store(config) or LoginStore(path)
    except ConnectionError as e:  # the database's
        raise StartupError(f"the last logins: {e}")
    except (sqlite3.Error, OSError) as e:
        raise StartupError(f"[directory] logins_db {path}: "
                           f"{getattr(e, 'strerror', None) or e}")
    recorder = LoginRecorder(store, reactor)
    recorder.setServiceParent(parent)
    return recorder


def store_error(key: str, path: str, error: Exception) -> StartupError:
    return StartupError(f"[features] {key} {path}: {getattr(error, 'strerror', None) or error}")


def read_key_file(section: str, path: str, config: Config | None = None) -> bytes:
    """The signing key ``[section] key_file`` (made on first use); StartupError if unusable.
    With ``config``'s ``[cluster] postgres`` set, the key all nodes share, kept in the
    database (postgres/secrets.py; the file seeds it if no node made it yet)."""
    from mailrelay.signing import load_or_create_key

    if config is not None and getattr(config.cluster, "postgres", ""):
        from mailrelay.postgres.db import UNAVAILABLE, of_config
        from mailrelay.postgres.secrets import SharedSecrets

        try:
            return SharedSecrets(of_config(config)).key(section, path)
        except UNAVAILABLE as e:
            raise StartupError(f"[{section}] key_file: the shared key cannot be read from "
                               f"[cluster] postgres: {str(e).strip()}")
        except (OSError, ValueError) as e:
            raise StartupError(f"[{section}] key_file {path}: "
                               f"{getattr(e, 'strerror', None) or e}")
    try:
        return load_or_create_key(path)
    except (OSError, ValueError) as e:
        raise StartupError(f"[{section}] key_file {path}: {getattr(e, 'strerror', None) or e}")


def make_features(config: Config, suppressions, stats_store, reactor, parent,
                  serve: bool = True, events=NO_EVENTS) -> object:
    """The per-user features (features.hooks.MessageFeatures) from ``[features]`` and
    ``[tracking]``; their services (the statistics writer and, with ``serve``, archive
    pruning and the tracking listener: the relay's, not the delivery process's) join
    ``parent``. Call it before delivery joins ``parent``, so that the statistics are
    written after delivery has stopped. ``events``: where the tracking listener reports
    opens, clicks and unsubscriptions."""
    from mailrelay.features.archive import Archive, ArchivePruner
    from mailrelay.features.hooks import MessageFeatures
    from mailrelay.features.paths import feature_paths
    from mailrelay.features.stats import StatsRecorder

    f, paths = config.features, feature_paths(config)
    if postgres(config) is not None:  # several nodes: batches with ids, journaled
        from mailrelay.postgres.stats import JournaledStatsRecorder, StatsJournal
        from mailrelay.spool.node import node_id

        process = "relay" if serve else "delivery"
        node = node_id(config.server.data_dir, config.server.node_id)
        journal = StatsJournal(os.path.join(config.server.data_dir, "stats-journal", process))
        recorder = JournaledStatsRecorder(stats_store, reactor, journal, f"{node}/{process}",
                                          interval=f.stats_flush_interval)
    else:
        recorder = StatsRecorder(stats_store, reactor, interval=f.stats_flush_interval)
    recorder.setServiceParent(parent)
    archive = Archive(paths.archive_dir, f.archive_retention / 86400)
    if serve:
        ArchivePruner(archive, reactor).setServiceParent(parent)
    personalizer = None
    if config.tracking.enabled:
        personalizer = make_personalizer(config, paths.token_key)
        if serve:
            _tracking_listener(config, personalizer, suppressions, recorder, reactor,
                               events).setServiceParent(parent)
    return MessageFeatures(reactor, suppressions, recorder, personalizer, archive)


def make_personalizer(config: Config, key_file: str):
    """Footer and tracking links; raises StartupError for an unreadable template or key."""
    from mailrelay.features.links import Links
    from mailrelay.features.personalize import Personalizer
    from mailrelay.features.tokens import TokenSigner

    footer = make_footer(config)
    signer = TokenSigner(read_key_file("tracking", key_file, config))
    links = Links(signer, config.tracking.base_url, config.tracking.unsubscribe_mailto or None)
    return Personalizer(links, footer)


def make_footer(config: Config):
    """The unsubscribe footer from ``[features]``; StartupError for an unreadable file or a
    template that cannot be used."""
    from mailrelay.features.footer import DEFAULT_HTML, DEFAULT_TEXT, Footer

    f = config.features
    templates = {}
    for kind, default in (("text", DEFAULT_TEXT), ("html", DEFAULT_HTML)):
        path = getattr(f, f"footer_{kind}_file")
        if path:
            try:
                with open(path, encoding="utf-8") as template:
                    templates[kind] = template.read()
            except (OSError, UnicodeDecodeError) as e:
                raise StartupError(f"[features] footer_{kind}_file {path}: "
                                   f"{getattr(e, 'strerror', None) or e}")
        else:
            templates[kind] = getattr(f, f"footer_{kind}") or default
    try:
        return Footer(templates["text"], templates["html"])
    except ValueError as e:
        raise StartupError(f"[features] {e}")


def _tracking_listener(config: Config, personalizer, suppressions, recorder, reactor,
                       events):
    from mailrelay.features.web import TrackingRoot, make_site

    root = TrackingRoot(personalizer.links.signer, suppressions, recorder, reactor,
                        events=events)
    return ListenerService("tracking", config.tracking.endpoint, make_site(root), reactor)


def warn_features_off(directory) -> None:
    """Once at startup: users whose footer or tracking cannot be applied because the
    tracking endpoint is off (their mail goes out unchanged)."""

    def check(users) -> None:
        names = [u.username for u in users
                 if u.unsubscribe_footer or u.open_tracking or u.click_tracking]
        if names:
            log.warn("[tracking] is disabled: no unsubscribe footer or tracking for "
                     "{users}, who have them on", users=", ".join(names))

    d = directory.listUsers()
    d.addCallbacks(check, lambda f: None)  # a directory that cannot list: warned per user


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


def submit_notice(spool, reactor, sender: str, recipients: list[str], data: bytes):
    """Queue a message the relay writes itself (a notification); fires with its queue id."""
    from mailrelay.model import Envelope

    envelope = Envelope(id="", sender=sender, recipients=list(recipients), user=None,
                        account=None, client_ip=None, helo=None, tls=False,
                        received_at=reactor.seconds(), priority=2)
    return spool.submit(envelope, data)


def quota_path(config: Config) -> str:
    return os.path.join(config.server.data_dir, "quota.sqlite")


def quota_store(config: Config, reactor, parent):
    """The quota counts kept in data_dir/quota.sqlite across restarts, written in batches
    by a service under ``parent``."""
    from mailrelay.policy.quota import QuotaStore, QuotaWriter

    path = quota_path(config)
    try:
        writer = QuotaWriter(QuotaStore(path), reactor)
    except (sqlite3.Error, OSError) as e:
        raise StartupError(f"[server] data_dir: quota counts {path}: "
                           f"{getattr(e, 'strerror', None) or e}")
    if parent is not None:
        writer.setServiceParent(parent)
    return writer


def make_policy(config: Config, spool, reactor, metrics=None, parent=None, events=NO_EVENTS):
    """The shared submission policy (limits, quotas, brute-force defence, sender and quota
    notifications); ``metrics``: the IMetrics counting its refusals and the notifications
    queued; ``parent``: the service the quota counts' writer runs under; ``events``: the
    IEventSink of the quota warnings."""
    from mailrelay.policy.connections import ConnectionLimits
    from mailrelay.policy.notify import SenderNotifier
    from mailrelay.policy.quota import QuotaCounter
    from mailrelay.policy.quotawarn import QuotaWarner
    from mailrelay.policy.ratelimit import RateLimiter
    from mailrelay.policy.submission import SubmissionPolicy

    limits, p = config.limits, config.policy

    def submit(sender: str, recipients: list[str], data: bytes):
        d = submit_notice(spool, reactor, sender, recipients, data)
        if metrics is not None:
            d.addCallback(lambda queue_id: metrics.notification("sender") or queue_id)
        return d

    notifier = SenderNotifier(reactor, submit, config.server.postmaster,
                              config.server.hostname, interval=p.notify_interval)
    warner = QuotaWarner(reactor, submit, config.server.postmaster, config.server.hostname,
                         events)
    if config.cluster.redis:  # shared by several nodes
        from mailrelay.cluster.redis_counters import shared_limiters

        *shared, quotas = shared_limiters(config, reactor)
        policy = SubmissionPolicy(*shared, notifier, quotas, warner)
    else:
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
            login_guard(config, reactor),
            notifier,
            QuotaCounter(reactor, limits.quota_per_day, limits.quota_per_month,
                         quota_store(config, reactor, parent)),
            warner,
        )
    if metrics is not None:
        policy.metrics = metrics
    return policy, notifier


def login_guard(config: Config, reactor):
    """The brute-force defence from ``[policy]``: one per daemon, for SMTP AUTH and the
    control panel's login alike."""
    from mailrelay.policy.bruteforce import LoginGuard

    p = config.policy
    return LoginGuard(reactor, window=p.login_window, delay_after=p.login_delay_after,
                      block_after=p.login_block_after, block_time=p.login_block_time,
                      max_delay=p.login_max_delay, user_alert_after=p.login_user_alert_after,
                      ipv6_prefix=p.ipv6_prefix)


class _Stopping(Service):
    """Calls ``stop`` when the relay stops (timers that must not outlive it)."""

    def __init__(self, stop) -> None:
        self._stop = stop

    def stopService(self):
        super().stopService()
        return self._stop()


def make_delivery(config: Config, spool, reactor, features=None, metrics=None,
                  events=NO_EVENTS):
    """The DeliveryManager from ``[delivery]``; ``metrics``: the IMetrics of its attempts
    and DSNs; ``events``: the IEventSink of what came of each recipient."""
    from mailrelay.bounces.store import ReturnPaths
    from mailrelay.delivery.manager import DeliveryManager
    from mailrelay.delivery.router import router_from_config

    d = config.delivery
    on_result = None if features is None else partial(_delivery_result, features)
    if metrics is not None:
        on_result = partial(_count_result, config, metrics, reactor, on_result)
    manager = DeliveryManager(
        spool,
        router_from_config(config, reactor, announce=True),
        reactor,
        max_concurrency=d.max_concurrency,
        max_per_host=d.max_per_host,
        retry_first=d.retry_first,
        retry_max=d.retry_max,
        lifetime=d.lifetime,
        delay_warning=d.delay_warning,
        dsn_delay_warning=d.dsn_delay_warning,
        hostname=config.server.hostname,
        postmaster=config.server.postmaster,
        connect_timeout=d.connect_timeout,
        connection_cache_time=d.connection_cache_time,
        features=features,
        dkim=_dkim(config, reactor),
        return_paths=ReturnPaths(*make_verp(config), reactor),
        on_result=on_result,
        events=events,
    )
    if metrics is not None:
        manager.metrics = metrics
    return manager


def _count_result(config: Config, metrics, clock, then, queue_id: str, envelope, result,
                  status: str) -> None:
    """Counts one recipient's attempt by outcome and destination class (a [routes] domain,
    else the delivery mode); a delivery's latency from the message's reception. Then
    ``then`` (the statistics), if any."""
    domain = result.recipient.rpartition("@")[2].lower()
    destination = "route" if domain in config.routes else config.delivery.mode
    latency = clock.seconds() - envelope.received_at if status == "sent" else None
    metrics.delivery(status, destination, latency)
    if then is not None:
        then(queue_id, envelope, result, status)


def _dkim(config: Config, reactor):
    """DKIM signing at delivery; None when ``[dkim] sign = no``. The keys of
    ``[cluster] postgres`` when set, else those of the key directory."""
    if not config.dkim.sign:
        return None
    from mailrelay.delivery.dkimsign import DkimSigning
    from mailrelay.dkim import Signer
    from mailrelay.postgres.db import UNAVAILABLE, of_config

    try:
        db = of_config(config)
    except UNAVAILABLE as e:  # the keys cannot be read: mail waits in the queue
        raise StartupError(f"[dkim] the keys cannot be read from [cluster] postgres: "
                           f"{str(e).strip()}")
    if db is not None:
        from mailrelay.postgres.dkim import PgSigner

        return DkimSigning(PgSigner(db, reactor, config.dkim.relay_domain), reactor)
    return DkimSigning(Signer(config.dkim.directory, relay_domain=config.dkim.relay_domain),
                       reactor)


def dkim_checker(config: Config, reactor):
    """The relay's scheduled look-up of the DKIM records (manage/dkimcheck.py)."""
    from mailrelay.delivery.router import make_resolver
    from mailrelay.manage.dkim import keys_of_config
    from mailrelay.manage.dkimcheck import DkimChecker
    from mailrelay.manage.stores import threaded

    d = config.dkim
    return DkimChecker(keys_of_config(config, threaded(reactor)),
                       make_resolver(config.delivery.dns_servers, reactor), d.check_interval,
                       d.retire_after, reactor)


_EVENTS = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced",
           "expired": "bounced"}


def _delivery_result(features, queue_id: str, envelope, result, status: str) -> None:
    """The delivery manager's on_result: statistics, hard bounces suppressed."""
    from mailrelay.delivery.dsn import status_of
    from mailrelay.features.stats import Event

    features.result(envelope, result.recipient, Event(_EVENTS[status]),
                    status_of(result.code, result.text))
