"""Webhooks: the relay's events (mailrelay/events.py) as signed HTTP POSTs to the
accounts' endpoints, through a durable outbox (store.py, sink.py, sender.py); with
``[cluster] postgres`` the endpoints are shared by the nodes (pgstore.py)."""
