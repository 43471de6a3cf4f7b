"""The OpenAPI 3 document of the management API, served at /api/v1/openapi.json.

Written next to nothing else: each schema mirrors a document ops.py returns, and the tests
check the live API against it (openapi-spec-validator, schemathesis).
"""

from __future__ import annotations

from typing import Any

from mailrelay.directory.changes import USER_SETTINGS
from mailrelay.events import EventKind
from mailrelay.features.stats import Event
from mailrelay.features.suppressions import Reason

STR = {"type": "string"}
BOOL = {"type": "boolean"}
NUM = {"type": "number"}
INT = {"type": "integer"}
NULL_INT = {"type": "integer", "nullable": True}
NULL_STR = {"type": "string", "nullable": True}
NULL_NUM = {"type": "number", "nullable": True}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: dict[str, Any], required: list[str] | None = None, closed=False) -> dict:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    if closed:
        schema["additionalProperties"] = False
    return schema


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


_SETTING_SCHEMAS = {
    "account": {**STR, "description": "the account the user belongs to (default: default)"},
    "domains": {**STR, "description": 'named users: authorized sender domains, "a.com;b.com"'},
    "addresses": {**STR, "description": 'named users: authorized sender addresses, "x@a.com"'},
    "note": STR,
    "status": {"type": "string", "enum": ["allowed", "blocked", "sandboxed"]},
    "rate_limit": {**NULL_INT, "description": "messages per hour; null: the configured default"},
    "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    "max_connections": {**NULL_INT, "description": "null: the configured default"},
    "quota_day": {**NULL_INT, "minimum": 0, "description": "messages per UTC day; null: the "
                  "configured default ([limits] quota_per_day); 0: none"},
    "quota_month": {**NULL_INT, "minimum": 0, "description": "messages per UTC month; null: "
                    "the configured default ([limits] quota_per_month); 0: none"},
    "quota_action": {"type": "string", "enum": ["refuse", "hold"], "description":
                     "over a quota: refuse (451 4.7.1 at MAIL) or hold (accepted, held in the "
                     "spool until the quota resets)"},
    "archive": BOOL,
    "audit_bcc": {**STR, "description": 'copies of every message to "x@a.com;y@b.com"'},
    "bounce_notify": {**STR, "description": "off, sender or an address"},
    "unsubscribe_footer": BOOL,
    "open_tracking": BOOL,
    "click_tracking": BOOL,
    "expires": {**NULL_STR, "description": "no login after this day (2027-01-31, UTC) or "
                "time (2027-01-31T18:00Z); null or empty: never"},
    "allow_from": {**STR, "description": 'log in only from "203.0.113.0/24;2001:db8::/32"; '
                   '"": anywhere'},
}
assert set(_SETTING_SCHEMAS) == set(USER_SETTINGS)
# Messages the account's users send together; null (or 0): no quota.
_ACCOUNT_QUOTAS = {f"quota_{p}": {**NULL_INT, "minimum": 0,
                                  "description": f"messages per UTC {p}; null or 0: none"}
                   for p in ("day", "month")}

_USER = obj(
    {
        "username": STR,
        "kind": {"type": "string", "enum": ["domain", "address", "named"]},
        "sender_scope": {**STR, "description": "the senders this login may use"},
        **{k: v for k, v in _SETTING_SCHEMAS.items()},
        "updated": {**NUM, "description": "unix time of the last change"},
        "last_login": {**NULL_NUM, "description": "unix time of the last login; null: none"},
        "last_login_ip": NULL_STR,
        "unverified": {**array(STR), "description": "senders waiting for confirmation"},
    },
    ["username", "kind", "account", "status", "sender_scope", "unverified"],
)

_BOUNCE_DOMAIN = {**NULL_STR, "description": "return-path domain for VERP bounces (a "
                  "subdomain of an authorized domain); null: none"}
_VERIFICATION = obj(
    {
        "sender": STR,
        "method": {"type": "string", "enum": ["link", "dns"]},
        "queue_id": {**STR, "description": "the confirmation mail (method link)"},
        "record": ref("TxtRecord"),
        "error": STR,
        "verified": BOOL,
    },
    ["sender"],
)

