#!/usr/bin/env python3
"""mailrelay against Postfix on this machine: the one bench command (see bench/README.md).

    python3 bench/run.py [--quick | --smoke] [--rounds 3] [--key-type ecdsa|rsa] [--dkim]
    python3 bench/run.py --cluster [--quick | --smoke] [--rounds 3]
    python3 bench/run.py --webhooks --quotas [--quick | --smoke] [--rounds 3]
    python3 bench/run.py --postgres [--quick | --smoke] [--rounds 3]

Installs Postfix if missing (bench/setup.sh, not in --smoke), starts a timing sink, a
private Postfix instance and mailrelay on loopback ports chosen at run time, runs the same
load against each in turn (mailrelay, Postfix, mailrelay, Postfix, ...), and prints the
medians over the rounds with the ratio mailrelay/Postfix. Every run is bounded; only the
processes started here are stopped, by PID (Postfix by ``postfix -c DIR stop``).
``--cluster`` measures only mailrelay, on local counters against shared ones in a private
redis-server (bench/cluster.py). ``--webhooks`` and ``--quotas`` measure mailrelay with
each feature against the same mailrelay without it and Postfix (bench/features.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import cluster, features, figures, opendkim, postfix, procs, relay  # noqa: E402
from bench.certs import KEY_TYPES, make_certificate  # noqa: E402
from bench.figures import FULL, QUICK, SMOKE, Figure, Measure, Value, median  # noqa: E402
from bench.hooksink import HookSinkProcess  # noqa: E402
from bench.load import LoadSpec, run_load  # noqa: E402
from bench.sink import SinkProcess  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def machine() -> str:
    disk = subprocess.run(["df", "-h", "--output=source,fstype,size", tempfile.gettempdir()],
                          capture_output=True, text=True).stdout.splitlines()[-1].split()
    return (f"{os.cpu_count()} cores, {platform.machine()}, Linux {platform.release()}, "
            f"temp dir on {' '.join(disk)}")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ---- ceilings: the client and the sink without a server in between ----

def ceilings(sink: SinkProcess, sizes: figures.Sizes) -> list[str]:
    out = []
    n = max(200, sizes.accept_c20)
    for mode in ("plain", "starttls", "tls"):
        for per in (1, 10):
            spec = LoadSpec(port=sink.tls_port if mode == "tls" else sink.port, mode=mode,
                            conns=20, per_conn=per, total=n, tag="ceil",
                            users=[figures.USER], timeout=sizes.run_timeout)
            r = run_load(spec)
            out.append(f"load.py -> sink.py, {mode}, c=20, {per} msg/conn: {r.rate:,.0f}/s "
                       f"(client CPU {1e3 * r.cpu / max(r.ok, 1):.2f} ms/msg)")
    if figures.smtp_source_available():
        t0 = time.monotonic()
        subprocess.run([figures.SMTP_SOURCE, "-s", "20", "-m", str(n), "-l", "5120",
                        f"{procs.HOST}:{sink.port}"], capture_output=True,
                       timeout=sizes.run_timeout)
        out.append(f"smtp-source -> sink.py, c=20, 1 msg/conn: "
                   f"{n / (time.monotonic() - t0):.0f}/s")
    for line in out:
        say(f"ceiling: {line}")
    return out


# ---- one round of one server ----

def measure_round(server, m: Measure, figs: list[Figure]) -> dict[str, Value]:
    keys = {f.key for f in figs}
    out: dict[str, Value] = {}

    def guard(key: str, fn) -> None:
        try:
            got = fn()
        except Exception as e:  # a figure that cannot be made must not stop the bench
            say(f"{server.name} {key}: {type(e).__name__}: {e}")
            got = Value(None, f"n/a ({type(e).__name__}: {str(e)[:80]})")
        if isinstance(got, dict):
            out.update(got)
        else:
            out[key] = got

    guard("mem.idle", m.memory_idle)
    for key in sorted(k for k in keys if k.startswith("accept.")):
        _, mode, conns, per, *tool = key.split(".")
        if tool:
            guard(key, m.accept_smtp_source)
        else:
            guard(key, lambda mode=mode, c=int(conns[1:]), p=int(per[1:]): m.accept(mode, c, p))
    guard("e2e.rate", m.end_to_end)
    # The big message before the sessions, which leave idle smtpd processes behind in
    # Postfix; the distinct-user logins before the sessions log those users in (and fill
    # mailrelay's login cache).
    guard("mem.big", m.memory_big)
    guard("login.one", lambda: m.logins(False))
    guard("login.many", lambda: m.logins(True))
    guard("mem.sessions", m.memory_sessions)
    return out


def not_running(figs: list[Figure], why: str) -> dict[str, Value]:
    return {f.key: Value(None, why) for f in figs}


# ---- the table ----

def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "ms":
        return f"{value:.2f} ms" if abs(value) < 10 else f"{value:.1f} ms"
    if unit == "MB":
        return f"{value:.1f} MB"
    return f"{value:.2f} s"


def verdict(fig: Figure, mr: float | None, ratio: float | None) -> str:
    if fig.ratio_target is not None:
        if ratio is None:
            return fig.target
        return f"{fig.target} {'met' if ratio >= fig.ratio_target else 'NOT met'}"
    if fig.limit is not None:
        if mr is None:
            return fig.target
        return f"{fig.target} {'met' if mr < fig.limit else 'NOT met'}"
    return ""


def auth_cost(results: dict[str, dict[str, Value]]) -> str:
    """Figure 2 against figure 1: each AUTH accept rate as a fraction of the IP-auth one."""
    lines = ["AUTH against IP authentication (accept rate with AUTH / without):"]
    for conns in (1, 20):
        for per in (1, 10):
            cells = []
            for name in ("mailrelay", "Postfix"):
                plain = results[name].get(f"accept.plain.c{conns}.m{per}", Value(None)).value
                for mode, label in (("starttls", "STARTTLS"), ("tls", "implicit TLS")):
                    auth = results[name].get(f"accept.{mode}.c{conns}.m{per}", Value(None))
                    ratio = f"{auth.value / plain:.2f}" if auth.value and plain else "n/a"
                    cells.append(f"{name} {label} {ratio}")
            lines.append(f"  c={conns}, {per} msg/conn: " + ", ".join(cells))
    return "\n".join(lines)


def cpu_cost(figs: list[Figure], results: dict[str, dict[str, Value]]) -> str:
    """Where the cores go: CPU per message of all of each server's processes, from the
    start of a run until the sink has its messages (receiving and delivering), and how
    busy the whole machine was while the clients sent (client, sink and server)."""
    lines = ["Server CPU per message, all of the server's processes, receiving and "
             "delivering (ms, median of rounds); in brackets, the machine's CPU busy while "
             "the clients sent (client, sink and server together):"]
    for f in figs:
        if not (f.key.startswith("accept.") or f.key == "e2e.rate"):
            continue
        cells = []
        for name in ("mailrelay", "Postfix"):
            details = results[name].get(f.key, Value(None)).details
            cpu, busy = details.get("server_cpu_ms"), details.get("machine_busy")
            cell = f"{name} {cpu:.2f}" if cpu is not None else f"{name} n/a"
            cells.append(cell + (f" ({100 * busy:.0f}% busy)" if busy is not None else ""))
        lines.append(f"  {f.label} ({f.tool}): " + ", ".join(cells))
    return "\n".join(lines)


def signing_cost(results: dict[str, dict[str, Value]]) -> str:
    """What signing costs each server, and proof that it happened: the CPU per message of
    the signing process with signing off and on, and the signatures the sink saw."""
    lines = ["DKIM signing, end to end c=20: CPU per message of the signing process "
             "(mailrelay: its delivery process; Postfix: all its processes and opendkim), "
             "off -> on (median of rounds); every round's rate and added CPU; signatures "
             "at the sink (last round):"]
    for name in ("mailrelay", "Postfix"):
        off, on, cpu = (results[name].get(k, Value(None))
                        for k in ("dkim.e2e.off", "dkim.e2e.rate", "dkim.cpu"))
        if on.value is None or off.value is None:
            lines.append(f"  {name}: n/a ({on.note or off.note})")
            continue
        a, b = off.details.get("signing_cpu_ms"), on.details.get("signing_cpu_ms")
        rates = ", ".join(f"{r:,.0f}" for r in on.details.get("rounds", []))
        added = ", ".join(f"{c:.3f}" for c in cpu.details.get("rounds", []))
        lines.append(f"  {name}: {a:.3f} -> {b:.3f} ms; signed rates {rates}/s; added "
                     f"{added} ms; {on.details.get('signed')} of {on.details.get('arrived')} "
                     f"signed, {'verified' if on.details.get('verified') else 'NOT verified'}")
    return "\n".join(lines)


def table(figs: list[Figure], results: dict[str, dict[str, Value]]) -> str:
    rows = [("figure", "mailrelay", "Postfix", "mr/Postfix", "target", "tool")]
    notes: list[str] = []
    for f in figs:
        mr = results["mailrelay"].get(f.key, Value(None))
        pf = results["Postfix"].get(f.key, Value(None))
        # A ratio of two values near zero (a memory growth of 0.1 MB) says nothing.
        meaningful = pf.value is not None and abs(pf.value) >= (1.0 if f.unit == "MB" else 1e-9)
        ratio = mr.value / pf.value if mr.value is not None and meaningful else None
        cells = []
        for name, v in (("mailrelay", mr), ("Postfix", pf)):
            text = fmt(v.value, f.unit)
            if v.note:
                note = f"{name}: {v.note}"
                if note not in notes:
                    notes.append(note)
                text += f" [{notes.index(note) + 1}]"
            cells.append(text)
        rows.append((f.label, *cells, f"{ratio:.2f}" if ratio is not None else "-",
                     verdict(f, mr.value, ratio), f.tool))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) if i < 4 else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines += ["", *(f"[{i}] {n}" for i, n in enumerate(notes, 1))] if notes else []
    return "\n".join(lines)


# ---- main ----

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller runs (10k spool)")
    size.add_argument("--smoke", action="store_true",
                      help="a few hundred messages, 1 round, no install (the test suite's)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; smoke 1)")
    p.add_argument("--spool-rounds", type=int, default=1,
                   help="rounds of the spool-scale figure (default 1: it is the longest)")
    p.add_argument("--key-type", choices=sorted(KEY_TYPES), default="ecdsa")
    p.add_argument("--dkim", action="store_true",
                   help="only the DKIM signing rows (end to end, signing off and on)")
    p.add_argument("--cluster", action="store_true",
                   help="only the shared counters row: mailrelay on local counters against "
                        "mailrelay counting in Redis")
    p.add_argument("--webhooks", action="store_true",
                   help="only the webhooks rows: mailrelay sending message.processed and "
                        "message.delivered to a loopback receiver, against mailrelay "
                        "without and Postfix")
    p.add_argument("--quotas", action="store_true",
                   help="only the quota rows: day and month quotas never reached, counted "
                        "in process (and in Redis if installed), against mailrelay "
                        "without and Postfix")
    p.add_argument("--postgres", action="store_true",
                   help="only the shared stores row: mailrelay on local files against "
                        "mailrelay with Redis and PostgreSQL")
    p.add_argument("--only", choices=["mailrelay", "postfix"], help="measure one server")
    p.add_argument("--no-install", action="store_true", help="never run bench/setup.sh")
    p.add_argument("--json", help="also write all results to this JSON file")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--profile", metavar="DIR",
                   help="run mailrelay under cProfile (twistd --profiler cprofile); one "
                        "stats file per start in DIR (read with python3 -m pstats)")
    return p.parse_args(argv)


def keep_or_remove(base: str, keep: bool, say) -> None:
    """The run's temporary directory: kept with ``--keep`` (said where), else removed."""
    if keep:
        say(f"kept {base}")
    else:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like an error, so that the servers started here are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sizes = SMOKE if args.smoke else QUICK if args.quick else FULL
    rounds = args.rounds or (1 if args.smoke else 3)
    if not args.smoke and rounds < 3:
        say("note: fewer than 3 rounds; the issue asks for at least 3")
    raise_fd_limit()
    if args.cluster:
        return run_shared(args, sizes, rounds)
    if args.webhooks or args.quotas:
        return run_features(args, argv, sizes, rounds)
    if args.postgres:
        from bench import pgstore

        return run_shared(args, sizes, rounds, pgstore)

    if not (postfix.available() and opendkim.available()) and not args.smoke \
            and not args.no_install and args.only != "mailrelay":
        say("installing Postfix and OpenDKIM (bench/setup.sh)")
        subprocess.run(["sh", os.path.join(HERE, "setup.sh")], check=True)
    use_pf = postfix.available() and args.only != "mailrelay" and os.geteuid() == 0
    mr_ok, mr_why = relay.available()
    use_mr = args.only != "postfix"

    say(f"load average before: {load_average()} (other work on the machine skews figures)")
    load_before = load_average()
    base = tempfile.mkdtemp(prefix="mailrelay-bench-")
    os.chmod(base, 0o755)  # Postfix's unprivileged processes must reach their directories
    cert, key = make_certificate(os.path.join(base, "tls"), args.key_type)
    os.chmod(os.path.join(base, "tls"), 0o755)
    sink = SinkProcess(lifetime=300 if args.smoke else 6 * 3600, cert=cert, key=key)
    servers = []
    started = time.time()
    try:
        users = {figures.USER[0]: figures.USER[1], **figures.many_users(sizes.users)}
        if use_mr and mr_ok:
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
            mr = relay.MailRelayInstance(os.path.join(base, "mailrelay"), cert, key, sink.port,
                                         profile_dir=args.profile and
                                         os.path.abspath(args.profile))
            mr.configure()
            if mr.dropped:
                say(f"mailrelay does not know yet: {', '.join(mr.dropped)}")
            mr.add_users({**users, figures.IP_SENDER: "bench-secret-3"})
            servers.append(mr)
        if use_pf:
            pf = postfix.PostfixInstance(os.path.join(base, "postfix"), cert, key, sink.port,
                                         max_sessions=sizes.sessions + 100)
            pf.configure()
            pf.add_users({login.split("@")[0]: pw for login, pw in users.items()})
            if opendkim.available():
                pf.milter = opendkim.OpenDKIMInstance(os.path.join(base, "opendkim"),
                                                      figures.DOMAIN)
                pf.milter.configure()
            servers.append(pf)
        figs = [] if args.dkim else figures.all_figures(figures.smtp_source_available())
        figs += figures.dkim_figures()
        ceiling = [] if args.dkim else ceilings(sink, sizes)

        per_round: dict[str, list[dict[str, Value]]] = {"mailrelay": [], "Postfix": []}
        for r in range(1, rounds + 1):
            for server in servers:
                say(f"round {r}/{rounds}: {server.name}")
                if not args.dkim:
                    per_round[server.name].append(
                        run_server_round(server, sink, sizes, base, figs))
                per_round[server.name].append(run_dkim_round(server, sink, sizes, base))
        for r in range(1, 0 if args.dkim else args.spool_rounds + 1):
            for server in servers:
                say(f"spool scale {r}/{args.spool_rounds}: {server.name}")
                per_round[server.name].append(run_spool(server, sink, sizes, base))

        results: dict[str, dict[str, Value]] = {}
        for name in ("mailrelay", "Postfix"):
            merged: dict[str, list[Value]] = {}
            for one in per_round[name]:
                for k, v in one.items():
                    merged.setdefault(k, []).append(v)
            results[name] = {k: median(vs) for k, vs in merged.items()}
        if not use_mr:
            results["mailrelay"] = not_running(figs, "not measured (--only postfix)")
        elif not mr_ok:
            results["mailrelay"] = not_running(figs, f"n/a (not yet supported: {mr_why})")
        if not use_pf:
            why = ("not installed" if not postfix.available()
                   else "not measured" if args.only else "needs root")
            results["Postfix"] = not_running(figs, f"n/a (Postfix {why})")
        elif not opendkim.available():
            results["Postfix"].update(not_running(figures.dkim_figures(),
                                                  "n/a (OpenDKIM not installed)"))

        print(report(args, argv, sizes, rounds, ceiling, figs, results, started,
                     load_before))
        if args.json:
            dump = {name: {k: vars(v) for k, v in res.items()} for name, res in results.items()}
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "results": dump, "ceilings": ceiling}, f,
                          indent=1)
        # A signing row that did not sign must not pass for a measurement.
        failed = [f"{name} {k}: {v.note}" for name, res in results.items()
                  for k, v in res.items() if k.startswith("dkim.") and "FAILED" in v.note]
        for line in failed:
            say(line)
        return 1 if failed else 0
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception as e:
                say(f"stopping {server.name}: {e}")
        sink.stop()
        keep_or_remove(base, args.keep, say)


