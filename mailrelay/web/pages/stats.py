"""The statistics pages: every SMTP user's last 30 days, and one user's chart and totals
per day or per hour."""

from __future__ import annotations

from datetime import UTC, datetime

from twisted.web.template import tags

from mailrelay.web import ops
from mailrelay.web import tenancy as t
from mailrelay.web.chart import chart
from mailrelay.web.pages.base import Pages, user_path
from mailrelay.web.routing import Call, HttpError, Response
from mailrelay.web.templates import link, table

EVENTS = ("accepted", "delivered", "bounced", "deferred", "rejected", "opens", "clicks")


class StatsPages(Pages):
    def register(self, add) -> None:
        add("GET", "/stats", self.stats, account=t.LISTED)
        add("GET", "/users/{username}/stats", self.user_stats,
            account=t.user(t.path("username")))

    async def stats(self, call: Call) -> Response:
        since = self.s.reactor.seconds() - 30 * 86400
        rows = []
        for u in await ops.list_users(self.s, within=call.account):
            totals = (await ops.stats(self.s, u["username"], None, iso(since)))["totals"]
            rows.append([link(user_path(u["username"], "/stats"), u["username"]),
                         *(totals[k] for k in EVENTS)])  # fmt: skip
        body = [
            tags.p("The last 30 days, per SMTP user.", class_="muted"),
            table(["User", "Sent", "Delivered", "Bounced", "Deferred", "Rejected", "Opens",
                   "Clicks"], rows, "stats"),
        ]  # fmt: skip
        return self.render(call, "Statistics", body, "/stats")

    async def user_stats(self, call: Call) -> Response:
        user, _ = await ops.find_user(self.s, call.params["username"])
        period = call.arg("period") or "day"
        if period not in ("day", "hour"):
            raise HttpError(400, "period must be day or hour")
        span = 30 if period == "day" else 48
        size = 86400 if period == "day" else 3600
        since = self.s.reactor.seconds() - span * size
        result = await ops.stats(self.s, user.username, None, iso(since), period)
        first = int(since // size) * size
        by_start = {int(p["start"]): p for p in result["periods"]}
        points = [(t, by_start.get(t, {})) for t in range(first, first + (span + 1) * size, size)]
        other = "hour" if period == "day" else "day"
        body = [
            tags.p(f"Last {span} {period}s (UTC) · ",
                   link(user_path(user.username, "/stats?period=" + other), "per " + other),
                   " · ", link(user_path(user.username), "settings"), class_="muted"),
            chart(points, period),
            table(["Event", "Total"], list(result["totals"].items()), "totals"),
        ]  # fmt: skip
        return self.render(call, f"Statistics of {user.username}", body, "/stats")



def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S")