_RECIPIENT = obj(
    {"address": STR, "status": {"type": "string", "enum": ["pending", "sent", "failed"]},
     "code": NULL_INT, "text": STR, "remote": NULL_STR},
    ["address", "status"],
)  # fmt: skip

# As mailrelay-admin queue list --json prints it.
_QUEUE_ITEM = {
    "id": STR, "state": {"type": "string", "enum": ["queued", "held"]}, "sender": STR,
    "user": NULL_STR, "account": NULL_STR, "recipients": array(STR), "pending": array(STR),
    "size": INT, "received_at": NUM, "age": NUM, "priority": INT, "attempts": INT,
    "next_attempt": {**NULL_NUM, "description": "null: never (held)"}, "last_error": STR,
    "held": {**NULL_STR, "enum": ["sandbox", "quota", None],
             "description": "why a held message is held: its user is sandboxed (never "
                            "delivered) or it went over a quota (released at held_until)"},
    "held_until": {**NULL_NUM, "description": "quota: when it is released"},
    "held_quota": {**NULL_STR, "description": "quota: which quota it went over"},
}  # fmt: skip

_COUNTS = {e.value: INT for e in Event}

_TXT = obj({"name": STR, "type": {"type": "string", "enum": ["TXT"]}, "value": STR},
           ["name", "type", "value"])
_STATUS = {"type": "string", "enum": ["ok", "missing", "wrong", "unknown"]}
_PUBLISHED = {"type": "string", "enum": ["ok", "missing", "different", "unknown"]}

_KIND = {"type": "string", "enum": [k.value for k in EventKind]}

_EXPLAIN_COUNT = {"type": "integer", "minimum": 0, "maximum": 10**12}

