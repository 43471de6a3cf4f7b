"""The cost of a feature on the message path: mailrelay with it against the same mailrelay
without it and against Postfix, in the same run, rows taking turns.

``--webhooks``: an endpoint for the bench's account (``message.processed`` and
``message.delivered``) on a loopback HTTP receiver started here (bench/hooksink.py,
``[webhooks] allow_private = 127.0.0.0/8``); the receiver must count messages x 2 events.
``--quotas``: day and month quotas far above the load (``[limits] quota_per_day``,
``quota_per_month``), counted in process and, with redis-server installed, in a private
Redis (``[cluster] redis``, as ``--cluster``).

Each row, started fresh each round: accept (plain SMTP with IP authentication, c=20, one
message per connection) then end to end (the same load, until the sink has every
message). The row's CPU per message is that of all the server's processes (mailrelay: the
relay and its delivery process) from the start of the accept run until the sink has
everything and, for webhooks, the receiver has every event: sending counts too. The order
of the rows turns by one each round, so none always runs first.
"""

from __future__ import annotations

import os
import statistics

from bench.figures import Measure, Value
from bench.hooksink import HookSinkProcess

EVENTS = ("message.processed", "message.delivered")
QUOTA = "1000000000"  # never reached


class Row:
    """One configuration of one server."""

    def __init__(self, label: str, server, sections: dict | None = None) -> None:
        self.label, self.server, self.sections = label, server, sections or {}

    def start(self) -> None:
        if self.server.name == "mailrelay":
            self.server.extra_sections = self.sections
            self.server.configure()
        self.server.start()


def rows(mr, pf, webhooks: HookSinkProcess | None, quotas: bool, redis,
         base: str) -> list[Row]:
    """The rows of this run: mailrelay as it is, with each feature asked for, Postfix."""
    hooks_db = os.path.join(base, "webhooks-on.sqlite")
    # An outbox of its own for the row without webhooks: no endpoint there, as on a relay
    # that has none configured (webhooks enabled, the default).
    out = [Row("mailrelay", mr, {"webhooks": {"db": os.path.join(base, "webhooks-off.sqlite")}})]
    if webhooks:
        mr.extra_sections = {"webhooks": {"db": hooks_db, "allow_private": "127.0.0.0/8"}}
        mr.configure()
        mr.admin("webhook", "add", "default", webhooks.url,
                 *(arg for kind in EVENTS for arg in ("--event", kind)))
        out.append(Row("mailrelay + webhooks", mr, mr.extra_sections))
    if quotas:
        limits = {"limits": {"quota_per_day": QUOTA, "quota_per_month": QUOTA}}
        out.append(Row("mailrelay + quotas", mr, limits))
        if redis is not None:
            out.append(Row("mailrelay + quotas in Redis", mr,
                           {**limits, "cluster": {"redis": f"unix:{redis.socket}",
                                                  "node_id": "bench"}}))
    return out + ([Row("Postfix", pf)] if pf else [])


def run_row(row: Row, sink, sizes, base, say, hooks: HookSinkProcess | None) -> dict:
    """Accept and end to end on ``row``; its CPU per message; the events received."""
    try:
        row.start()
    except Exception as e:
        row.server.stop()
        return {"error": f"did not start: {str(e).splitlines()[0][:100]}"}
    try:
        m = Measure(row.server, sink, sizes, base, say)
        wants_hooks = hooks is not None and "webhooks" in row.label
        if hooks:
            hooks.reset()
        cpu0 = m._server_cpu()
        accept = m.accept("plain", 20, 1)
        e2e = m.end_to_end()["e2e.rate"]
        out = {"accept": accept, "e2e": e2e}
        n = (accept.details.get("ok") or 0) + sizes.e2e  # end to end sends all of e2e
        if hooks is not None:
            want = len(EVENTS) * n if wants_hooks else 0
            got = hooks.wait_for(want, timeout=30 + n / 20) if want else hooks.counts()["posts"]
            counts = hooks.counts()
            out["hooks"] = Value(counts["posts"], "", {"want": want, "types": counts["types"]})
            say(f"{row.label}: webhook receiver {got} of {want} events, {counts['types']}")
        out["cpu"] = Value(1e3 * (m._server_cpu() - cpu0) / n if n else None)
        say(f"{row.label}: CPU {out['cpu'].value:.3f} ms per message over the row")
        return out
    except Exception as e:
        say(f"{row.label}: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {str(e)[:100]}"}
    finally:
        row.server.stop()
        if row.server.name == "mailrelay":
            row.server.extra_sections = {}


def report(labels: list[str], per_round: list[dict[str, dict]], base_label: str) -> str:
    def vals(label: str, key: str) -> list[float]:
        return [r[label][key].value for r in per_round
                if label in r and key in r[label] and r[label][key].value is not None]

    def cell(xs: list[float], fmt: str) -> str:
        if not xs:
            return "n/a"
        return (f"{format(statistics.median(xs), fmt)} "
                f"({format(min(xs), fmt)}-{format(max(xs), fmt)})")

    lines = [f"{len(per_round)} round(s); median (range over the rounds)",
             f"{'row':32} {'accept /s':>18} {'end to end /s':>18} {'CPU ms/msg':>20}"]
    for label in labels:
        lines.append(f"{label:32} {cell(vals(label, 'accept'), ',.0f'):>18} "
                     f"{cell(vals(label, 'e2e'), ',.0f'):>18} "
                     f"{cell(vals(label, 'cpu'), '.3f'):>20}")
    lines.append("")
    for label in labels:
        if label == base_label or label == "Postfix":
            continue
        # Each round's own difference (the rows of a round ran minutes apart at most).
        added = [1e3 * (r[label]["cpu"].value - r[base_label]["cpu"].value)
                 for r in per_round if r.get(label, {}).get("cpu") and r.get(base_label, {})
                 .get("cpu") and r[label]["cpu"].value is not None
                 and r[base_label]["cpu"].value is not None]
        ratios = {key: [r[label][key].value / r[base_label][key].value for r in per_round
                        if r.get(label, {}).get(key) and r.get(base_label, {}).get(key)
                        and r[label][key].value and r[base_label][key].value]
                  for key in ("accept", "e2e")}
        lines.append(f"{label} against {base_label}, each round's own difference: CPU "
                     f"{cell(added, '+.0f')} us per message; accept "
                     f"x{cell(ratios['accept'], '.2f')}, end to end x{cell(ratios['e2e'], '.2f')}")
        if "Postfix" in labels:
            pf = [r[label]["e2e"].value / r["Postfix"]["e2e"].value for r in per_round
                  if r.get(label, {}).get("e2e") and r.get("Postfix", {}).get("e2e")
                  and r[label]["e2e"].value and r["Postfix"]["e2e"].value]
            lines.append(f"  end to end against Postfix: x{cell(pf, '.2f')}")
    for r_i, r in enumerate(per_round, 1):
        for label in labels:
            if (h := r.get(label, {}).get("hooks")) and h.details["want"]:
                ok = "all" if h.value == h.details["want"] else "NOT all"
                lines.append(f"round {r_i}, {label}: receiver got {h.value:,.0f} of "
                             f"{h.details['want']:,} events ({ok}): {h.details['types']}")
            if err := r.get(label, {}).get("error"):
                lines.append(f"round {r_i}, {label}: {err}")
    return "\n".join(lines)

