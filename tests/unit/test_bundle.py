"""Bundles: build, sign, verify, refuse; keys; only referenced secrets travel."""

from __future__ import annotations

import msgpack
import pytest

from tests.conftest import EXAMPLE_STACK, write_stack
from vigo.crypto.keys import generate_keypair, key_id, load_private_key, load_public_key
from vigo.errors import BundleFormatError, SignatureError, SigningKeyError, StackError
from vigo.policy import bundle as bundle_mod
from vigo.policy.stack import load_stack

SECRETS = {"api_token": "tok-123456", "unused": "never-shipped"}


def test_round_trip(keypair):
    private, public, *_ = keypair
    built = bundle_mod.build(load_stack(EXAMPLE_STACK), signing_key=private, serial=7, secrets=SECRETS)
    back = bundle_mod.decode(built.encode(), public)
    assert (back.version, back.serial, back.term) == (built.version, 7, 0)
    assert back.secrets == {"api_token": "tok-123456"}  # only what policies reference
    assert back.templates == built.templates and back.files == built.files
    assert [p["name"] for p in back.policies] == [p["name"] for p in built.policies]


def test_version_is_content_hash(keypair):
    private, *_ = keypair
    stack = load_stack(EXAMPLE_STACK)
    a = bundle_mod.build(stack, signing_key=private, serial=1, secrets=SECRETS)
    b = bundle_mod.build(stack, signing_key=private, serial=2, secrets=SECRETS)
    c = bundle_mod.build(stack, signing_key=private, serial=3, secrets={**SECRETS, "api_token": "other"})
    assert a.version == b.version  # same content, whatever the serial
    assert a.version != c.version  # a changed secret changes the version


def test_secret_not_in_plain_body(keypair):
    private, *_ = keypair
    built = bundle_mod.build(load_stack(EXAMPLE_STACK), signing_key=private, serial=1, secrets=SECRETS)
    assert b"tok-123456" not in built.raw_body
    assert b"never-shipped" not in built.encode()


def test_missing_secret_is_a_build_error(keypair):
    private, *_ = keypair
    with pytest.raises(StackError, match="secret 'api_token' is referenced but not provided"):
        bundle_mod.build(load_stack(EXAMPLE_STACK), signing_key=private, serial=1, secrets={})


def test_wrong_key_names_both_keys(tmp_path, keypair):
    private, _public, *_ = keypair
    _, other_pub = generate_keypair(tmp_path / "other.key")
    other = load_public_key(other_pub)
    data = bundle_mod.build(load_stack(EXAMPLE_STACK), signing_key=private, serial=1, secrets=SECRETS).encode()
    with pytest.raises(SignatureError) as info:
        bundle_mod.decode(data, other)
    assert key_id(other) in str(info.value) and key_id(private.public_key()) in str(info.value)


def _outer(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)


def test_tampered_body_and_secrets_are_refused(keypair):
    private, public, *_ = keypair
    data = bundle_mod.build(load_stack(EXAMPLE_STACK), signing_key=private, serial=1, secrets=SECRETS).encode()
    outer = _outer(data)
    body = bytearray(outer["body"])
    body[len(body) // 2] ^= 0x01
    with pytest.raises(SignatureError):
        bundle_mod.decode(msgpack.packb({**outer, "body": bytes(body)}), public)
    secrets = msgpack.packb({"salt": b"0" * 16, "values": {"api_token": "swapped"}})
    with pytest.raises(SignatureError, match="secrets do not match"):
        bundle_mod.decode(msgpack.packb({**outer, "secrets": secrets}), public)
    with pytest.raises(SignatureError, match="secrets do not match"):
        bundle_mod.decode(msgpack.packb({**outer, "secrets": None}), public)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not valid msgpack"),
        (b"\x93\x01\x02\x03", "not a vigo PolicyBundle"),
        (msgpack.packb({"vigo-bundle": 99, "body": b"", "signature": b""}), "format 99 is not supported"),
        (msgpack.packb({"vigo-bundle": 1, "body": "text", "signature": b""}), "must be bytes"),
        (b"\xc1" * 10, "not valid msgpack"),
    ],
)
def test_malformed_bundles_get_specific_errors(keypair, data, match):
    _, public, *_ = keypair
    with pytest.raises(BundleFormatError, match=match):
        bundle_mod.decode(data, public)


def test_oversized_bundle_refused_before_parsing(keypair, monkeypatch):
    _, public, *_ = keypair
    monkeypatch.setattr(bundle_mod, "MAX_BUNDLE_BYTES", 10)
    with pytest.raises(BundleFormatError, match="over the 10-byte limit"):
        bundle_mod.decode(b"x" * 11, public)


def test_signed_body_of_unknown_format(keypair):
    private, public, *_ = keypair
    body = msgpack.packb({"format": 2})
    sig = private.sign(bundle_mod.SIGNING_CONTEXT + body)
    with pytest.raises(BundleFormatError, match="body format 2 is not supported"):
        bundle_mod.decode(bundle_mod.encode(body, sig, "", None), public)


def test_keygen_modes_and_no_overwrite(tmp_path):
    private, public = generate_keypair(tmp_path / "k")
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"PUBLIC KEY" in public.read_bytes()
    with pytest.raises(SigningKeyError, match="refusing to overwrite"):
        generate_keypair(tmp_path / "k")
    generate_keypair(tmp_path / "k", force=True)


def test_bad_key_files(tmp_path):
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(SigningKeyError, match="expected an unencrypted PEM Ed25519 private key"):
        load_private_key(tmp_path / "junk")
    with pytest.raises(SigningKeyError, match="expected a PEM Ed25519 public key"):
        load_public_key(tmp_path / "junk")
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_public_key(tmp_path / "missing.pub")


def test_bundle_without_secrets(tmp_path, keypair):
    private, public, *_ = keypair
    stack = load_stack(write_stack(tmp_path / "s", {"a.yaml": {"resources": [{"file": "/x", "content": "1"}]}}))
    back = bundle_mod.decode(bundle_mod.build(stack, signing_key=private, serial=1).encode(), public)
    assert back.secrets == {} and back.raw_secrets is None
