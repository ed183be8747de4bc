"""vigo.durable: a file is replaced whole or not at all, with the mode it was asked for."""

from __future__ import annotations

import os
import stat

import pytest

from vigo import durable


def test_atomic_write_replaces_the_file_with_the_mode_asked_for(tmp_path):
    target = tmp_path / "secret"
    target.write_bytes(b"old")
    durable.atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # secrets by default
    durable.atomic_write(tmp_path / "public", b"x", mode=durable.OPEN_MODE, fsync=False)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "public").stat().st_mode) == 0o666 & ~umask  # as open() makes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["public", "secret"]  # no temp file left


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "state.json"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), durable.atomic_file(target, tmp=tmp_path / "state.tmp") as out:
        out.write(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_named_temp_file_left_by_a_crash_is_reused_and_a_symlink_is_never_followed(tmp_path):
    target = tmp_path / "control.json"
    (tmp_path / "control.tmp").write_bytes(b"left by a crash, longer than the new content")
    durable.atomic_write(target, b"{}", tmp=tmp_path / "control.tmp")
    assert target.read_bytes() == b"{}" and not (tmp_path / "control.tmp").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_bytes(b"untouched")
    (tmp_path / "control.tmp").symlink_to(elsewhere)
    with pytest.raises(OSError):
        durable.atomic_write(target, b"{}", tmp=tmp_path / "control.tmp")
    assert elsewhere.read_bytes() == b"untouched" and target.read_bytes() == b"{}"


def test_replace_durably_renames(tmp_path):
    (tmp_path / "a").write_bytes(b"a")
    durable.replace_durably(tmp_path / "a", tmp_path / "b")
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_exclusive_lock_holds_off_a_second_holder_until_released(tmp_path):
    import threading

    from vigo.durable import exclusive_lock

    got = threading.Event()

    def second() -> None:
        with exclusive_lock(tmp_path / "lock"):
            got.set()

    with exclusive_lock(tmp_path / "lock"):
        t = threading.Thread(target=second)
        t.start()
        assert not got.wait(0.3)  # waiting on the flock while the first holds it
    assert got.wait(5)
    t.join(5)
    assert oct((tmp_path / "lock").stat().st_mode & 0o777) == "0o600"
