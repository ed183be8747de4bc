"""The PolicyBundle: one signed, versioned, self-contained compilation of a stack.

Bytes on the wire and on disk are a msgpack map:

    {"vigo-bundle": 1,            format version; anything else is refused
     "body": <msgpack bytes>,      what the signature covers (see BODY below)
     "signature": <64 bytes>,      Ed25519 over SIGNING_CONTEXT + body
     "key_id": "<16 hex>",         fingerprint of the signing key, for a readable wrong-key error
     "secrets": <bytes> | None}    msgpack {"salt": 16 random bytes, "values": {name: value}}

The body names the secrets blob by sha256, so the secrets travel outside the signed body (an
envoy seals them with its own key in its cache, a server can encrypt them per envoy) and are
still covered by the signature. The random salt keeps the sha256 from being a guessable hash of
a weak secret.

BODY: format, stack, version (content hash, see ``_content_version``), serial (monotonic, set
by the builder), term (fencing epoch, 0 for a bundle built offline), built_at, policies,
templates, files, secrets_sha256.

The bundle is *evaluated on the envoy*: conditions and templates stay as source, so a cached
bundle adapts to fresh traits while no server is reachable.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from vigo.crypto.keys import key_id
from vigo.errors import BundleFormatError, SignatureError, StackError

if TYPE_CHECKING:  # the envoy decodes bundles without loading the stack loader (and yaml)
    from vigo.policy.stack import Stack

FORMAT = 1
SIGNING_CONTEXT = b"vigo-bundle-v1\x00"
#: A bundle larger than this is refused before it is even parsed.
MAX_BUNDLE_BYTES = 96 * 1024 * 1024


@dataclass
class Bundle:
    """A verified bundle. ``raw_*`` keep the exact signed bytes so it can be stored and re-verified."""

    version: str
    serial: int
    term: int
    stack: str
    built_at: float
    policies: list[dict[str, Any]]
    templates: dict[str, str]
    files: dict[str, bytes]
    secrets: dict[str, str] = field(repr=False)
    key_id: str = ""
    raw_body: bytes = field(default=b"", repr=False)
    raw_signature: bytes = field(default=b"", repr=False)
    raw_secrets: bytes | None = field(default=None, repr=False)

    def encode(self) -> bytes:
        return encode(self.raw_body, self.raw_signature, self.key_id, self.raw_secrets)

    def summary(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "serial": self.serial,
            "term": self.term,
            "stack": self.stack,
            "built_at": self.built_at,
            "policies": len(self.policies),
            "resources": sum(len(p["resources"]) for p in self.policies),
        }


def build(
    stack: Stack,
    *,
    signing_key: Ed25519PrivateKey,
    serial: int,
    term: int = 0,
    secrets: Mapping[str, str] | None = None,
) -> Bundle:
    """Compile a validated stack into a signed bundle carrying only the secrets it references."""
    secrets = dict(secrets or {})
    needed = stack.secret_names()
    for policy in stack.policies:
        for name in policy.secrets:
            if name not in secrets:
                raise StackError(
                    f"secret {name!r} is referenced but not provided",
                    file=policy.file,
                    policy=policy.name,
                    expected=f"a value for {name!r} (vigocli stack build --secrets FILE)",
                    got="none",
                )
    values = {name: str(secrets[name]) for name in needed}
    if serial < 0 or term < 0:
        raise StackError("serial and term must be >= 0", expected="non-negative integers", got=(serial, term))

    policies = [
        {
            "name": p.name,
            "file": p.file,
            "description": p.description,
            "when": p.when,
            "vars": p.vars,
            "secrets": p.secrets,
            "resources": [{"type": r.type, "name": r.name, "attrs": r.attrs} for r in p.resources],
        }
        for p in stack.policies
    ]
    raw_secrets = _pack({"salt": os.urandom(16), "values": values}) if values else None
    content = {"policies": policies, "templates": stack.templates, "files": stack.files}
    body = {
        "format": FORMAT,
        "stack": stack.name,
        "version": _content_version(content, values, signing_key),
        "serial": int(serial),
        "term": int(term),
        "built_at": time.time(),
        **content,
        "secrets_sha256": hashlib.sha256(raw_secrets).hexdigest() if raw_secrets else None,
    }
    raw_body = _pack(body)
    signature = signing_key.sign(SIGNING_CONTEXT + raw_body)
    return _from_body(body, raw_body, signature, key_id(signing_key.public_key()), raw_secrets, values)


def _content_version(content: dict[str, Any], values: dict[str, str], key: Ed25519PrivateKey) -> str:
    """Deterministic: the same stack and secrets always give the same version.

    Secret values enter through an HMAC keyed by the signing key, so the version changes when a
    secret changes without the version being a hash anyone could test guesses against.
    """
    digest = hashlib.sha256(_pack(content))
    if values:
        raw_key = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        mac_key = hashlib.sha256(b"vigo-secrets-version\x00" + raw_key).digest()
        digest.update(hmac.new(mac_key, _pack(values), hashlib.sha256).digest())
    return digest.hexdigest()[:32]


def encode(raw_body: bytes, signature: bytes, kid: str, raw_secrets: bytes | None) -> bytes:
    return _pack(
        {"vigo-bundle": FORMAT, "body": raw_body, "signature": signature, "key_id": kid, "secrets": raw_secrets}
    )


def decode(data: bytes, trusted: Ed25519PublicKey, *, origin: str = "bundle") -> Bundle:
    """Parse and verify bundle bytes. Raises BundleFormatError or SignatureError, never anything else."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleFormatError(f"{origin}: {len(data)} bytes is over the {MAX_BUNDLE_BYTES}-byte limit")
    outer = _unpack(data, origin, "the outer bundle map")
    if not isinstance(outer, dict) or "vigo-bundle" not in outer:
        raise BundleFormatError(f"{origin}: not a vigo PolicyBundle (expected a map with 'vigo-bundle', got {type(outer).__name__})")
    if outer["vigo-bundle"] != FORMAT:
        raise BundleFormatError(
            f"{origin}: bundle format {outer['vigo-bundle']!r} is not supported by this envoy (expected {FORMAT}); upgrade vigo"
        )
    raw_body, signature = outer.get("body"), outer.get("signature")
    raw_secrets, kid = outer.get("secrets"), outer.get("key_id", "")
    if not isinstance(raw_body, bytes) or not isinstance(signature, bytes):
        raise BundleFormatError(f"{origin}: body and signature must be bytes")
    if raw_secrets is not None and not isinstance(raw_secrets, bytes):
        raise BundleFormatError(f"{origin}: secrets must be bytes or absent")
    return verify_parts(raw_body, signature, str(kid), raw_secrets, trusted, origin=origin)