def run_shared(args, sizes, rounds: int, pgstore=None) -> int:
    """mailrelay on local counters against mailrelay on a private redis-server; with
    ``pgstore`` (bench/pgstore.py), local files against Redis and PostgreSQL."""
    rows = pgstore or cluster
    if not rows.available():
        say("redis-server" + (" or postgresql" if pgstore else "") + " is not installed "
            "(apt install redis-server" + (" postgresql)" if pgstore else ")"))
        return 1
    say(f"load average before: {load_average()}")
    load_before, started = load_average(), time.time()
    base = tempfile.mkdtemp(prefix="mailrelay-bench-")
    cert, key = make_certificate(os.path.join(base, "tls"), args.key_type)
    sink = SinkProcess(lifetime=300 if args.smoke else 3600, cert=cert, key=key)
    redis = cluster.RedisProcess(os.path.join(base, "redis"))
    pg = pgstore.PostgresProcess() if pgstore else None
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    mr = relay.MailRelayInstance(os.path.join(base, "mailrelay"), cert, key, sink.port,
                                 profile_dir=args.profile and os.path.abspath(args.profile))
    try:
        redis.start()
        if pg is not None:
            pg.start()
        mr.configure(delivery=False)
        mr.add_users({figures.USER[0]: figures.USER[1], figures.IP_SENDER: "bench-secret-3"})
        per_round = []
        for r in range(1, rounds + 1):
            say(f"round {r}/{rounds}: shared {'stores' if pgstore else 'counters'}")
            per_round.append(pgstore.run_round(mr, redis, pg, sink, sizes, base, say) if pgstore
                             else cluster.run_round(mr, redis, sink, sizes, base, say))
        what = "local files vs Redis and PostgreSQL" if pgstore else "local counters vs Redis"
        print(f"mailrelay, {what}, {time.strftime('%Y-%m-%d %H:%M %Z')}\n"
              f"machine: {machine()}; load average before {load_before}, after "
              f"{load_average()}; took {(time.time() - started) / 60:.1f} min\n"
              + rows.report(per_round))
        return 0
    finally:
        mr.stop()
        if pg is not None:
            pg.stop()
        redis.stop()
        sink.stop()
        keep_or_remove(base, args.keep, say)


