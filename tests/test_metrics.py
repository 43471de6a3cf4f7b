"""The counters behind /metrics: the delivery process's records added up in the relay,
labels kept to their fixed sets, the queue read by state. Read back through
prometheus-client's exposition and parser, as Prometheus reads them."""

from __future__ import annotations

import json
import re
import time
from types import SimpleNamespace

import pytest
import yaml
from harness import ROOT
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from mailrelay.config import ConfigError, load_config
from mailrelay.metrics import DELIVERY_BUCKETS
from mailrelay.metrics.forward import DeltaMetrics
from mailrelay.metrics.prom import PrometheusMetrics
from mailrelay.spool.queueid import QueueIds
from mailrelay.spool.spool import Spool
from mailrelay.webhooks.store import Event, WebhookStore


def samples(metrics: PrometheusMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_delivery_process_records_add_up_in_the_relay():
    clock = Clock()
    process, relay = DeltaMetrics(clock), PrometheusMetrics(clock=clock.seconds)
    process.delivery("sent", "mx", 0.3)
    process.delivery("sent", "mx", 7200.0)
    process.delivery("deferred", "route", None)
    process.notification("bounce")
    relay.absorb(json.dumps(process.record()))
    process.delivery("sent", "smarthost", 1e9)  # past the last bucket: +Inf
    process.delivery("<weird>", "x@y", None)  # never an unbounded label
    process.notification("delay")
    relay.absorb(json.dumps(process.record()))
    relay.absorb(json.dumps(process.record()))  # an empty one: a heartbeat, adds nothing
    relay.absorb("{not json")  # ignored (and logged), nothing half added
    relay.notification("sender")
    s = samples(relay)
    attempts = {k[1]: v for k, v in s.items()
                if k[0] == "mailrelay_delivery_attempts_total" and v}
    assert attempts == {
        (("destination", "mx"), ("outcome", "sent")): 2,
        (("destination", "route"), ("outcome", "deferred")): 1,
        (("destination", "smarthost"), ("outcome", "sent")): 1,
        (("destination", "other"), ("outcome", "other")): 1,
    }
    notices = {k[1]: v for k, v in s.items()
               if k[0] == "mailrelay_notifications_queued_total" and v}
    assert notices == {(("kind", "bounce"),): 1, (("kind", "delay"),): 1,
                       (("kind", "sender"),): 1}
    buckets = {dict(k[1])["le"]: v for k, v in s.items()
               if k[0] == "mailrelay_delivery_seconds_bucket"}
    assert buckets["0.1"] == 0 and buckets["0.5"] == 1 and buckets["3600.0"] == 1
    assert buckets["14400.0"] == 2 and buckets["86400.0"] == 2 and buckets["+Inf"] == 3
    assert len(buckets) == len(DELIVERY_BUCKETS) + 1
    assert s[("mailrelay_delivery_seconds_count", ())] == 3
    assert s[("mailrelay_delivery_seconds_sum", ())] == 0.3 + 7200.0 + 1e9


def test_delivery_process_webhook_requests_add_up_in_the_relay():
    """The sender runs in the delivery process: its requests reach the relay's counter."""
    clock = Clock()
    process, relay = DeltaMetrics(clock), PrometheusMetrics(clock=clock.seconds)
    for outcome in ("sent", "sent", "retried", "<weird>"):
        process.webhook(outcome)
    relay.absorb(json.dumps(process.record()))
    process.webhook("failed")
    relay.absorb(json.dumps(process.record()))
    relay.webhook("sent")  # the relay's own, with [delivery] enabled = no
    s = samples(relay)
    assert {dict(k[1])["outcome"]: v for k, v in s.items()
            if k[0] == "mailrelay_webhook_deliveries_total"} == {
        "sent": 3, "retried": 1, "failed": 1, "other": 1}


def test_listener_counts_and_bounded_labels():
    relay = PrometheusMetrics()
    smtp = relay.listener("smtp")
    smtp.opened(False)
    smtp.startedTLS()
    smtp.opened(True)
    smtp.closed(True)
    smtp.accepted(1000, 0.004)
    smtp.refused(550, "5.7.1")
    smtp.refused(421, None)
    smtp.login("password", "success")
    smtp.login("kerberos", "maybe")
    relay.policyRefusal("rate_limit")
    relay.policyRefusal("nonsense")
    s = samples(relay)
    assert s[("mailrelay_smtp_sessions_open", (("listener", "smtp"), ("tls", "yes")))] == 1
    assert s[("mailrelay_smtp_sessions_open", (("listener", "smtp"), ("tls", "no")))] == 0
    assert s[("mailrelay_smtp_sessions_total", (("listener", "smtp"), ("tls", "no")))] == 1
    assert s[("mailrelay_smtp_sessions_total", (("listener", "smtp"), ("tls", "yes")))] == 1
    assert s[("mailrelay_smtp_starttls_total", (("listener", "smtp"),))] == 1
    assert s[("mailrelay_smtp_received_bytes_total", (("listener", "smtp"),))] == 1000
    assert s[("mailrelay_spool_commit_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("mailrelay_smtp_refusals_total", (("code", "421"), ("status", "")))] == 1
    assert s[("mailrelay_smtp_logins_total", (("method", "other"), ("result", "other")))] == 1
    assert s[("mailrelay_policy_refusals_total", (("reason", "other"),))] == 1


def test_queue_by_state_read_from_the_spool(tmp_path):
    """Three listdirs, no file read: ready (never tried), deferred (a state file), held; the
    oldest message's age from its queue id. Read again only after ``queue_cache``."""
    now = time.time()
    ids = QueueIds(lambda: now)
    for place in ("queue", "hold", "state"):
        (tmp_path / place).mkdir()
    ready, tried, held = ids.next(2), ids.next(2), ids.next(2)
    for place, queue_id in (("queue", ready), ("queue", tried), ("hold", held)):
        (tmp_path / place / queue_id).write_bytes(b"{}\n")
    (tmp_path / "state" / f"{tried}.json").write_text("{}")
    clock = [now + 30]
    relay = PrometheusMetrics(Spool(str(tmp_path)), clock=lambda: clock[0], queue_cache=5)
    s = samples(relay)
    for state in ("ready", "deferred", "held"):
        assert s[("mailrelay_queue_messages", (("state", state),))] == 1
        assert 29.9 <= s[("mailrelay_queue_oldest_seconds", (("state", state),))] <= 30.1
    (tmp_path / "state" / f"{tried}.json").unlink()
    clock[0] += 1  # within queue_cache: the last reading is shown again
    assert samples(relay)[("mailrelay_queue_messages", (("state", "ready"),))] == 1
    clock[0] += 5
    s = samples(relay)
    assert s[("mailrelay_queue_messages", (("state", "ready"),))] == 2
    assert s[("mailrelay_queue_messages", (("state", "deferred"),))] == 0
    assert s[("mailrelay_queue_oldest_seconds", (("state", "deferred"),))] == 0


def exposed_names(tmp_path) -> set[str]:
    """Every sample name a relay with a spool and a delivery process exposes."""
    for place in ("queue", "hold", "state"):
        (tmp_path / place).mkdir(exist_ok=True)
    process = SimpleNamespace(pid=1234, restarts=0)  # what the collector reads of it
    relay = PrometheusMetrics(Spool(str(tmp_path)), process)
    relay.absorb(json.dumps(DeltaMetrics(Clock()).record()))
    relay.directory(0.01, True)
    relay.listener("smtp").refused(550, "5.7.1")
    relay.outbox = WebhookStore(str(tmp_path / "webhooks.sqlite"))
    return {name for name, _ in samples(relay)}


def test_readme_lists_every_metric(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(mailrelay_\w+)` \|", section, re.M))
    families = {re.sub(r"_(bucket|count|sum|created)$", "", n) for n in exposed_names(tmp_path)
                if n.startswith("mailrelay_") and not n.endswith("_created")}
    assert listed == families


def test_alert_rules_and_dashboard_use_real_metrics(tmp_path):
    names = exposed_names(tmp_path)
    rules = yaml.safe_load((ROOT / "etc" / "prometheus" / "alerts.yml").read_text())
    exprs = []
    for group in rules["groups"]:
        assert set(group) == {"name", "rules"}
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert rule["alert"].startswith("Mailrelay") and rule["expr"].strip()
            assert rule["labels"]["severity"] in ("critical", "warning", "info")
            assert rule["annotations"]["summary"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smh]", rule["for"])
            exprs.append(rule["expr"])
    dashboard = json.loads((ROOT / "etc" / "grafana" / "mailrelay-dashboard.json").read_text())
    assert dashboard["panels"] and len({p["id"] for p in dashboard["panels"]}) == len(
        dashboard["panels"])
    exprs += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {n for e in exprs for n in re.findall(r"\bmailrelay_\w+", e)}
    assert used - names == set()
    assert len(used) >= 15  # nearly every metric is shown or alerted on


def test_config_metrics_section(tmp_path):
    ini = tmp_path / "mailrelay.ini"
    ini.write_text(f"[server]\ndata_dir = {tmp_path}\n")
    m = load_config(str(ini)).metrics
    assert (m.enabled, m.endpoint, m.token) == (True, "admin", "")
    ini.write_text(f"[server]\ndata_dir = {tmp_path}\n[metrics]\nendpoint = nonsense:9\n")
    with pytest.raises(ConfigError, match=r"\[metrics\] endpoint: 'nonsense:9'"):
        load_config(str(ini))
    ini.write_text(f"[server]\ndata_dir = {tmp_path}\n[metrics]\nendpoint = tcp:9125\n"
                   "token = t0ken\n")
    m = load_config(str(ini)).metrics
    assert (m.endpoint, m.token) == ("tcp:9125", "t0ken")


def test_webhook_requests_and_the_outbox_backlog(tmp_path):
    relay = PrometheusMetrics()
    for outcome in ("sent", "sent", "retried", "failed", "bogus"):
        relay.webhook(outcome)
    s = samples(relay)
    assert [s[("mailrelay_webhook_deliveries_total", (("outcome", o),))]
            for o in ("sent", "retried", "failed", "other")] == [2, 1, 1, 1]
    assert not any(name == "mailrelay_webhook_outbox_pending" for name, _ in s)
    relay.outbox = store = WebhookStore(str(tmp_path / "webhooks.sqlite"))
    assert samples(relay)[("mailrelay_webhook_outbox_pending", ())] == 0
    store.add_endpoint("acme", "https://hooks.example.com/", [], [], 1.0)
    store.append([Event(f"evt_{i}", "acme", None, "message.delivered", b"{}", 1.0)
                  for i in range(3)])
    assert samples(relay)[("mailrelay_webhook_outbox_pending", ())] == 3
    ((delivery, _), *_) = store.due(2.0, 10)
    store.sent(delivery.id)
    assert samples(relay)[("mailrelay_webhook_outbox_pending", ())] == 2
    store.close()
