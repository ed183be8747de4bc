"""file, directory and symlink against real files under a tmp root: read, change, idempotence, noop."""

from __future__ import annotations

import os
import pwd

import pytest

from vigo.agent.resources import CHANGED, FAILED, OK, RunContext, resource_class
from vigo.policy.schema import validate_resource


def res(rtype, name, **attrs):
    full = validate_resource(rtype, name, attrs, file="t.yaml", policy="t")
    return resource_class(rtype)(name, full)


@pytest.fixture
def ctx(tmp_path):
    return RunContext(root=tmp_path)


def test_file_create_update_idempotent(ctx, tmp_path):
    r = res("file", "/etc/app/conf", content="a\nb\n", mode="0640")
    out = r.apply(ctx)
    assert out.status == CHANGED and "created (4 bytes)" in out.changes and any("parent" in c for c in out.changes)
    path = tmp_path / "etc/app/conf"
    assert path.read_text() == "a\nb\n" and path.stat().st_mode & 0o7777 == 0o640
    assert r.apply(ctx).status == OK
    path.write_text("a\nc\n")
    path.chmod(0o644)
    out = r.apply(ctx)
    assert out.status == CHANGED and "content" in out.changes and "-c" in out.diff and "+b" in out.diff
    assert path.stat().st_mode & 0o7777 == 0o640
    assert not list(path.parent.glob(".*vigo-tmp"))


def test_file_mode_only_keeps_content(ctx, tmp_path):
    path = tmp_path / "etc/keep"
    path.parent.mkdir(parents=True)
    path.write_text("local")
    out = res("file", "/etc/keep", mode="0600").apply(ctx)
    assert out.status == CHANGED and path.read_text() == "local" and path.stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(os.geteuid() != 0, reason="changing ownership needs root")
def test_file_owner_group(ctx, tmp_path):
    nobody = pwd.getpwnam("nobody")
    r = res("file", "/etc/owned", content="x", owner="nobody", group=str(nobody.pw_gid))
    assert r.apply(ctx).status == CHANGED
    st = (tmp_path / "etc/owned").stat()
    assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert r.apply(ctx).status == OK


def test_unknown_owner_fails_clearly(ctx):
    out = res("file", "/etc/x", content="x", owner="no-such-user-vigo").apply(ctx)
    assert out.status == FAILED and "'no-such-user-vigo' is not a user" in out.message


def test_file_absent_and_wrong_kinds(ctx, tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/old").write_text("x")
    r = res("file", "/etc/old", state="absent")
    assert r.apply(ctx).status == CHANGED and not (tmp_path / "etc/old").exists()
    assert r.apply(ctx).status == OK
    (tmp_path / "etc/dir").mkdir()
    out = res("file", "/etc/dir", content="x").apply(ctx)
    assert out.status == FAILED and "is a directory, expected a regular file" in out.message


def test_file_binary_diff_is_a_hash_line(ctx, tmp_path):
    out = res("file", "/bin.dat", content="\x00\x01").apply(RunContext(root=tmp_path, noop=True))
    assert out.status == CHANGED and out.diff.startswith("binary or large content")


def test_file_noop_writes_nothing(tmp_path):
    out = res("file", "/etc/n", content="x").apply(RunContext(root=tmp_path, noop=True))
    assert out.status == CHANGED and out.message.startswith("would ") and not (tmp_path / "etc").exists()


def test_directory_present_absent_recurse(ctx, tmp_path):
    d = res("directory", "/srv/data", mode="0700")
    assert d.apply(ctx).status == CHANGED and (tmp_path / "srv/data").stat().st_mode & 0o777 == 0o700
    assert d.apply(ctx).status == OK
    (tmp_path / "srv/data/f").write_text("x")
    out = res("directory", "/srv/data", state="absent").apply(ctx)
    assert out.status == FAILED and "recurse: true" in out.message
    assert res("directory", "/srv/data", state="absent", recurse=True).apply(ctx).status == CHANGED
    assert not (tmp_path / "srv/data").exists()


def test_directory_over_a_file_fails(ctx, tmp_path):
    (tmp_path / "f").write_text("x")
    out = res("directory", "/f").apply(ctx)
    assert out.status == FAILED and "a regular file, expected a directory" in out.message


def test_symlink_create_retarget_force_absent(ctx, tmp_path):
    link = tmp_path / "srv/current"
    assert res("symlink", "/srv/current", target="/srv/v1").apply(ctx).status == CHANGED
    assert os.readlink(link) == "/srv/v1"  # the target is not re-based under the root
    assert res("symlink", "/srv/current", target="/srv/v1").apply(ctx).status == OK
    out = res("symlink", "/srv/current", target="/srv/v2").apply(ctx)
    assert out.status == CHANGED and "/srv/v1 -> /srv/v2" in out.message
    (tmp_path / "srv/plain").write_text("x")
    assert res("symlink", "/srv/plain", target="/x").apply(ctx).status == FAILED
    assert res("symlink", "/srv/plain", target="/x", force=True).apply(ctx).status == CHANGED
    assert res("symlink", "/srv/current", state="absent").apply(ctx).status == CHANGED
    assert not link.is_symlink()


def test_managed_path_must_be_absolute(ctx):
    with pytest.raises(Exception, match="absolute"):
        ctx.path("relative/path")
