"""SecretBox: named secrets sealed with AES-256-GCM under a 0600 master key file."""

from __future__ import annotations

import os
import stat

import pytest

from vigo.errors import SecretError
from vigo.server.secrets import MAX_SECRET_BYTES, SecretBox


@pytest.fixture
def box(tmp_path) -> SecretBox:
    return SecretBox.load_or_create(tmp_path / "secrets.key")


@pytest.mark.parametrize("value", [b"", b"hunter2", os.urandom(MAX_SECRET_BYTES)])
def test_round_trip(box, value):
    sealed = box.seal("db_password", value)
    assert value not in sealed or value == b""
    assert box.open("db_password", sealed) == value


def test_same_value_seals_differently(box):
    assert box.seal("a", b"x") != box.seal("a", b"x")  # fresh nonce every time


def test_blob_moved_to_another_name_does_not_open(box):
    sealed = box.seal("api_token", b"tok-1")
    with pytest.raises(SecretError, match=r"cannot open secret 'admin_token'.*another name"):
        box.open("admin_token", sealed)


@pytest.mark.parametrize("where", [0 + 1, 13, -1])  # nonce, ciphertext, tag
def test_tampered_blob_does_not_open(box, where):
    sealed = bytearray(box.seal("api_token", b"tok-1"))
    sealed[where] ^= 0x01
    with pytest.raises(SecretError, match="cannot open secret 'api_token': wrong master key"):
        box.open("api_token", bytes(sealed))


def test_truncated_or_foreign_blobs(box):
    with pytest.raises(SecretError, match="sealed value is 5 bytes, expected at least 29"):
        box.open("a", b"short")
    sealed = box.seal("a", b"x")
    with pytest.raises(SecretError, match="sealed format version 9, expected 1"):
        box.open("a", b"\x09" + sealed[1:])


def test_wrong_key_does_not_open(tmp_path, box):
    other = SecretBox.load_or_create(tmp_path / "other.key")
    with pytest.raises(SecretError, match="cannot open secret 'db_password': wrong master key"):
        other.open("db_password", box.seal("db_password", b"pw"))


def test_key_file_is_private_and_stable(tmp_path):
    path = tmp_path / "secrets.key"
    first = SecretBox.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    assert [p.name for p in tmp_path.iterdir()] == ["secrets.key"]  # no temp file left behind
    again = SecretBox.load_or_create(path)
    assert again.open("x", first.seal("x", b"v")) == b"v"


def test_damaged_key_file_is_not_replaced(tmp_path):
    path = tmp_path / "secrets.key"
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(SecretError, match=r"is 7 bytes, expected 32.*do not delete it"):
        SecretBox.load_or_create(path)
    assert path.read_bytes() == b"\x00" * 7


def test_missing_key_folder(tmp_path):
    with pytest.raises(SecretError, match="cannot read or create secrets master key"):
        SecretBox.load_or_create(tmp_path / "nowhere" / "secrets.key")


def test_raw_key_must_be_32_bytes():
    with pytest.raises(SecretError, match="must be 32 bytes, got 16"):
        SecretBox(b"k" * 16)


@pytest.mark.parametrize("name", ["", "1abc", "has-dash", "with space", "x" * 129, "a\n", None])
def test_bad_names(box, name):
    with pytest.raises(SecretError, match=r"bad secret name: expected a letter or '_'"):
        box.seal(name, b"v")
    with pytest.raises(SecretError, match=r"bad secret name"):
        box.open(name, b"\x01" + b"\x00" * 40)


@pytest.mark.parametrize("name", ["a", "_", "DB_PASSWORD", "x" + "9" * 127])
def test_good_names(box, name):
    assert box.open(name, box.seal(name, b"v")) == b"v"


def test_oversize_and_non_bytes_values(box):
    with pytest.raises(SecretError, match="is 65537 bytes, at most 65536 bytes"):
        box.seal("big", b"x" * (MAX_SECRET_BYTES + 1))
    with pytest.raises(SecretError, match="expected bytes, got str"):
        box.seal("text", "not bytes")
