"""mailrelay-admin queue list|show|retry|delete|release|flush|import: look at and act on
the delivery queue.

list and show read the spool (manage.queue). retry, flush and delete ask the running relay
over its control socket, as the panel does; with no relay running they act on the spool
itself and say so. release (of mail held over a quota) needs the running relay: it counts
the message in the user's quota. import takes over the spool of a node that died
(spool/transfer.py).
"""

from __future__ import annotations

import sys
import time

from mailrelay import control, dsnparams
from mailrelay.admin import _output as output
from mailrelay.admin._reactor import run
from mailrelay.admin.cli import CommandError, Context
from mailrelay.manage import queue
from mailrelay.spool import transfer
from mailrelay.spool.spool import Spool


def register(subparsers) -> None:
    parser = subparsers.add_parser("queue", help="the delivery queue: list, show, retry, "
                                                 "delete, release, flush, import")
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

    p = sub.add_parser("release", help="deliver a message held over its user's quota now "
                                       "(it counts in the current period, even past the "
                                       "quota); sandboxed users' mail is never released")
    p.add_argument("id", metavar="ID", nargs="?")
    p.add_argument("--all-quota", action="store_true",
                   help="every message held over a quota")
    p.set_defaults(func=release)

    p = sub.add_parser("flush", help="try every deferred message now")
    p.set_defaults(func=flush)

    p = sub.add_parser("import", help="take over the queue of a node that died")
    p.add_argument("dir", metavar="DIR", help="its data_dir, or its spool directory")
    p.add_argument("--dry-run", action="store_true", help="say what would move; move nothing")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=import_)


def _spool(context: Context) -> Spool:
    return Spool(context.config.spool.directory)


