"""The JSON management API under /api/v1 (documented by openapi.py, served at
/api/v1/openapi.json).

Every call but the OpenAPI document needs ``Authorization: Bearer <key>`` with a key made by
``mailrelay-admin apikey add``; a read-only key may only GET (403 otherwise). A key made
with ``--account`` sees and changes only that account's objects (tenancy.py: 403 for
what is relay-wide, 404 for another account's objects). Errors are ``{"error": "..."}``
with the status that fits (ops.py).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger

from mailrelay.manage.access import Access
from mailrelay.web import ops
from mailrelay.web import tenancy as t
from mailrelay.web.openapi import openapi_document
from mailrelay.web.routing import Call, HttpError, Response, Router, json_response, reason

log = Logger()

PREFIX = "/api/v1"
_READS = ("GET", "HEAD")
_ASKS = ("/explain",)  # POSTs that change nothing: a read-only key may make them


def error_response(request, error: HttpError) -> Response:
    headers = {"cache-control": "no-store"}
    if error.status == 401:
        headers["www-authenticate"] = 'Bearer realm="mailrelay"'
    extra = dict(error.extra)
    if "allow" in extra:
        headers["allow"] = ", ".join(extra["allow"])
    return json_response({"error": error.message, "status": error.status,
                          "reason": reason(error.status), **extra},
                         error.status, **headers)  # fmt: skip


class Api:
    def __init__(self, services: ops.Services) -> None:
        self.s = services
        self.router = Router()
        self._document = json.dumps(openapi_document(), indent=1).encode()
        r = self.router.add
        # Each route says how the account of its object is found (tenancy.py).
        username, queue_id, domain = t.path("username"), t.path("queue_id"), t.path("domain")
        r("GET", "/openapi.json", self.openapi, account=t.PUBLIC)
        r("GET", "/users", self.list_users, ("account",), account=t.account(t.query("account")))
        r("POST", "/users", self.add_user, account=t.NEW_USER)
        r("GET", "/users/{username}", self.get_user, account=t.user(username))
        r("PATCH", "/users/{username}", self.edit_user, account=t.CHANGED_USER)
        r("DELETE", "/users/{username}", self.delete_user, account=t.user(username))
        r("POST", "/users/{username}/password", self.reset_password, account=t.user(username))
        r("GET", "/users/{username}/senders", self.senders, account=t.user(username))
        r("POST", "/users/{username}/senders/{sender}/verify", self.verify_sender,
          account=t.user(username))
        r("GET", "/accounts", self.list_accounts, account=t.LISTED)
        r("POST", "/accounts", self.add_account, account=t.RELAY_WIDE)
        r("GET", "/accounts/{name}", self.get_account, account=t.account(t.path("name")))
        r("PATCH", "/accounts/{name}", self.edit_account, account=t.RELAY_WIDE)
        r("DELETE", "/accounts/{name}", self.delete_account, account=t.RELAY_WIDE)
        r("GET", "/ip-auth", self.ip_auth, account=t.RELAY_WIDE)
        r("GET", "/suppressions", self.list_suppressions, ("user", "account", "global"),
          account=t.every(t.relay_wide_if(t.query("global")),
                          t.level(t.query("user"), t.query("account"), t.LISTED)))
        r("POST", "/suppressions", self.add_suppression,
          account=t.level(t.body("user"), t.body("account")))
        r("DELETE", "/suppressions/{address}", self.delete_suppression, ("user", "account"),
          account=t.level(t.query("user"), t.query("account")))
        endpoint = t.webhook(t.path("endpoint"))
        r("GET", "/webhooks", self.list_webhooks, ("account",),
          account=t.account(t.query("account")))
        r("POST", "/webhooks", self.add_webhook, account=t.account(t.body("account")))
        r("GET", "/webhooks/failed", self.failed_webhooks, ("account",),
          account=t.account(t.query("account")))
        r("POST", "/webhooks/failed/{event}/retry", self.retry_webhook,
          account=t.failed_event(t.path("event")))
        r("GET", "/webhooks/{endpoint}", self.get_webhook, account=endpoint)
        r("DELETE", "/webhooks/{endpoint}", self.delete_webhook, account=endpoint)
        r("POST", "/webhooks/{endpoint}/rotate-secret", self.rotate_webhook_secret,
          account=endpoint)
        r("POST", "/webhooks/{endpoint}/enable", self.enable_webhook, account=endpoint)
        r("GET", "/queue", self.list_queue, ("limit",), account=t.LISTED)
        r("GET", "/queue/{queue_id}", self.show_queued, account=t.queued(queue_id))
        r("POST", "/queue/{queue_id}/retry", self.retry_queued, account=t.queued(queue_id))
        r("POST", "/queue/{queue_id}/release", self.release_queued,
          account=t.queued(queue_id))
        r("DELETE", "/queue/{queue_id}", self.delete_queued, account=t.queued(queue_id))
        r("GET", "/dkim", self.list_dkim, account=t.LISTED)
        r("POST", "/dkim", self.add_dkim, account=t.domain(t.body("domain")))
        r("GET", "/dkim/{domain}", self.show_dkim, account=t.domain(domain))
        r("DELETE", "/dkim/{domain}/{selector}", self.delete_dkim, account=t.DKIM_KEY)
        r("POST", "/dkim/{domain}/{selector}/activate", self.activate_dkim,
          account=t.DKIM_KEY)
        r("POST", "/dkim/{domain}/{selector}/retire", self.retire_dkim, account=t.DKIM_KEY)
        r("GET", "/domains", self.list_domains, account=t.LISTED)
        r("GET", "/domains/{domain}/check", self.check_domain, account=t.domain(domain))
        r("GET", "/stats", self.stats, ("user", "account", "since", "period"),
          account=t.level(t.query("user"), t.query("account"), t.LISTED))
        r("POST", "/explain", self.explain, account=t.user(t.body("username")))

    async def dispatch(self, request, path: str) -> Response:
        method = request.method.decode("ascii", "replace").upper()
        route, params = self.router.route(method, path)
        call = Call(request, params)
        if not t.is_public(route):
            call.principal = self._authenticate(call, method not in _READS
                                                and path not in _ASKS)
        unknown = sorted(set(call.query) - set(route.query))
        if unknown:
            raise HttpError(400, f"unknown query parameter(s) {', '.join(unknown)}"
                            + (f" (known: {', '.join(route.query)})" if route.query else ""))
        await t.enforce(self.s, route, call)
        return await route.handler(call)

    def _authenticate(self, call: Call, changes: bool):
        header = call.header("authorization") or ""
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise HttpError(401, "send an API key: Authorization: Bearer <key> "
                            "(make one with mailrelay-admin apikey add)")  # fmt: skip
        key = self.s.access.current().key_for(secret.strip())
        if key is None and self.s.access.refresh():  # a key made a moment ago
            key = self.s.access.current().key_for(secret.strip())
        if key is None:
            raise HttpError(401, "unknown or revoked API key")
        if changes and key.access is not Access.READ_WRITE:
            raise HttpError(403, f"API key {key.name!r} is read-only")
        return key

    # -- handlers

    async def openapi(self, call: Call) -> Response:
        return Response(200, self._document, headers={"cache-control": "no-cache"})

    async def list_users(self, call: Call) -> Response:
        return json_response(await ops.list_users(self.s, call.arg("account"), call.account))

    async def add_user(self, call: Call) -> Response:
        result = await ops.add_user(self.s, call.json())
        location = f"{PREFIX}/users/{result['user']['username']}"
        return json_response(result, 201, **{"cache-control": "no-store", "location": location})

    async def get_user(self, call: Call) -> Response:
        return json_response(await ops.get_user(self.s, call.params["username"]))

    async def edit_user(self, call: Call) -> Response:
        return json_response(await ops.edit_user(self.s, call.params["username"], call.json()))

    async def delete_user(self, call: Call) -> Response:
        await ops.delete_user(self.s, call.params["username"])
        return Response(204)

    async def reset_password(self, call: Call) -> Response:
        result = await ops.reset_password(self.s, call.params["username"])
        return json_response(result, **{"cache-control": "no-store"})

    async def senders(self, call: Call) -> Response:
        user, _ = await ops.find_user(self.s, call.params["username"])
        return json_response(ops.sender_docs(self.s, user))

    async def verify_sender(self, call: Call) -> Response:
        p = call.params
        return json_response(await ops.verify_sender(self.s, p["username"], p["sender"]))

    async def list_accounts(self, call: Call) -> Response:
        return json_response(await ops.list_accounts(self.s, call.account))

    async def add_account(self, call: Call) -> Response:
        doc = await ops.add_account(self.s, call.json())
        return json_response(doc, 201, location=f"{PREFIX}/accounts/{doc['name']}")

    async def get_account(self, call: Call) -> Response:
        return json_response(await ops.get_account(self.s, call.params["name"]))

    async def edit_account(self, call: Call) -> Response:
        return json_response(await ops.edit_account(self.s, call.params["name"], call.json()))

    async def delete_account(self, call: Call) -> Response:
        await ops.delete_account(self.s, call.params["name"])
        return Response(204)

    async def ip_auth(self, call: Call) -> Response:
        return json_response(ops.ip_auth(self.s))

    async def list_suppressions(self, call: Call) -> Response:
        level = _level(call)
        return json_response(await ops.list_suppressions(self.s, *level,
                                                         everything=not call.arg("global"),
                                                         within=call.account))

    async def add_suppression(self, call: Call) -> Response:
        return json_response(await ops.add_suppression(self.s, call.json()), 201)

    async def delete_suppression(self, call: Call) -> Response:
        await ops.delete_suppression(self.s, call.params["address"], *_level(call))
        return Response(204)

    async def list_webhooks(self, call: Call) -> Response:
        return json_response(await ops.list_webhooks(self.s, call.arg("account"),
                                                     call.account))

    async def add_webhook(self, call: Call) -> Response:
        doc = await ops.add_webhook(self.s, call.json(), call.account)
        return json_response(doc, 201, **{"cache-control": "no-store",
                                          "location": f"{PREFIX}/webhooks/{doc['id']}"})

    async def get_webhook(self, call: Call) -> Response:
        return json_response(await ops.get_webhook(self.s, call.params["endpoint"],
                                                   call.account))

    async def delete_webhook(self, call: Call) -> Response:
        await ops.delete_webhook(self.s, call.params["endpoint"], call.account)
        return Response(204)

    async def rotate_webhook_secret(self, call: Call) -> Response:
        doc = await ops.rotate_webhook_secret(self.s, call.params["endpoint"], call.account)
        return json_response(doc, **{"cache-control": "no-store"})

    async def enable_webhook(self, call: Call) -> Response:
        return json_response(await ops.enable_webhook(self.s, call.params["endpoint"],
                                                      call.account))

    async def failed_webhooks(self, call: Call) -> Response:
        return json_response(await ops.failed_webhooks(self.s, call.arg("account"),
                                                       call.account))

    async def retry_webhook(self, call: Call) -> Response:
        return json_response(await ops.retry_webhook(self.s, call.params["event"],
                                                     call.account), 202)

    async def list_queue(self, call: Call) -> Response:
        return json_response(await ops.list_queue(self.s, _int(call, "limit", 500, 1, 10000),
                                                  call.account))

    async def show_queued(self, call: Call) -> Response:
        return json_response(await ops.show_queued(self.s, call.params["queue_id"]))

    async def retry_queued(self, call: Call) -> Response:
        return json_response(await ops.retry_queued(self.s, call.params["queue_id"]), 202)

    async def release_queued(self, call: Call) -> Response:
        return json_response(await ops.release_queued(self.s, call.params["queue_id"]))

    async def delete_queued(self, call: Call) -> Response:
        await ops.delete_queued(self.s, call.params["queue_id"])
        return Response(204)

    async def list_dkim(self, call: Call) -> Response:
        return json_response(await ops.list_dkim(self.s, call.account))

    async def add_dkim(self, call: Call) -> Response:
        doc = await ops.add_dkim(self.s, call.json())
        return json_response(doc, 201, location=f"{PREFIX}/dkim/{doc['domain']}")

    async def show_dkim(self, call: Call) -> Response:
        return json_response(await ops.show_dkim(self.s, call.params["domain"]))

    async def delete_dkim(self, call: Call) -> Response:
        await ops.delete_dkim(self.s, call.params["domain"], call.params["selector"])
        return Response(204)

    async def activate_dkim(self, call: Call) -> Response:
        p = call.params
        return json_response(await ops.activate_dkim(self.s, p["domain"], p["selector"]))

    async def retire_dkim(self, call: Call) -> Response:
        p = call.params
        return json_response(await ops.retire_dkim(self.s, p["domain"], p["selector"]))

    async def list_domains(self, call: Call) -> Response:
        return json_response(await ops.sending_domains(self.s, call.account))

    async def check_domain(self, call: Call) -> Response:
        return json_response(await ops.check_domain(self.s, call.params["domain"]))

    async def stats(self, call: Call) -> Response:
        return json_response(await ops.stats(
            self.s, call.arg("user"), call.arg("account") or call.account, call.arg("since"),
            call.arg("period"),
        ))  # fmt: skip

    async def explain(self, call: Call) -> Response:
        return json_response(await ops.explain(self.s, call.json()),
                             **{"cache-control": "no-store"})


def _level(call: Call) -> tuple[Any, Any]:
    return call.arg("user") or None, call.arg("account") or None


def _int(call: Call, name: str, default: int, low: int, high: int) -> int:
    text = call.arg(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise HttpError(400, f"{name} must be a whole number")
    if not low <= value <= high:
        raise HttpError(400, f"{name} must be within {low}..{high}")
    return value
