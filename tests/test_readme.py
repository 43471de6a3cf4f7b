"""The README as a newcomer follows it: its mailrelay-admin commands are real commands,
and its first try with swaks, run line by line against the real twistd, does what the
README says (the message is held, nothing is sent)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest
from harness import ROOT, Relay

from mailrelay.admin.cli import build_parser

README = (ROOT / "README.md").read_text()


def shell_blocks() -> list[list[list[str]]]:
    """Each ```sh block of the README as its commands' words (continuations joined)."""
    blocks = []
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        commands = [shlex.split(line, comments=True)
                    for line in block.replace("\\\n", " ").splitlines()]
        blocks.append([c for c in commands if c])
    return blocks


def test_every_concrete_admin_command_in_the_readme_parses():
    parser = build_parser()
    commands = [c for b in shell_blocks() for c in b if c[0] == "mailrelay-admin"]
    # A synopsis line ([--user U | --global], ID, ADDRESS...) is a pattern, not a command.
    concrete = [c for c in commands
                if not any(re.search(r"[\[|]|\.\.\.|^[A-Z]+$", word) for word in c)]
    assert len(concrete) >= 15, concrete
    for command in concrete:
        try:
            parser.parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"the README's {' '.join(command)!r} is not a valid command")


def test_the_readme_first_try_with_swaks_is_held(tmp_path):
    [block] = [b for b in shell_blocks() if any(c[0] == "swaks" for c in b)]
    relay = Relay(tmp_path)  # delivery on, as ./run.sh has it: a held message stays
    relay.start()
    try:
        password, outputs = None, []
        for words in block:
            if words[0] == "mailrelay-admin":
                result = relay.admin(*words[1:])
                outputs.append(result.stdout)
                found = re.search(r"^password for \S+: (\S+)$", result.stdout, re.M)
                password = found.group(1) if found else password
            else:
                assert words[0] == "swaks" and password, words
                words[0] = shutil.which("swaks")
                words[words.index("--server") + 1] = f"127.0.0.1:{relay.smtp_port}"
                words[words.index("--auth-password") + 1] = password
                result = subprocess.run(words, capture_output=True, text=True, timeout=60)
                assert result.returncode == 0, result.stdout + result.stderr
                outputs.append(result.stdout)
        queued_as = re.search(r"<~\s+250 2\.0\.0 .*queued as (\w+)", outputs[2]).group(1)
        assert re.search(rf"^{queued_as}\s+held: sandbox\s+doe\.com\s+me@doe\.com\s+"
                         r"you@example\.net", outputs[3], re.M), outputs[3]
        assert [p.name for p in relay.spool_files("hold")] == [queued_as]
    finally:
        relay.stop()
