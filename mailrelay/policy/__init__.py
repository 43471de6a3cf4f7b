"""Policy: connection and message limits, rate limits, failed-login defence and sender
notifications, applied by the session (submission.py composes them). The sender scope is
checked by the session itself (smtp/server.py, with mailrelay/scope.py)."""
