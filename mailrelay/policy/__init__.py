"""Policy: connection and message limits, rate limits, failed-login defence, sender
notifications (submission.py composes them) and the sender checks around them (sender.py:
status, null sender, scope, verification), applied by the session through ISessionPolicy."""