SCHEMAS: dict[str, Any] = {
    "ExplainRequest": obj(
        {"username": STR, "sender": {**STR, "description": "the MAIL FROM address"},
         "from_header": {**STR, "description": "the From: header address (default: sender)"},
         "ip": {**STR, "description": "the client's address: blocked after failed logins?"},
         "recipients": {**_EXPLAIN_COUNT, "minimum": 1,
                        "description": "how many RCPT TO (default 1)"},
         "size": {**_EXPLAIN_COUNT, "description": "MAIL FROM's SIZE= in bytes"}},
        ["username", "sender"], closed=True,
    ),
    "Explanation": obj(
        {"user": STR, "sender": STR,
         "accepted": {**BOOL, "description": "no step would be refused"},
         "steps": array(obj({"step": STR, "reply": {**STR, "description": "the reply line"},
                             "rule": {**STR, "description": "what decided it"}},
                            ["step", "reply", "rule"])),
         "limits": {"description": "the running relay's rate-limit state, or the text "
                                   "'relay not running: limit state unknown'",
                    "oneOf": [STR, obj({"used_hour": INT, "used_minute": INT,
                                        "refusal": STR, "login_refusal": STR,
                                        "login_wait": NUM},
                                       ["used_hour", "used_minute", "refusal"])]}},
        ["user", "sender", "accepted", "steps", "limits"],
    ),  # fmt: skip
    "Error": obj({"error": STR, "status": INT, "reason": STR, "allow": array(STR)},
                 ["error", "status"]),  # fmt: skip
    "User": _USER,
    "UserNew": obj({"username": STR, **_SETTING_SCHEMAS}, ["username"], closed=True),
    "UserChange": {**obj(dict(_SETTING_SCHEMAS), closed=True), "minProperties": 1},
    "UserCreated": obj(
        {"user": ref("User"), "password": {**STR, "description": "shown only in this response"},
         "verification": array(ref("Verification"))},
        ["user", "password", "verification"],
    ),  # fmt: skip
    "UserChanged": obj({"user": ref("User"), "verification": array(ref("Verification"))},
                       ["user", "verification"]),  # fmt: skip
    "Password": obj({"username": STR, "password": STR}, ["username", "password"]),
    "TxtRecord": _TXT,
    "Verification": _VERIFICATION,
    "Sender": obj(
        {"sender": STR, "kind": {"type": "string", "enum": ["domain", "address"]},
         "verified": BOOL, "method": {"type": "string", "enum": ["link", "dns"]},
         "record": ref("TxtRecord")},
        ["sender", "kind", "verified"],
    ),  # fmt: skip
    "Account": obj({"name": STR, "domains": STR, "notify": NULL_STR, "note": STR,
                    "bounce_domain": _BOUNCE_DOMAIN, **_ACCOUNT_QUOTAS, "users": array(STR)},
                   ["name", "domains", "users"]),  # fmt: skip
    "AccountNew": obj({"name": STR, "domains": STR, "notify": NULL_STR, "note": STR,
                       "bounce_domain": _BOUNCE_DOMAIN, **_ACCOUNT_QUOTAS}, ["name"],
                      closed=True),  # fmt: skip
    "AccountChange": {
        **obj({"domains": STR, "notify": NULL_STR, "note": STR,
               "bounce_domain": _BOUNCE_DOMAIN, **_ACCOUNT_QUOTAS}, closed=True),
        "minProperties": 1,
    },
    "IpAuth": obj(
        {"networks": array(obj({"network": STR, "username": STR}, ["network", "username"])),
         "addresses": array(STR), "read_only": BOOL, "configured_in": STR},
        ["networks", "addresses", "read_only"],
    ),  # fmt: skip
    "Suppression": obj(
        {"address": STR, "account": NULL_STR, "user": NULL_STR,
         "reason": {"type": "string", "enum": [r.value for r in Reason]}, "created": NUM},
        ["address", "account", "user", "reason", "created"],
    ),  # fmt: skip
    "SuppressionNew": obj(
        {"address": STR, "user": NULL_STR, "account": NULL_STR,
         "reason": {"type": "string", "enum": [r.value for r in Reason]}},
        ["address"], closed=True,
    ),  # fmt: skip
    "Webhook": obj(
        {"id": INT, "account": STR, "url": STR,
         "users": {**array(STR), "description": "only these SMTP users' events (empty: all)"},
         "events": {**array(_KIND), "description": "only these kinds (empty: all)"},
         "enabled": {**BOOL, "description": "false after a 410 Gone, until enabled"},
         "disabled_reason": STR, "created": NUM,
         "secrets": {**array(STR), "description": "whsec_... secrets signing now, newest "
                     "first (only when added or rotated)"}},
        ["id", "account", "url", "users", "events", "enabled", "created"],
    ),
    "WebhookNew": obj(
        {"account": STR, "url": {**STR, "description": "http(s) URL events are POSTed to"},
         "users": array(STR), "events": array(_KIND)},
        ["account", "url"], closed=True,
    ),
    "WebhookFailed": obj(
        {"id": INT, "event_id": STR, "endpoint": INT, "account": STR, "type": _KIND,
         "created": NUM, "attempts": INT, "last_attempt": NUM, "last_status": NULL_INT,
         "last_error": STR, "payload": {"type": "object", "description": "the body sent"}},
        ["id", "event_id", "endpoint", "account", "type", "created", "attempts",
         "last_error", "payload"],
    ),
    "WebhookRetry": obj({"id": INT, "retry": STR}, ["id"]),
    "QueueList": obj({"total": INT, "messages": array(ref("QueueItem"))}, ["total", "messages"]),
    "QueueItem": obj(_QUEUE_ITEM, ["id", "state", "sender", "recipients"]),
    "QueueDetail": obj(
        {**_QUEUE_ITEM, "envelope": {"type": "object"},
         "delivery": {"type": "object", "nullable": True},
         "recipient_status": array(_RECIPIENT), "headers": STR},
        ["id", "state", "sender", "recipients", "envelope", "recipient_status", "headers"],
    ),  # fmt: skip
    "Retry": obj({"id": STR, "retry": STR}, ["id"]),
    "Release": obj({"id": STR, "released": BOOL}, ["id", "released"]),
    "DkimKey": obj(
        {"domain": STR, "selector": STR, "type": {"type": "string", "enum": ["rsa", "ed25519"]},
         "state": {"type": "string", "enum": ["pending", "active", "retiring"]},
         "account": {**NULL_STR, "description": "the account whose mail it signs (null: "
                     "a key of the relay domain, for every account)"},
         "created": NUM,
         "changed": {**NULL_NUM, "description": "when the state last changed (null: never)"},
         "published": {**_PUBLISHED, "description": "its record as looked up in DNS now"},
         "dns_status": {**_PUBLISHED, "enum": [*_PUBLISHED["enum"], None], "nullable": True,
                        "description": "the relay's last "
                        "scheduled look-up ([dkim] check_interval; null: none yet)"},
         "dns_checked": {**NULL_NUM, "description": "when that look-up was made"},
         "withdraw_after": {**NUM, "description": "a retiring key: from when its record "
                            "can be withdrawn from DNS ([dkim] retire_after)"},
         "dns_name": {**STR, "description": "the TXT record's name: SELECTOR._domainkey.DOMAIN"},
         "dns_value": {**STR, "description": "its value: v=DKIM1; k=...; p=..."},
         "dns_strings": {**array(STR), "description": "the value as character-strings of "
                         "at most 255 bytes, as a zone file needs them"}},
        ["domain", "selector", "type", "state", "account", "created"],
    ),  # fmt: skip
    "DkimNew": obj(
        {"domain": {**STR, "description": "an authorized domain of exactly one account"},
         "selector": {**NULL_STR, "description": "one DNS label (default: YYYYMM, and an e "
                      "for ed25519)"},
         "type": {"type": "string", "enum": ["rsa", "ed25519"]},
         "bits": {"type": "integer", "minimum": 1024, "maximum": 4096,
                  "description": "RSA key size (default 2048)"}},
        ["domain"], closed=True,
    ),  # fmt: skip
    "DkimSwitch": obj({"active": ref("DkimKey"), "retiring": array(ref("DkimKey"))},
                      ["active", "retiring"]),
    "DomainCheck": obj(
        {"domain": STR, "ok": {**BOOL, "description": "every check is ok"},
         "spf": ref("RecordCheck"),
         "dkim": {**array(ref("RecordCheck")), "description": "one per DKIM key"},
         "dmarc": ref("RecordCheck"),
         "return_path": ref("ReturnPathCheck")},
        ["domain", "ok", "spf", "dkim", "dmarc"],
    ),  # fmt: skip
    "ReturnPathCheck": obj(
        {"domain": {**STR, "description": "the bounce domain of the domain's account (the "
                    "item is there only when it has one)"},
         "mx_host": {**STR, "description": "what its MX must name ([bounces] mx_host)"},
         "status": _STATUS, "detail": STR, "record": NULL_STR, "publish": NULL_STR,
         "mx": obj({"status": _STATUS, "detail": STR, "record": NULL_STR,
                    "publish": {**obj({"name": STR, "type": {"type": "string", "enum": ["MX"]},
                                       "value": STR}, ["name", "type", "value"]),
                                "nullable": True}}, ["status", "detail"]),
         "spf": ref("RecordCheck")},
        ["domain", "status", "detail", "mx", "spf"],
    ),  # fmt: skip
    "RecordCheck": obj(
        {"status": _STATUS,
         "detail": STR,
         "name": {**STR, "description": "where it is looked up (DKIM, DMARC)"},
         "record": {**NULL_STR, "description": "the record found"},
         "publish": {**_TXT, "nullable": True,
                     "description": "the record to publish (null: nothing to do)"},
         "selector": STR, "state": STR, "policy": NULL_STR,
         "dkim_aligned": BOOL, "spf_aligned": BOOL,
         "addresses": {"type": "object", "additionalProperties": STR,
                       "description": "SPF: each outbound address and its result"}},
        ["status", "detail"],
    ),  # fmt: skip
    "Stats": obj(
        {"user": NULL_STR, "account": NULL_STR, "since": NULL_NUM,
         "period": {"type": "string", "enum": ["hour", "day", None], "nullable": True},
         "totals": obj(_COUNTS),
         "periods": array(obj({"start": NUM, "account": STR, "user": STR, **_COUNTS}))},
        ["totals"],
    ),  # fmt: skip
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    out: dict[str, Any] = {str(c): {"$ref": f"#/components/responses/E{c}"} for c in codes}
    out["default"] = _json(ref("Error"), "any other error")
    return out


def _path_param(name: str, description: str) -> dict:
    return {"name": name, "in": "path", "required": True, "schema": STR,
            "description": description}  # fmt: skip


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}  # fmt: skip


