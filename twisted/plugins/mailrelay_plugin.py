"""The ``mailrelay`` twistd plugin: ``twistd -n mailrelay [--config FILE]``."""

from __future__ import annotations

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
        # Imported here so that twistd's plugin scan stays cheap; the wiring is in the
        # package (an installed copy of this file then keeps up with it).
        from mailrelay.daemon import make_daemon

        return make_daemon(options)


# twistd finds the plugin by the interfaces it provides, not by this name.
service_maker = MailRelayServiceMaker()
