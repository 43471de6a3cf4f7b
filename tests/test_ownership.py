"""data_dir given to twistd's --uid user at startup, without giving away anything else."""

from __future__ import annotations

import os
import pwd

import pytest

from mailrelay.ownership import give, target_ids

NOBODY = 65534


@pytest.fixture
def as_root():
    assert os.geteuid() == 0, "chown needs root, as the relay has when twistd starts it"


def owner(path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


def test_everything_under_data_dir_is_given_and_nothing_outside(tmp_path, as_root):
    data, outside = tmp_path / "data", tmp_path / "shadow"
    (data / "spool" / "queue").mkdir(parents=True)
    (data / "spool" / "queue" / "m1").write_text("mail")
    (data / "users.json").write_text("{}")
    outside.write_text("secret")
    (data / "link").symlink_to(outside)  # put there by the user: the link, not its target
    (data / "dirlink").symlink_to(tmp_path)
    os.link(outside, data / "hard")  # a second name of a file elsewhere: left alone
    assert give([str(data)], NOBODY, NOBODY) == 7
    for path in (data, data / "spool", data / "spool" / "queue", data / "spool" / "queue" / "m1",
                 data / "users.json", data / "link", data / "dirlink"):
        assert owner(path) == (NOBODY, NOBODY), path
    assert owner(outside) == owner(data / "hard") == (0, 0)
    assert owner(tmp_path) == (0, 0)
    assert give([str(data)], NOBODY, NOBODY) == 0  # a restart changes nothing more


def test_only_a_switch_of_user_by_root_gives_anything(as_root):
    assert target_ids(None, None) is None
    assert target_ids(NOBODY, None) == (NOBODY, pwd.getpwuid(NOBODY).pw_gid)  # its own group
    assert target_ids(None, 100) == (-1, 100)
