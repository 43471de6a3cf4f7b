"""etc/mailrelay.ini documents every setting, and its values are the embedded defaults."""

from __future__ import annotations

import re
import subprocess
import sys

from harness import ROOT, env

from mailrelay.config import LISTENER_KEYS, SCHEMA, load_config

EXAMPLE = ROOT / "etc" / "mailrelay.ini"


def test_every_setting_is_documented():
    text = EXAMPLE.read_text()
    sections = set(re.findall(r"^#?\[([a-z:]+)\]", text, re.M))
    for section, keys in SCHEMA.items():
        assert section in sections, f"[{section}] missing from {EXAMPLE}"
        for key in keys:
            assert re.search(rf"^#?{key} =", text, re.M), f"[{section}] {key} undocumented"
    for key in LISTENER_KEYS:
        assert re.search(rf"^#?{key} =", text, re.M), f"listener {key} undocumented"


def test_example_with_comments_removed_equals_embedded_defaults(tmp_path):
    # Uncommenting nothing: the example file must load and equal the defaults.
    assert vars(load_config(str(EXAMPLE)).limits) == vars(load_config(None).limits)
    assert vars(load_config(str(EXAMPLE)).delivery) == vars(load_config(None).delivery)


def test_uncommented_example_values_are_valid(tmp_path):
    # Every "#key = value" line, uncommented, must parse (the docs show valid values).
    lines, in_listener = [], False
    for line in EXAMPLE.read_text().splitlines():
        if re.match(r"^\[[a-z._]+\]$", line):
            lines.append(line)
            in_listener = False
        elif line.startswith("#[listener"):
            in_listener = True
        elif re.match(r"^#[a-z_.]+ = ", line) and not in_listener:
            lines.append(line[1:])
    cfg = tmp_path / "all.ini"
    body = "\n".join(lines).replace("backend = ldap", "backend = file")
    body = body.replace("example.org = mx.internal.example:25", "example.org = mx.example.net:25")
    cfg.write_text(body + "\n")
    config = load_config(str(cfg))
    assert config.delivery.smarthost == ("smtp.provider.example", 587)
    assert config.routes == {"example.org": ("mx.example.net", 25)}
    assert config.tls_policy == {"example.com": "dane-only", "partner.example": "verify",
                                 ".legacy.example": "may"}


def test_admin_check(tmp_path):
    cfg = tmp_path / "c.ini"
    cfg.write_text(f"[server]\ndata_dir = {tmp_path}/data\n")
    ok = subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c", str(cfg), "check"],
                        capture_output=True, text=True, env=env())
    assert ok.returncode == 0 and "ok" in ok.stdout
    cfg.write_text("[limits]\nmax_recipients = many\n")
    bad = subprocess.run([sys.executable, "-m", "mailrelay.admin.cli", "-c", str(cfg), "check"],
                         capture_output=True, text=True, env=env())
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert f"{cfg}: [limits] max_recipients: 'many' is not a whole number" in bad.stderr
