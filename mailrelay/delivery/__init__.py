"""Delivery: routing (MX, smarthost, routes), the outbound client, the queue runner, DSNs.

- router.py: Hop and the IRouter implementations (MXRouter, SmarthostRouter, RoutedRouter)
- wire.py: DATA dot-stuffing across chunks and envelope address checks
- client.py: RelayClient (one ESMTP session, many messages) and Courier (connections)
- schedule.py: which queued message is due next (priority, age, the due times it is given)
- manager.py: DeliveryManager, the queue runner: attempts, results, retry backoff
  (``_backoff``), bounces; control files for mailrelay-admin
- dsn.py: RFC 3464 bounces and delay notifications
- process.py: the relay's side of the delivery process (start, restart, stop, announce)
- worker.py: the delivery process itself; commands.py: what the two say over their socket
"""

from mailrelay.delivery.router import Hop, PermanentRouteError, TemporaryRouteError

__all__ = ["Hop", "PermanentRouteError", "TemporaryRouteError"]
