"""A webhook receiver for tests: twisted.web on 127.0.0.1, an ephemeral port.

Each path answers from its own list of answers, one per request, the last one repeated:
``{"/flaky": [500, 200], "/gone": [410], "/slow": ["slow", 200]}`` ("slow": the answer is
held ``SLOW`` seconds, past the relay's timeout, then 200; "drop": the connection is
closed without an answer; "late": 200 after ``LATE`` seconds, the record then marked
``"answered": true``; as by a server whose keep-alive ran out just as the request
came). A path without a list answers 200. ``peer`` is the client's port: one per TCP
connection. Every request is recorded with its headers and exact body (the test verifies
the signatures with the standardwebhooks package).

In-process (trial tests)::

    receiver = Receiver({"/flaky": [500, 200]})
    port = receiver.listen()

As a subprocess (end-to-end tests)::

    python tests/webhook_receiver.py --port-file F --record-dir D --rules R.json

R.json is re-read on every request; each request is written to D/<n>.json as
``{"path", "headers", "body", "answer", "peer"}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from twisted.internet import reactor
from twisted.web import resource, server

SLOW = 30.0
LATE = 1.0


class Receiver(resource.Resource):
    isLeaf = True

    def __init__(self, rules: dict | None = None, rules_path: str | None = None,
                 record_dir: str | None = None) -> None:  # fmt: skip
        super().__init__()
        self.rules = rules or {}
        self.rules_path = rules_path
        self.record_dir = record_dir
        self.requests: list[dict] = []
        self.counts: dict[str, int] = {}

    def listen(self, port: int = 0):
        site = server.Site(self)
        site.noisy = False
        return reactor.listenTCP(port, site, interface="127.0.0.1")

    def _answers(self, path: str) -> list:
        if self.rules_path:
            with open(self.rules_path) as f:
                self.rules = json.load(f)
        return self.rules.get(path) or [200]

    def render_POST(self, request):
        path = request.path.decode()
        n = self.counts[path] = self.counts.get(path, 0) + 1
        answers = self._answers(path)
        answer = answers[min(n, len(answers)) - 1]
        record = {"path": path, "answer": answer, "body": request.content.read().decode(),
                  "peer": request.getClientAddress().port,
                  "headers": {k.decode().lower(): v[-1].decode()
                              for k, v in request.requestHeaders.getAllRawHeaders()}}
        self.requests.append(record)
        self._save(len(self.requests), record)
        if answer == "drop":
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        if answer == "late":
            reactor.callLater(LATE, self._late, request, len(self.requests), record)
            return server.NOT_DONE_YET
        if answer == "slow":
            call = reactor.callLater(SLOW, self._finish, request, 200)
            request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
            return server.NOT_DONE_YET
        request.setResponseCode(answer)
        return f"answer {answer}\n".encode()

    def _save(self, n: int, record: dict) -> None:
        if self.record_dir:
            name = os.path.join(self.record_dir, f"{n}.json")
            with open(name + ".tmp", "w") as f:
                json.dump(record, f)
            os.replace(name + ".tmp", name)

    def _late(self, request, n: int, record: dict) -> None:
        self._finish(request, 200)
        record["answered"] = True
        self._save(n, record)

    def _finish(self, request, code: int) -> None:
        request.setResponseCode(code)
        request.write(b"late\n")
        request.finish()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--record-dir", required=True)
    parser.add_argument("--rules", required=True)
    args = parser.parse_args(argv)
    port = Receiver(rules_path=args.rules, record_dir=args.record_dir).listen()
    with open(args.port_file + ".tmp", "w") as f:
        f.write(str(port.getHost().port))
    os.replace(args.port_file + ".tmp", args.port_file)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