def verify_parts(
    raw_body: bytes,
    signature: bytes,
    kid: str,
    raw_secrets: bytes | None,
    trusted: Ed25519PublicKey,
    *,
    origin: str = "bundle",
) -> Bundle:
    trusted_id = key_id(trusted)
    try:
        trusted.verify(signature, SIGNING_CONTEXT + raw_body)
    except InvalidSignature as exc:
        who = f"key {kid}" if kid and kid != trusted_id else "an unknown key, or was altered"
        raise SignatureError(
            f"{origin}: signature does not verify: expected a bundle signed by trusted key "
            f"{trusted_id}, but it was signed by {who}"
        ) from exc
    body = _unpack(raw_body, origin, "the signed body")
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        got = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise BundleFormatError(f"{origin}: body format {got!r} is not supported (expected {FORMAT})")
    expected_sha = body.get("secrets_sha256")
    values: dict[str, str] = {}
    if expected_sha is not None:
        if raw_secrets is None or hashlib.sha256(raw_secrets).hexdigest() != expected_sha:
            raise SignatureError(f"{origin}: the secrets do not match the signed digest (missing or altered)")
        blob = _unpack(raw_secrets, origin, "the secrets")
        values = blob.get("values", {}) if isinstance(blob, dict) else {}
    elif raw_secrets is not None:
        raise SignatureError(f"{origin}: carries secrets that the signed body does not name")
    try:
        return _from_body(body, raw_body, signature, kid or trusted_id, raw_secrets, values)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleFormatError(f"{origin}: signed body is missing or mistypes a field: {exc!r}") from exc


def _from_body(
    body: dict[str, Any],
    raw_body: bytes,
    signature: bytes,
    kid: str,
    raw_secrets: bytes | None,
    values: dict[str, str],
) -> Bundle:
    return Bundle(
        version=str(body["version"]),
        serial=int(body["serial"]),
        term=int(body["term"]),
        stack=str(body["stack"]),
        built_at=float(body["built_at"]),
        policies=list(body["policies"]),
        templates=dict(body["templates"]),
        files=dict(body["files"]),
        secrets=dict(values),
        key_id=kid,
        raw_body=raw_body,
        raw_signature=signature,
        raw_secrets=raw_secrets,
    )


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes, origin: str, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise BundleFormatError(f"{origin}: {what} is not valid msgpack ({exc})") from exc
