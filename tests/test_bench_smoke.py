"""The bench's smoke mode (issue 7) runs to the end, so that the bench cannot rot.

``python3 bench/run.py --smoke`` starts the real mailrelay with ``twistd`` (and a private
Postfix when one is installed), sends a few hundred messages over loopback and prints the
table. No timing is asserted: only that the run finishes, that every figure has a row,
and that mailrelay accepted mail with IP authentication and with AUTH over STARTTLS and
implicit TLS, and delivered it to the sink.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.figures import all_figures, dkim_figures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# mailrelay's side only: Postfix (installed by test.sh as a client for another test) would
# double the run, and its rows are the same code as mailrelay's. About 45 s on an idle
# 2-core machine, 80 s on a busy one.
@pytest.mark.timeout(240)
def test_bench_smoke(tmp_path) -> None:
    results_file = tmp_path / "results.json"
    bench = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "bench", "run.py"), "--smoke", "--only",
         "mailrelay", "--json", str(results_file)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = bench.communicate(timeout=210)
    except subprocess.TimeoutExpired:
        bench.terminate()  # the bench stops the servers it started on SIGTERM
        stdout, stderr = bench.communicate(timeout=30)
    done = subprocess.CompletedProcess(bench.args, bench.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    for figure in all_figures(smtp_source=False) + dkim_figures():
        assert figure.label in done.stdout, figure.label

    mailrelay = json.loads(results_file.read_text())["results"]["mailrelay"]
    for key in ("accept.plain.c20.m10", "accept.starttls.c20.m10", "accept.tls.c20.m10",
                "e2e.rate", "e2e.p99", "mem.idle", "login.one"):
        got = mailrelay[key]
        assert got["value"] is not None, f"{key}: {got['note']}\n{done.stderr[-4000:]}"
    # Where the cores go: the relay and its delivery process did work for every message.
    assert "Server CPU per message" in done.stdout
    for key in ("accept.plain.c20.m10", "e2e.rate"):
        assert mailrelay[key]["details"]["server_cpu_ms"] > 0, mailrelay[key]
        assert 0 < mailrelay[key]["details"]["machine_busy"] <= 1, mailrelay[key]
    assert "% busy)" in done.stdout
    signed = mailrelay["dkim.e2e.rate"]
    assert signed["value"] is not None, f"{signed['note']}\n{done.stderr[-4000:]}"
    assert signed["details"]["signed"] == signed["details"]["arrived"] > 0, signed
    assert signed["details"]["verified"], signed
    assert mailrelay["dkim.e2e.off"]["details"]["signed"] == 0
    assert mailrelay["dkim.cpu"]["value"] is not None, mailrelay["dkim.cpu"]


# The feature rows: mailrelay without and with webhooks and quotas (in Redis too when
# redis-server is installed), every event of every message at the bench's receiver.
@pytest.mark.timeout(240)
def test_bench_smoke_feature_rows(tmp_path) -> None:
    results_file = tmp_path / "features.json"
    done = subprocess.run(
        [sys.executable, os.path.join(REPO, "bench", "run.py"), "--smoke", "--webhooks",
         "--quotas", "--only", "mailrelay", "--json", str(results_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=210)
    assert done.returncode == 0, done.stderr[-4000:]
    (rows,) = json.loads(results_file.read_text())["rounds"]
    assert {"mailrelay", "mailrelay + webhooks", "mailrelay + quotas"} <= set(rows)
    for label, row in rows.items():
        assert row["accept"]["value"] and row["e2e"]["value"], (label, done.stderr[-4000:])
        assert row["cpu"]["value"] > 0, label
    hooks = rows["mailrelay + webhooks"]["hooks"]
    assert hooks["value"] == hooks["details"]["want"] > 0, hooks
    assert set(hooks["details"]["types"]) == {"message.processed", "message.delivered"}
    assert rows["mailrelay"]["hooks"]["value"] == 0  # no endpoint, no request
    assert "receiver got" in done.stdout and "(all)" in done.stdout
