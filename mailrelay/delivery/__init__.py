"""Delivery: routing (MX, smarthost, routes), the outbound client, the queue runner, DSNs."""
