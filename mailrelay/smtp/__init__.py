"""The SMTP listener and session: a hardened ESMTP server."""
