"""The bounce domain: VERP envelope senders at delivery, and the listener their bounces
come back to (verp.py, parse.py, listener.py, feed.py)."""