def _body(schema: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": ref(schema)}}}


def _op(summary: str, ok: dict[str, Any], *errors: int, **more: Any) -> dict[str, Any]:
    # Every operation refuses unknown query parameters (400) and a missing key (401).
    codes = sorted({400, 401, *errors})
    return {"summary": summary, "responses": {**ok, **_errors(*codes)}, **more}


USER = _path_param("username", "a domain, an address or a name")
ACCOUNT = _path_param("name", "account name")
QUEUE_ID = _path_param("queue_id", "18 characters: priority digit, then hex")
WEBHOOK = _path_param("endpoint", "a webhook endpoint's id")
NO_CONTENT = {"204": {"description": "done"}}
DKIM_KEY = [_path_param("domain", "the key's domain"),
            _path_param("selector", "the key's selector")]
LEVEL = [
    _query("user", STR, "a user's list"),
    _query("account", STR, "an account's list (all its users)"),
]


def openapi_document() -> dict[str, Any]:
    writes = (400, 403, 404, 405, 409, 415, 503)
    paths = {
        "/openapi.json": {"get": {"summary": "this document", "security": [],
                                  "responses": {"200": _json({"type": "object"},
                                                             "OpenAPI 3 document")}}},
        "/users": {
            "get": _op("list SMTP users", {"200": _json(array(ref("User")), "users")}, 404, 503,
                       parameters=[_query("account", STR, "only this account's users")]),
            "post": _op("add a user; its generated password is in this response only",
                        {"201": _json(ref("UserCreated"), "added")}, *writes,
                        requestBody=_body("UserNew")),
        },
        "/users/{username}": {
            "parameters": [USER],
            "get": _op("show a user", {"200": _json(ref("User"), "the user")}, 404, 503),
            "patch": _op("change a user's settings (only the fields given)",
                         {"200": _json(ref("UserChanged"), "changed")}, *writes,
                         requestBody=_body("UserChange")),
            "delete": _op("delete a user", NO_CONTENT, 403, 404, 405, 503),
        },
        "/users/{username}/password": {
            "parameters": [USER],
            "post": _op("reset the password: a new generated one, in this response only",
                        {"200": _json(ref("Password"), "the new password")}, 403, 404, 405,
                        503),
        },
        "/users/{username}/senders": {
            "parameters": [USER],
            "get": _op("the user's senders and their verification",
                       {"200": _json(array(ref("Sender")), "senders")}, 404, 503),
        },
        "/users/{username}/senders/{sender}/verify": {
            "parameters": [USER, _path_param("sender", "a domain or address of its scope")],
            "post": _op("address: mail the confirmation link again; domain: check its TXT "
                        "record now", {"200": _json(ref("Verification"), "result")},
                        403, 404, 405, 409, 503),
        },
        "/accounts": {
            "get": _op("list accounts", {"200": _json(array(ref("Account")), "accounts")}, 503),
            "post": _op("add an account", {"201": _json(ref("Account"), "added")}, *writes,
                        requestBody=_body("AccountNew")),
        },
        "/accounts/{name}": {
            "parameters": [ACCOUNT],
            "get": _op("show an account", {"200": _json(ref("Account"), "the account")}, 404,
                       503),
            "patch": _op("change an account (domains replaces the list)",
                         {"200": _json(ref("Account"), "changed")}, *writes,
                         requestBody=_body("AccountChange")),
            "delete": _op("delete an account without users", NO_CONTENT, 403, 404, 405, 409,
                          503),
        },
        "/ip-auth": {
            "get": _op("IP and address authentication (from the configuration; read-only)",
                       {"200": _json(ref("IpAuth"), "networks and addresses")}),
        },
        "/suppressions": {
            "get": _op("suppressed addresses: one list, or all of them",
                       {"200": _json(array(ref("Suppression")), "entries")}, 400, 404, 503,
                       parameters=[*LEVEL, _query("global", STR, "any value: the global "
                                                  "list only")]),
            "post": _op("suppress an address (user, account, or neither: global)",
                        {"201": _json(ref("Suppression"), "added")}, *writes,
                        requestBody=_body("SuppressionNew")),
        },
        "/suppressions/{address}": {
            "parameters": [_path_param("address", "the suppressed address")],
            "delete": _op("remove an address from a list (none given: the global list)",
                          NO_CONTENT, 400, 403, 404, 503, parameters=LEVEL),
        },
        "/webhooks": {
            "get": _op("webhook endpoints", {"200": _json(array(ref("Webhook")), "endpoints")},
                       404, 503, parameters=[_query("account", STR, "only this account's")]),
            "post": _op("add an endpoint; its secret is in this response",
                        {"201": _json(ref("Webhook"), "added")}, 400, 403, 404, 415, 503,
                        requestBody=_body("WebhookNew")),
        },
        "/webhooks/failed": {
            "get": _op("events that could not be sent, newest first",
                       {"200": _json(array(ref("WebhookFailed")), "failed events")}, 404,
                       503, parameters=[_query("account", STR, "only this account's")]),
        },
        "/webhooks/failed/{event}/retry": {
            "parameters": [_path_param("event", "a failed event's id")],
            "post": _op("send a failed event again now (409: its endpoint is disabled)",
                        {"202": _json(ref("WebhookRetry"), "scheduled")}, 403, 404, 409,
                        503),
        },
        "/webhooks/{endpoint}": {
            "parameters": [WEBHOOK],
            "get": _op("one endpoint", {"200": _json(ref("Webhook"), "the endpoint")}, 404,
                       503),
            "delete": _op("delete an endpoint and its events", NO_CONTENT, 403, 404, 503),
        },
        "/webhooks/{endpoint}/rotate-secret": {
            "parameters": [WEBHOOK],
            "post": _op("a new secret; the old one signs too for [webhooks] secret_overlap",
                        {"200": _json(ref("Webhook"), "with its secrets")}, 403, 404, 503),
        },
        "/webhooks/{endpoint}/enable": {
            "parameters": [WEBHOOK],
            "post": _op("send to a disabled endpoint again",
                        {"200": _json(ref("Webhook"), "enabled")}, 403, 404, 503),
        },
        "/queue": {
            "get": _op("queued and held messages, in delivery order",
                       {"200": _json(ref("QueueList"), "messages")}, 400,
                       parameters=[_query("limit", {"type": "integer", "minimum": 1,
                                                    "maximum": 10000}, "at most this many")]),
        },
        "/queue/{queue_id}": {
            "parameters": [QUEUE_ID],
            "get": _op("one message: envelope, recipients' status, headers",
                       {"200": _json(ref("QueueDetail"), "the message")}, 404),
            "delete": _op("delete a message (no bounce is sent)", NO_CONTENT, 403, 404),
        },
        "/queue/{queue_id}/release": {
            "parameters": [QUEUE_ID],
            "post": _op("deliver a message held over its user's quota now (quota_action "
                        "hold); it counts in the current period, even past the quota. A "
                        "sandboxed user's held message is never released (409)",
                        {"200": _json(ref("Release"), "released to the queue")}, 403, 404,
                        409),
        },
        "/queue/{queue_id}/retry": {
            "parameters": [QUEUE_ID],
            "post": _op("try to deliver now", {"202": _json(ref("Retry"), "scheduled")}, 403,
                        404, 409, 503),
        },
        "/dkim": {
            "get": _op("every DKIM key (without its record)",
                       {"200": _json(array(ref("DkimKey")), "keys")}, 503),
            "post": _op("make a DKIM key: the domain's first of its type is active at once "
                        "(publish its record before mail from the domain goes out), a further "
                        "one pending until the relay sees its record in DNS",
                        {"201": _json(ref("DkimKey"), "made, with its TXT record")},
                        400, 403, 409, 415, 503,
                        requestBody=_body("DkimNew")),
        },
        "/dkim/{domain}": {
            "parameters": [_path_param("domain", "a domain with DKIM keys")],
            "get": _op("a domain's keys with the TXT records to publish",
                       {"200": _json(array(ref("DkimKey")), "keys and records")}, 404, 503),
        },
        "/dkim/{domain}/{selector}": {
            "parameters": DKIM_KEY,
            "delete": _op("delete a key and its private key file (mail is no longer signed "
                          "with it)", NO_CONTENT, 403, 404, 503),
        },
        "/dkim/{domain}/{selector}/activate": {
            "parameters": DKIM_KEY,
            "post": _op("sign with this pending key from now on, once its record is in DNS "
                        "(409 until then); the active key of its type becomes retiring",
                        {"200": _json(ref("DkimSwitch"), "switched")}, 403, 404, 409, 503),
        },
        "/dkim/{domain}/{selector}/retire": {
            "parameters": DKIM_KEY,
            "post": _op("delete a retiring key (409 for a key in another state): its record "
                        "can then be withdrawn", {"200": _json(ref("DkimKey"), "deleted")},
                        403, 404, 409, 503),
        },
        "/domains": {
            "get": _op("the domains the relay sends for: the accounts' authorized domains, "
                       "those with DKIM keys, the relay domain",
                       {"200": _json(array(STR), "domain names")}, 503),
        },
        "/domains/{domain}/check": {
            "parameters": [_path_param("domain", "a domain the relay sends for")],
            "get": _op("SPF, DKIM and DMARC of the domain as published in DNS now, each ok, "
                       "missing, wrong or unknown with the record to publish (mailrelay-admin "
                       "domain check --json)", {"200": _json(ref("DomainCheck"), "the report")},
                       404, 503),
        },
        "/explain": {
            "post": _op("what the relay would answer the user at each step of a submission "
                        "and which rule decided; changes nothing (read-only keys may ask)",
                        {"200": _json(ref("Explanation"), "the steps")}, 404, 415, 503,
                        requestBody=_body("ExplainRequest")),
        },
        "/stats": {
            "get": _op("statistics per user or account and period",
                       {"200": _json(ref("Stats"), "counts")}, 400, 404, 503, parameters=[
                           _query("user", STR, "one SMTP user"),
                           _query("account", STR, "one account"),
                           _query("since", STR, "a date (2026-11-01, UTC) or a duration "
                                  "back from now (7d, 12h)"),
                           _query("period", {"type": "string", "enum": ["hour", "day"]},
                                  "one row per hour or day"),
                       ]),
        },
    }  # fmt: skip
    responses = {
        f"E{code}": _json(ref("Error"), text)
        for code, text in {
            400: "bad input; nothing was changed",
            401: "no API key, or an unknown one",
            403: "the API key is read-only, or limited to one account and this is relay-wide",
            404: "no such user, account, sender, address, message, DKIM key, sending domain, "
                 "webhook endpoint or failed event (or, for a key limited to one account, "
                 "another account's)",
            405: "users and accounts are read-only here (LDAP directory)",
            409: "conflicts with what exists (name taken, still in use, already listed, a "
                 "DKIM key in another state or its record not yet in DNS, a webhook endpoint "
                 "disabled)",
            415: "the body is not application/json",
            503: "the directory, the spool, DNS or the delivery process cannot answer now; "
                 "try again (webhooks: [webhooks] enabled = no)",
        }.items()
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "mailrelay management API",
            "version": "1",
            "description": "SMTP users, accounts, suppressions, queue, DKIM keys, webhooks, "
            "sending "
            "domains' DNS records and statistics of a "
            "mailrelay. Authenticate with 'Authorization: Bearer <key>' (mailrelay-admin "
            "apikey add NAME --read-only|--read-write [--account ACCOUNT]). A key made with "
            "--account sees and changes only that account's objects: another account's are "
            "404, relay-wide resources 403. Errors are {\"error\": \"...\"}.",
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": SCHEMAS,
            "responses": responses,
        },
    }
