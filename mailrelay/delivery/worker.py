"""The delivery process: ``python -m mailrelay.delivery.worker --fd N [--config FILE]``.

Started by the relay (delivery/process.py), never by hand: it runs the queue of the
relay's spool (service.make_delivery_worker), takes the relay's commands on the socket
``--fd`` (delivery/commands.py) and writes its log events as JSON records to stdout for
the relay to log. It stops on SIGTERM, or by itself when the relay's end of the socket
closes (the relay is gone), saving the state of the messages in progress first.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from twisted.logger import Logger, globalLogBeginner

from mailrelay.control import QueueResponder
from mailrelay.delivery.commands import Enqueue, adopt
from mailrelay.logtext import json_observer
from mailrelay.reload import reload_routes
from mailrelay.spool.queueid import is_queue_id

log = Logger()

# Stopping waits for the connections' messages in progress (the manager drops them after
# its stop_timeout, 10 s) and the states they leave; past this, the process exits anyway,
# well before the relay would kill it.
STOP_GRACE = 20.0


class RelayChannel(QueueResponder):
    """This process's end of the socket: the relay's commands, answered by ``manager``
    (delivery.manager.DeliveryManager); ``on_lost`` is called once the relay is gone."""

    def __init__(self, manager, on_lost) -> None:
        super().__init__(manager)
        self._manager = manager
        self._on_lost = on_lost

    @Enqueue.responder
    def enqueue(self, ids: list[str]) -> dict:
        for queue_id in ids:
            if is_queue_id(queue_id):
                self._manager.enqueue(queue_id)
        return {}

    def connectionLost(self, reason) -> None:
        super().connectionLost(reason)
        self._on_lost()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailrelay.delivery.worker",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True, help="the socket to the relay")
    parser.add_argument("--config", help="the relay's configuration file")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until it can reload (below)

    from twisted.internet import reactor

    from mailrelay.config import ConfigError, load_config
    from mailrelay.service import StartupError, make_delivery_worker

    globalLogBeginner.beginLoggingTo([json_observer(sys.stdout)],
                                     redirectStandardIO=False)
    try:
        config = load_config(args.config)
        top, manager = make_delivery_worker(config, reactor)
    except (ConfigError, StartupError) as e:
        print(f"mailrelay delivery: {e}", file=sys.stderr)
        return 1
    # The relay passes its SIGHUP on (mailrelay/reload.py) once it has checked the file.
    signal.signal(signal.SIGHUP, lambda signum, frame: reactor.callFromThread(
        reload_routes, config, manager, reactor))
    # Clients wait for each reply, the queue does not: when the cores are all busy, the
    # relay goes first and delivery takes what is left (on idle cores, no difference).
    os.nice(config.delivery.nice)

    def relay_gone() -> None:
        if reactor.running:
            log.info("the relay closed its connection: delivery stops")
            reactor.stop()

    def serve() -> None:
        # The scan of the queue starts first; messages announced meanwhile join it.
        top.startService()
        adopt(reactor, args.fd, RelayChannel(manager, relay_gone))
        os.close(args.fd)

    def stop():
        d = top.stopService()
        d.addTimeout(STOP_GRACE, reactor)
        d.addErrback(lambda f: log.error("delivery did not stop within {grace:.0f}s ({why}); "
                                         "exiting anyway", grace=STOP_GRACE,
                                         why=f.getErrorMessage()))
        return d

    reactor.callWhenRunning(serve)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
