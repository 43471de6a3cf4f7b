"""The queue's pages: every message waiting with its buttons (retry now, release a message
held over quota, delete), and one message's envelope, recipients and headers."""

from __future__ import annotations

from twisted.web.template import tags

from mailrelay.manage.queue import state_text
from mailrelay.web import ops
from mailrelay.web import tenancy as t
from mailrelay.web.pages.base import Pages
from mailrelay.web.routing import Call, Response
from mailrelay.web.templates import link, post_button, table, when


class QueuePages(Pages):
    def register(self, add) -> None:
        message = t.queued(t.path("queue_id"))
        add("GET", "/queue", self.queue, account=t.LISTED)
        add("GET", "/queue/{queue_id}", self.queued, account=message)
        add("POST", "/queue/{queue_id}/retry", self.retry, account=message)
        add("POST", "/queue/{queue_id}/delete", self.delete_queued, account=message)
        add("POST", "/queue/{queue_id}/release", self.release, account=message)

    async def queue(self, call: Call) -> Response:
        result = await ops.list_queue(self.s, within=call.account)
        csrf = call.principal.csrf
        rows = []
        for m in result["messages"]:
            path = f"/queue/{m['id']}"
            actions = [post_button(path + "/delete", "Delete", csrf, "danger")]
            if m["state"] == "queued" and self.s.control.can_retry:
                actions.insert(0, post_button(path + "/retry", "Retry now", csrf, "secondary"))
            if m["held"] == "quota":
                actions.insert(0, post_button(path + "/release", "Release", csrf, "secondary"))
            rows.append([link(path, m["id"]), state_text(m), m["sender"] or "<>",
                         len(m["recipients"]), len(m["pending"]), m["user"] or "-",
                         when(m["received_at"]), m["attempts"], _next(m), m["last_error"],
                         actions])  # fmt: skip
        body = [tags.p(f'{result["total"]} message(s).', class_="muted")]
        if rows:
            body.append(table(["Queue id", "State", "Sender", "Rcpts", "Pending", "User",
                               "Received", "Attempts", "Next attempt", "Last error", ""], rows,
                              "queue"))  # fmt: skip
        return self.render(call, "Queue", body, "/queue")

    async def queued(self, call: Call) -> Response:
        m = await ops.show_queued(self.s, call.params["queue_id"])
        rows = [[r["address"], r["status"], r["code"] or "", r["text"], r["remote"] or ""]
                for r in m["recipient_status"]]  # fmt: skip
        e = m["envelope"]
        facts = [("State", state_text(m)), ("Held for", m["held_quota"] or ""),
                 ("Sender", m["sender"] or "<>"), ("User", m["user"]),
                 ("Account", m["account"]), ("Client", e.get("client_ip")), ("Size", m["size"]),
                 ("Received", when(m["received_at"])), ("Attempts", m["attempts"]),
                 ("Next attempt", _next(m)), ("Last error", m["last_error"])]  # fmt: skip
        body = [
            table(["", ""], facts),
            tags.h2("Recipients"),
            table(["Recipient", "Status", "Code", "Text", "Remote"], rows),
            tags.h2("Headers"),
            tags.pre(m["headers"], class_="mono"),
        ]  # fmt: skip
        return self.render(call, f"Message {m['id']}", body, "/queue")

    async def retry(self, call: Call) -> Response:
        await ops.retry_queued(self.s, call.params["queue_id"])
        return self.done(call, "/queue", f"{call.params['queue_id']}: delivery tried now.")

    async def release(self, call: Call) -> Response:
        await ops.release_queued(self.s, call.params["queue_id"])
        return self.done(call, "/queue", f"{call.params['queue_id']}: released for delivery.")

    async def delete_queued(self, call: Call) -> Response:
        await ops.delete_queued(self.s, call.params["queue_id"])
        return self.done(call, "/queue", f"Deleted {call.params['queue_id']}.")


def _next(m: dict) -> str:
    return when(m["next_attempt"]) if m["next_attempt"] else "never"
