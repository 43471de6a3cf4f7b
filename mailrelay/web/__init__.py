"""The control panel: a JSON management API under /api/v1 and a web admin page, served by
twisted.web on one listener, plus sender verification (site.py composes them)."""