def run_features(args, argv, sizes, rounds: int) -> int:
    """mailrelay with webhooks and/or quotas against mailrelay without them and Postfix,
    rows taking turns (bench/features.py)."""
    say(f"load average before: {load_average()}")
    load_before, started = load_average(), time.time()
    base = tempfile.mkdtemp(prefix="mailrelay-bench-")
    os.chmod(base, 0o755)  # Postfix's unprivileged processes must reach their directories
    cert, key = make_certificate(os.path.join(base, "tls"), args.key_type)
    os.chmod(os.path.join(base, "tls"), 0o755)
    sink = SinkProcess(lifetime=300 if args.smoke else 3600, cert=cert, key=key)
    hooks = HookSinkProcess(lifetime=300 if args.smoke else 3600) if args.webhooks else None
    redis = (cluster.RedisProcess(os.path.join(base, "redis"))
             if args.quotas and cluster.available() else None)
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    mr = relay.MailRelayInstance(os.path.join(base, "mailrelay"), cert, key, sink.port,
                                 profile_dir=args.profile and os.path.abspath(args.profile))
    pf = None
    try:
        if redis is not None:
            redis.start()
        users = {figures.USER[0]: figures.USER[1], figures.IP_SENDER: "bench-secret-3"}
        mr.configure()
        mr.add_users(users)
        if postfix.available() and os.geteuid() == 0 and args.only != "mailrelay":
            pf = postfix.PostfixInstance(os.path.join(base, "postfix"), cert, key, sink.port,
                                         max_sessions=200)
            pf.configure()
            # Not the IP sender: a sender in Postfix's login map must be logged in.
            pf.add_users({figures.USER[0].split("@")[0]: figures.USER[1]})
        rows = features.rows(mr, pf, hooks, args.quotas, redis, base)
        per_round: list[dict[str, dict]] = []
        for r in range(rounds):
            turn = rows[r % len(rows):] + rows[:r % len(rows)]
            got: dict[str, dict] = {}
            for row in turn:
                say(f"round {r + 1}/{rounds}: {row.label}")
                got[row.label] = features.run_row(row, sink, sizes, base, say, hooks)
            per_round.append(got)
        command = "python3 bench/run.py " + " ".join(argv if argv is not None
                                                      else sys.argv[1:])
        what = " and ".join(k for k in ("webhooks", "quotas") if getattr(args, k))
        print(f"mailrelay with and without {what} against Postfix, "
              f"{time.strftime('%Y-%m-%d %H:%M %Z')}\n"
              f"machine: {machine()}; load average before {load_before}, after "
              f"{load_average()}; took {(time.time() - started) / 60:.1f} min\n"
              f"command: {command.strip()}\n"
              f"accept: plain, IP auth, c=20, 1 msg/conn, {sizes.accept_c20:,} messages; end "
              f"to end: the same, {sizes.e2e:,} messages, until the sink has them; CPU: all "
              f"the server's processes over both runs (and until the webhook receiver has "
              f"every event), per message\n"
              + features.report([row.label for row in rows], per_round, "mailrelay"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": machine(), "rounds": [
                    {label: {k: vars(v) if isinstance(v, Value) else v for k, v in res.items()}
                     for label, res in one.items()} for one in per_round]}, f, indent=1)
        lost = [1 for one in per_round for res in one.values()
                if (h := res.get("hooks")) and h.value != h.details["want"]]
        return 1 if lost else 0
    finally:
        mr.stop()
        if pf is not None:
            pf.stop()
        if redis is not None:
            redis.stop()
        if hooks is not None:
            hooks.stop()
        sink.stop()
        keep_or_remove(base, args.keep, say)


