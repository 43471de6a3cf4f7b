"""mailrelay-admin queue list|show|retry|delete|flush: look at and act on the delivery queue.

Reads the spool directly (never opening it, so a running daemon is undisturbed). retry and
flush leave a request in <spool>/control/ that the running daemon picks up within about a
second (or at its next start); delete removes the files at once.
"""

from __future__ import annotations

import time

from mailrelay.admin import _output as output
from mailrelay.admin.cli import CommandError, Context
from mailrelay.delivery.manager import FLUSH, RETRY_PREFIX, request
from mailrelay.model import Envelope
from mailrelay.spool.spool import Snapshot, Spool
from mailrelay.spool.state import DeliveryState, RecipientState


def register(subparsers) -> None:
    parser = subparsers.add_parser("queue", help="the delivery queue: list, show, retry, "
                                                 "delete, flush")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("list", help="queued and held messages")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=list_)

    p = sub.add_parser("show", help="one message: envelope, recipients, headers")
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=show)

    p = sub.add_parser("retry", help="try a deferred message (or all of them) now")
    p.add_argument("id", metavar="ID", nargs="?")
    p.set_defaults(func=retry)

    p = sub.add_parser("delete", help="remove a message without delivering it")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=delete)

    p = sub.add_parser("flush", help="try every deferred message now")
    p.set_defaults(func=flush)


def _spool(context: Context) -> Spool:
    return Spool(context.config.spool.directory)


def _ids(spool: Spool, place: str) -> list[str]:
    try:
        return spool.queued() if place == "queue" else spool.held()
    except FileNotFoundError:  # nothing was ever queued
        return []


def _entry(spool: Spool, queue_id: str, state: DeliveryState | None,
           now: float) -> tuple[dict, Snapshot] | None:
    try:
        snap = spool.snapshot(queue_id)
    except (KeyError, FileNotFoundError):  # delivered meanwhile
        return None
    envelope, place = snap.envelope, snap.place
    attempts = state.attempts if state else 0
    if place == "hold":
        next_attempt = None
    elif state is None or state.next_attempt is None:
        next_attempt = now
    else:
        next_attempt = state.next_attempt
    return {
        "id": queue_id,
        "state": "held" if place == "hold" else "queued",
        "priority": envelope.priority,
        "user": envelope.user,
        "account": envelope.account,
        "sender": envelope.sender,
        "recipients": envelope.recipients,
        "pending": state.pending() if state else list(envelope.recipients),
        "size": snap.size,
        "received_at": envelope.received_at,
        "age": max(0.0, now - envelope.received_at),
        "attempts": attempts,
        "next_attempt": next_attempt,
        "last_error": state.last_error if state else "",
    }, snap


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def list_(args, context: Context) -> int:
    spool = _spool(context)
    now = time.time()
    try:
        states = spool.all_states()
    except FileNotFoundError:
        states = {}
    entries = []
    for place in ("queue", "hold"):
        for queue_id in _ids(spool, place):
            found = _entry(spool, queue_id, states.get(queue_id), now)
            if found is not None:
                entries.append(found[0])
    if args.json:
        output.print_json(entries)
        return 0
    rows = []
    for e in entries:
        rcpts = e["recipients"][0] + (f" (+{len(e['recipients']) - 1})"
                                      if len(e["recipients"]) > 1 else "")
        if e["next_attempt"] is None:
            when = "never"
        elif e["next_attempt"] <= now:
            when = "now"
        else:
            when = "in " + _span(e["next_attempt"] - now)
        rows.append([e["id"], e["state"], e["user"] or "-", e["sender"] or "<>", rcpts,
                     str(e["size"]), _span(e["age"]), str(e["attempts"]), when,
                     e["last_error"][:60]])
    output.print_list(["ID", "STATE", "USER", "SENDER", "RECIPIENTS", "SIZE", "AGE",
                       "ATTEMPTS", "NEXT", "LAST ERROR"], rows, "the queue is empty")
    return 0


def _find(spool: Spool, queue_id: str) -> str:
    place = spool.locate(queue_id)
    if place is None:
        raise CommandError(f"no message {queue_id!r} in the queue (see mailrelay-admin queue "
                           "list)")
    return place


def show(args, context: Context) -> int:
    spool = _spool(context)
    _find(spool, args.id)
    state = spool.read_state(args.id)
    found = _entry(spool, args.id, state, time.time())
    if found is None:
        raise CommandError(f"message {args.id} left the queue meanwhile")
    entry, snap = found
    envelope, headers = snap.envelope, snap.headers.decode("utf-8", "replace")
    recipients = _recipients(envelope, state)
    if args.json:
        output.print_json({**entry, "envelope": envelope.to_json(),
                           "delivery": state.to_json() if state else None,
                           "recipient_status": recipients, "headers": headers})
        return 0
    fields = [("id", args.id), ("state", entry["state"]), ("priority", envelope.priority),
              ("user", envelope.user), ("account", envelope.account),
              ("sender", envelope.sender or "<>"), ("bounce to", envelope.bounce_to),
              ("client", envelope.client_ip), ("helo", envelope.helo),
              ("tls", "yes" if envelope.tls else "no"),
              ("received", output.when(envelope.received_at) + " UTC"),
              ("size", entry["size"]), ("attempts", entry["attempts"]),
              ("last error", entry["last_error"])]
    for name, value in fields:
        if value not in (None, ""):
            print(f"{name + ':':12} {value}")
    print("recipients:")
    for r in recipients:
        reply = f"{r['code'] or ''} {r['text']}".strip()
        where = f" ({r['remote']})" if r["remote"] else ""
        print(f"  {r['address']}  {r['status']}{'  ' + reply if reply else ''}{where}")
    print("headers:")
    for line in headers.splitlines():
        print(f"  {line}")
    return 0


def _recipients(envelope: Envelope, state: DeliveryState | None) -> list[dict]:
    states = state.recipients if state else {}
    return [{"address": rcpt, **states.get(rcpt, RecipientState()).to_json()}
            for rcpt in envelope.recipients]


def _request(context: Context, name: str) -> None:
    try:
        request(context.config.spool.directory, name)
    except OSError as e:
        raise CommandError(f"cannot leave a request in {context.config.spool.directory}/"
                           f"control: {e.strerror}")


def retry(args, context: Context) -> int:
    if args.id is None:
        _request(context, FLUSH)
        print("retry of every deferred message requested (the daemon acts within a second, "
              "or at its next start)")
        return 0
    place = _find(_spool(context), args.id)
    if place == "hold":
        raise CommandError(f"{args.id} is held (its user is sandboxed): it is never delivered")
    _request(context, RETRY_PREFIX + args.id)
    print(f"{args.id}: retry requested (the daemon acts within a second, or at its next start)")
    return 0


def delete(args, context: Context) -> int:
    spool = _spool(context)
    _find(spool, args.id)
    try:
        place = spool.delete(args.id)
    except KeyError:
        raise CommandError(f"message {args.id} left the queue meanwhile")
    print(f"{args.id}: deleted from {place} (a delivery already under way may still finish)")
    return 0


def flush(args, context: Context) -> int:
    _request(context, FLUSH)
    print("flush requested (the daemon acts within a second, or at its next start)")
    return 0

