"""What ./run.sh installs: every package of the source tree is in setup.cfg's list, so an
installed relay is never missing a module that the checkout's tests found."""

import configparser

from harness import ROOT


def test_every_package_is_installed():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    listed = set(setup["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "mailrelay").rglob("__init__.py")}
    assert found - listed == set(), "add them to [options] packages in setup.cfg"
