"""The relay's small-file helpers: atomic replacement, first-writer-wins creation, the
stat a file was read at, and the owner kept when mailrelay-admin runs as root."""

from __future__ import annotations

import os
import stat

from mailrelay.files import read_with_stat, save_file, stat_key


def test_save_file_replaces_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "new" / "dir" / "file.json"
    assert save_file(str(path), b"one") is True
    assert save_file(str(path), b"two") is True
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert os.listdir(path.parent) == ["file.json"]


def test_save_file_with_mode(tmp_path):
    path = tmp_path / "cert.pem"
    save_file(str(path), b"cert", 0o644)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_save_file_without_replace_keeps_the_first(tmp_path):
    path = tmp_path / "secret.key"
    assert save_file(str(path), b"first", replace=False) is True
    assert save_file(str(path), b"second", replace=False) is False
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["secret.key"]


def test_read_with_stat_and_stat_key(tmp_path):
    path = tmp_path / "file"
    assert read_with_stat(str(path)) is None and stat_key(str(path)) is None
    save_file(str(path), b"data")
    data, key = read_with_stat(str(path))
    assert data == b"data" and key == stat_key(str(path))
    save_file(str(path), b"other")
    assert stat_key(str(path)) != key


def test_root_keeps_the_owner_of_the_file_or_directory(tmp_path):
    # The suite runs as root, as the README's test command does (tests/test_e2e_privileges.py
    # needs it too): only root can give a file away.
    assert os.geteuid() == 0, "run the tests as root"
    directory = tmp_path / "data"
    directory.mkdir()
    os.chown(directory, 4321, 4321)
    path = directory / "users.json"
    save_file(str(path), b"new")
    assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4321)
    os.chown(path, 4322, 4322)
    save_file(str(path), b"again")
    assert (path.stat().st_uid, path.stat().st_gid) == (4322, 4322)