def run_server_round(server, sink, sizes, base, figs) -> dict[str, Value]:
    try:
        startup = start(server)
    except Exception as e:
        return not_running(figs, f"n/a (did not start: {str(e).splitlines()[0][:80]})")
    say(f"{server.name} up in {startup:.2f}s")
    try:
        return measure_round(server, Measure(server, sink, sizes, base, say), figs)
    finally:
        server.stop()


def run_dkim_round(server, sink, sizes, base) -> dict[str, Value]:
    """End to end with signing off, then on (the server started fresh for each); the CPU
    signing adds per message is the difference of the signing process's CPU."""
    if getattr(server, "milter", True) is None:
        return {}  # Postfix without OpenDKIM: n/a in the table
    runs: dict[bool, Value] = {}
    for on in (False, True):
        try:
            server.sign(on)
            server.start()
        except Exception as e:
            server.stop()
            runs[on] = Value(None, f"n/a (did not start: {str(e).splitlines()[0][:80]})")
            continue
        try:
            runs[on] = Measure(server, sink, sizes, base, say).signed_end_to_end(
                on, server.dkim_record)
        except Exception as e:
            say(f"{server.name} dkim: {type(e).__name__}: {e}")
            runs[on] = Value(None, f"n/a ({type(e).__name__}: {str(e)[:80]})")
        finally:
            server.stop()
    try:
        server.sign(False)  # the other figures measure the server as it was
    except Exception as e:
        say(f"{server.name}: signing off: {e}")
    off, signed = runs[False], runs[True]
    before, after = (v.details.get("signing_cpu_ms") for v in (off, signed))
    if before is None or after is None or signed.value is None:
        cpu = Value(None, signed.note or off.note or "n/a")
    else:
        cpu = Value(after - before, "", {"off": before, "on": after})
    return {"dkim.e2e.off": off, "dkim.e2e.rate": signed, "dkim.cpu": cpu}