def _span(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def list_(args, context: Context) -> int:
    now = time.time()
    entries, _ = queue.entries(_spool(context), now)
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
        rows.append([e["id"], queue.state_text(e), e["user"] or "-", e["sender"] or "<>", rcpts,
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
    doc = queue.document(spool, args.id, time.time())
    if doc is None:
        raise CommandError(f"message {args.id} left the queue meanwhile")
    if args.json:
        output.print_json(doc)
        return 0
    envelope = doc["envelope"]
    fields = [("id", args.id), ("state", queue.state_text(doc)),
              ("held for", doc["held_quota"] and f"{doc['held_quota']} reached"),
              ("priority", doc["priority"]),
              ("user", doc["user"]), ("account", doc["account"]),
              ("sender", doc["sender"] or "<>"), ("bounce to", envelope.get("bounce_to")),
              ("client", envelope.get("client_ip")), ("helo", envelope.get("helo")),
              ("tls", "yes" if envelope.get("tls") else "no"),
              ("received", output.when(doc["received_at"]) + " UTC"),
              ("size", doc["size"]), ("attempts", doc["attempts"]),
              ("last error", doc["last_error"]),
              ("dsn", dsnparams.mail_params(envelope.get("ret"), envelope.get("envid")).strip())]
    for name, value in fields:
        if value not in (None, ""):
            print(f"{name + ':':12} {value}")
    print("recipients:")
    for r in doc["recipient_status"]:
        reply = f"{r['code'] or ''} {r['text']}".strip()
        where = f" ({r['remote']})" if r["remote"] else ""
        asked = dsnparams.rcpt_params(envelope.get("dsn", {}).get(r["address"]))
        print(f"  {r['address']}  {r['status']}{'  ' + reply if reply else ''}{where}{asked}")
    print("headers:")
    for line in doc["headers"].splitlines():
        print(f"  {line}")
    return 0


OFFLINE = "mailrelay is not running: done in the spool, in force when it starts"


def _ask(context: Context, command, **arguments) -> dict | None:
    """The running relay's answer to ``command`` over its control socket; None when no
    relay runs (the caller then acts on the spool itself)."""
    answers = _ask_each(context, command, [arguments])
    return None if answers is None else answers[0]


def _ask_each(context: Context, command, each: list[dict]) -> list[dict] | None:
    """``command`` with each of the arguments in turn (one run of the reactor: it does not
    start twice); None when no relay runs."""
    path = context.config.server.control_socket

    async def ask(reactor) -> list[dict]:
        return [await control.ask(reactor, path, command, **arguments) for arguments in each]

    arguments = each[0] if each else {}
    try:
        return run(ask)
    except control.RelayNotRunning:
        return None
    except KeyError:
        raise CommandError(f"message {arguments.get('queue_id')} left the queue meanwhile")
    except control.NotQuotaHeld as e:
        raise CommandError(str(e))
    except control.DeliveryOff:
        raise CommandError("delivery is off in the running relay ([delivery] enabled = no)")
    except control.DeliveryNotRunning:
        raise CommandError("the relay's delivery process is restarting; try again in a few "
                           "seconds")
    except Exception as e:  # the connection lost, an answer not understood
        raise CommandError(f"no answer from the relay on {path}") from e


def retry(args, context: Context) -> int:
    if args.id is None:
        return flush(args, context)
    spool = _spool(context)
    if _find(spool, args.id) == "hold":
        raise CommandError(
            f"{args.id} is held: " + ("over its quota; deliver it now with mailrelay-admin "
                                      "queue release" if spool.held_envelope(args.id).quota_held
                                      else "its user is sandboxed: it is never delivered"))
    answer = _ask(context, control.Retry, queue_id=args.id)
    queued = queue.offline_retry(spool, args.id) if answer is None else answer["queued"]
    if not queued:
        raise CommandError(f"message {args.id} left the queue meanwhile")
    print(f"{args.id}: due now" + (f" ({OFFLINE})" if answer is None else ""))
    return 0


def delete(args, context: Context) -> int:
    spool = _spool(context)
    _find(spool, args.id)
    answer = _ask(context, control.Delete, queue_id=args.id)
    try:
        place = spool.delete(args.id) if answer is None else answer["place"]
    except KeyError:
        raise CommandError(f"message {args.id} left the queue meanwhile")
    if answer is None:
        print(f"{args.id}: deleted from {place} ({OFFLINE})")
    else:
        print(f"{args.id}: deleted from {place} (a delivery already under way may still "
              "finish)")
    return 0


def release(args, context: Context) -> int:
    if (args.id is None) == (not args.all_quota):
        raise CommandError("give a message ID or --all-quota")
    if args.id is not None:
        spool = _spool(context)
        if _find(spool, args.id) != "hold":
            raise CommandError(f"{args.id} is not held: it is in the queue")
        if not spool.held_envelope(args.id).quota_held:
            raise CommandError(f"{args.id} is held because its user is sandboxed: it is "
                               "never delivered")
    answer = _ask(context, control.Release, queue_id=args.id)
    if answer is None:
        raise CommandError("mailrelay is not running: a held message is released by the "
                           "running relay (it counts in the user's quota); the relay "
                           "releases those whose quota has reset when it starts")
    released = answer["released"]
    if args.id is not None and not released:
        raise CommandError(f"{args.id} is being released already")
    for queue_id in released:
        print(f"{queue_id}: released to the queue")
    if args.id is None:
        print(f"{len(released)} held messages released")
    return 0


def flush(args, context: Context) -> int:
    answer = _ask(context, control.Flush)
    if answer is None:
        count = queue.offline_flush(_spool(context))
        print(f"{count} deferred messages due now ({OFFLINE})")
    else:
        print(f"{answer['count']} deferred messages due now")
    return 0


def import_(args, context: Context) -> int:
    spool = _spool(context)
    try:
        source = Spool(transfer.spool_directory(args.dir))
        with transfer.lock(source.directory):
            done = transfer.import_spool(source, spool, dry_run=args.dry_run)
    except (ValueError, transfer.SpoolInUse) as e:
        raise CommandError(str(e))
    # The running relay learns of them now (a retry of an id it does not know queues it);
    # otherwise it lists them when it starts.
    told = not args.dry_run and bool(done.queued)
    try:
        if told and _ask_each(context, control.Retry,
                              [{"queue_id": i} for i in done.queued]) is None:
            told = False
    except CommandError as e:  # delivery off or restarting: it lists them when it starts
        print(f"the relay was not told: {e}", file=sys.stderr)
        told = False
    if args.json:
        output.print_json({**done.to_json(), "dry_run": args.dry_run, "relay_told": told})
        return 0
    verb = "would import" if args.dry_run else "imported"
    print(f"{verb} {len(done.queued)} queued and {len(done.held)} held messages from "
          f"{source.directory}")
    if done.present:
        print(f"{len(done.present)} already in this spool, left in {source.directory}: "
              + " ".join(done.present))
    if done.uncommitted:
        print(f"{done.uncommitted} messages in its tmp/ were never acknowledged (their "
              "clients send them again): not imported")
    if done.queued and not args.dry_run:
        print("the relay delivers them now" if told else "delivered when the relay's "
              "delivery next starts (it is not running now)")
    return 0
