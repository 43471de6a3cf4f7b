"""What a reload applies in place and what it names as needing a restart."""

from __future__ import annotations

from mailrelay.config import load_config
from mailrelay.reload import needs_restart, reloaded_settings

BASE = ("[server]\ndata_dir = {tmp}/data\nhostname = relay.test\n[admin]\nenabled = no\n"
        "[listener:smtp]\nendpoint = tcp:2525:interface=127.0.0.1\n")


def configs(tmp_path, change: str, base: str = BASE):
    path = tmp_path / "mailrelay.ini"
    path.write_text(base.format(tmp=tmp_path))
    old = load_config(str(path))
    path.write_text(base.format(tmp=tmp_path) + change)
    return old, load_config(str(path))


def test_limits_policy_tls_and_routes_are_applied(tmp_path):
    old, new = configs(tmp_path, "[limits]\nmax_recipients = 5\nidle_timeout = 1m\n"
                                 "[policy]\nip_auth = 192.0.2.0/24 = webmail\n"
                                 "[tls]\nciphers = ECDHE+AESGCM\n"
                                 "[routes]\nexample.test = 127.0.0.1:2526\n")
    assert reloaded_settings(old, new) == [
        "[limits] max_recipients", "[limits] idle_timeout", "[policy] ip_auth",
        "[tls] ciphers", "[routes]"]
    assert needs_restart(old, new) == []


def test_the_rest_needs_a_restart(tmp_path):
    old, new = configs(tmp_path, "[limits]\nrate_counts = recipients\n"
                                 "[delivery]\nmax_concurrency = 5\n"
                                 "[listener:smtps]\nendpoint = tcp:8465\ntls = implicit\n")
    assert needs_restart(old, new) == ["[listener:smtps]", "[limits] rate_counts",
                                       "[delivery] max_concurrency"]
    assert reloaded_settings(old, new) == []
    old, new = configs(tmp_path, "", base=BASE.replace("2525", "2587"))
    assert needs_restart(old, new) == []  # the same file twice
    gone = load_config(None)
    assert "[listener:smtp]" in needs_restart(old, gone)  # and smtps, made by the defaults