def start(server) -> float:
    """Start ``server``; a mailrelay whose delivery cannot start yet runs without it."""
    try:
        return server.start()
    except Exception as e:
        say(f"{server.name} did not start: {e}")
        if not hasattr(server, "start_degraded"):
            raise
    startup = server.start_degraded()
    say(f"{server.name} runs with delivery off: the figures that need it are n/a")
    return startup


def run_spool(server, sink, sizes, base) -> dict[str, Value]:
    try:
        start(server)
    except Exception as e:
        why = Value(None, f"n/a (did not start: {str(e).splitlines()[0][:80]})")
        return {"spool.startup": why, "spool.rate": why}
    try:
        return Measure(server, sink, sizes, base, say).spool_scale()
    except Exception as e:
        say(f"{server.name} spool scale: {type(e).__name__}: {e}")
        why = Value(None, f"n/a ({type(e).__name__}: {str(e)[:80]})")
        return {"spool.startup": why, "spool.rate": why}
    finally:
        server.stop()


def report(args, argv, sizes, rounds, ceiling, figs, results, started, load_before) -> str:
    command = "python3 bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = [
        f"mailrelay vs Postfix, {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"machine: {machine()}; load average before {load_before}, after {load_average()}",
        f"command: {command.strip()}",
        f"{rounds} round(s), medians; 5 KB messages; " + (
            f"end to end {sizes.e2e:,} messages a run; DKIM RSA-2048" if args.dkim else
            f"spool scale {args.spool_rounds} round(s) of {sizes.spool:,} messages; "
            f"certificate {KEY_TYPES[args.key_type]}; {sizes.sessions} idle sessions; "
            f"big message {sizes.big_message / 1e6:.0f} MB")
        + f"; took {(time.time() - started) / 60:.1f} min",
        *(f"ceiling: {c}" for c in ceiling),
        "",
    ]
    parts = [table(figs, results)]
    if not args.dkim:
        parts += [auth_cost(results), cpu_cost(figs, results)]
    return "\n".join(head) + "\n\n".join([*parts, signing_cost(results)])


if __name__ == "__main__":
    sys.exit(main())
