"""Delivery: routing (MX, smarthost, routes), the outbound client, the queue runner, DSNs.

- router.py: Hop and the IRouter implementations (MXRouter, SmarthostRouter, RoutedRouter)
- wire.py: DATA dot-stuffing across chunks and envelope address checks
- client.py: RelayClient (one ESMTP session, many messages) and Courier (connections)
- schedule.py: which queued message is due next (priority, age, the due times it is given)
- manager.py: DeliveryManager, the queue runner: takes due messages, has them read,
  routed and sent, records the outcome (saved state or removal), queues DSNs; retry,
  flush and delete for the control channel
- loader.py: reads queued messages in batches off the reactor (the read-ahead budget)
- destinations.py: the route cache, jobs grouped per destination, connection slots
- outcome.py: attempt results -> next state, bounces, delay warnings, backoff (pure)
- dsn.py: RFC 3464 bounces and delay notifications
- process.py: the relay's side of the delivery process (start, restart, stop, announce)
- worker.py: the delivery process itself; commands.py: what the two say over their socket
"""

from mailrelay.delivery.router import Hop, PermanentRouteError, TemporaryRouteError

__all__ = ["Hop", "PermanentRouteError", "TemporaryRouteError"]
