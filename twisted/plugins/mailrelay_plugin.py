"""The ``mailrelay`` twistd plugin: ``twistd -n mailrelay [--config FILE]``."""

from __future__ import annotations

import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin
from twisted.python import usage
from zope.interface import implementer


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = "Authenticated SMTP submission relay. Without --config: embedded defaults."
    optParameters = [["config", "c", None, "configuration file (INI; see etc/mailrelay.ini)"]]


@implementer(IServiceMaker, IPlugin)
class MailRelayServiceMaker:
    tapname = "mailrelay"
    description = "Authenticated SMTP submission relay"
    options = Options

    def makeService(self, options: Options):
        # Imported here so that twistd's plugin scan stays cheap.
        from twisted.internet import reactor

        from mailrelay.config import ConfigError, load_config
        from mailrelay.logtext import twistd_observer
        from mailrelay.ownership import DataOwner, target_ids
        from mailrelay.reload import HangupService
        from mailrelay.service import StartupError, make_service

        try:
            config = load_config(options["config"])
            service = make_service(config)
        except (ConfigError, StartupError) as e:
            # One clear line, never a traceback: twistd prints a SystemExit's message.
            print(f"mailrelay: {e}", file=sys.stderr)
            raise SystemExit(1)
        HangupService(service.live, reactor).setServiceParent(service)
        twistd = options.parent if options.parent is not None else {}
        observer = None
        if options.parent is not None:
            observer = service.log_observer = twistd_observer(options.parent,
                                                              config.server.log_format)
        ids = target_ids(twistd.get("uid"), twistd.get("gid"))
        if ids is not None:
            # Last, so that it runs once everything is bound, before twistd drops root.
            paths = [config.server.data_dir]
            log_path = getattr(getattr(observer, "out", None), "path", None)
            if log_path:
                paths.append(log_path)
            DataOwner(paths, *ids).setServiceParent(service)
        return service


# twistd finds the plugin by the interfaces it provides, not by this name.
service_maker = MailRelayServiceMaker()
