"""The relay as twistd runs it: ``twistd -n mailrelay [--config FILE]`` (the plugin in
twisted/plugins/ only calls ``make_daemon``, so that what it wires lives in the package).

Besides the services of the configuration (service.make_service): the log observer twistd
writes through (logtext.twistd_observer, text or JSON lines), SIGHUP reloading the
configuration (reload.py) and, when twistd is to switch user (``--uid``/``--gid``), the
data directory given to that user once everything is bound (ownership.py); and systemd
told when the relay is ready (sdnotify.py).
"""

from __future__ import annotations

import sys

from twisted.application.service import MultiService


def make_daemon(options, reactor=None) -> MultiService:
    """The relay for the plugin's parsed ``options`` (their ``parent``: twistd's own)."""
    if reactor is None:
        from twisted.internet import reactor
    from mailrelay.config import ConfigError, load_config
    from mailrelay.logtext import twistd_observer
    from mailrelay.ownership import DataOwner, target_ids
    from mailrelay.reload import HangupService
    from mailrelay.sdnotify import Readiness
    from mailrelay.service import StartupError, make_service

    try:
        config = load_config(options["config"])
        service = make_service(config, reactor)
    except (ConfigError, StartupError) as e:
        # One clear line, never a traceback: twistd prints a SystemExit's message.
        print(f"mailrelay: {e}", file=sys.stderr)
        raise SystemExit(1)
    HangupService(service.live, reactor).setServiceParent(service)
    twistd = options.parent if options.parent is not None else {}
    observer = None
    if options.parent is not None:
        observer = twistd_observer(options.parent, config.server.log_format)
        service.log_observer = observer
    ids = target_ids(twistd.get("uid"), twistd.get("gid"))
    if ids is not None:
        # Last, so that it runs once everything is bound, before twistd drops root.
        paths = [config.server.data_dir]
        log_path = getattr(getattr(observer, "out", None), "path", None)
        if log_path:
            paths.append(log_path)
        DataOwner(paths, *ids).setServiceParent(service)
    Readiness(reactor).setServiceParent(service)  # last: stops first
    return service
