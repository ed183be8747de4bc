"""The message half of the wire protocol: error codes and every message type's body schema.

What a frame's body may hold (``MESSAGES``), the reply each request gets (``REPLIES``), what a
client may send on which connection (``CLIENT_MESSAGES``) and the codes an ``error`` frame
carries (``ERROR_CODES``, ``CLOSING_CODES``). Framing, the envelope and the client connection
are in ``vigo.protocol.frames``. Full reference: docs/protocol.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from vigo.errors import ProtocolError

__all__ = [
    "CLIENT_MESSAGES",
    "CLOSING_CODES",
    "ERROR_CODES",
    "MESSAGES",
    "REPLIES",
    "Field",
    "Schema",
    "check_allowed",
    "error_body",
    "validate_body",
]

# --- Error codes ------------------------------------------------------------------------------

#: Every code an ``error`` frame may carry, with its one-line meaning (docs/protocol.md).
ERROR_CODES: dict[str, str] = {
    "frame_too_large": "the length prefix announces more bytes than the receiver's limit",
    "truncated": "the stream ended inside a frame's header or payload",
    "timeout": "no frame started within the idle timeout, or one did not finish in time",
    "bad_msgpack": "the payload is not exactly one msgpack value within the decoder's limits",
    "bad_envelope": "the payload is not a map with v: int, t: str, id: int >= 0, b: map",
    "unknown_version": "the envelope's v is not a protocol version this peer speaks",
    "unknown_type": "the message type is not one this peer knows",
    "bad_body": "the body does not match its message type's schema",
    "unauthenticated": "the message needs an envoy certificate: join, then reconnect with mTLS",
    "forbidden": "the message is not allowed on this connection (wrong side, wrong identity)",
    "bad_token": "the join or admin token is unknown, expired or used up",
    "revoked": "this envoy or its certificate was revoked",
    "expired": "the envoy certificate has expired: the envoy must join again with a new token",
    "overloaded": "the gateway sheds load: retry after retry_after_s, maybe elsewhere",
    "not_found": "the thing the request names does not exist",
    "conflict": "the request conflicts with current state (stale term, duplicate name)",
    "internal": "the server failed while handling the request (a bug, logged server-side)",
    "unavailable": "the server cannot serve this now (no primary, draining): retry later",
}

#: Codes after which the gateway closes the connection: the stream can no longer be trusted to
#: be at a frame boundary (or the peer already left), or the peer must not go on at all.
#: Every other code answers one message and the connection stays open.
CLOSING_CODES = frozenset(
    {"frame_too_large", "truncated", "timeout", "bad_msgpack", "bad_envelope",
     "unknown_version", "unknown_type", "revoked", "expired"}
)

# --- Schemas ----------------------------------------------------------------------------------
# Declared as data: one ``Field`` per body field (kind, required, nullable, default, doc) in the
# ``_SCHEMAS`` table below, which docs/protocol.md follows. It is checked by the small loop here
# rather than by ``vigo.fields`` (the settings engine) on purpose: bodies are open maps (unknown
# fields kept) on the gateway's hot path, and the engine measured twice as slow on a check-in.
# The msgspec rewrite of the protocol replaces the table and the loop together.


@dataclass(frozen=True)
class Field:
    """One body field. ``kind`` is the Python type it decodes to (``object`` = any value).

    Checks are shallow: a ``dict`` field is checked to be a map, nothing inside it; a ``list``
    field also checks each element against ``items`` when given (a type, or a ``Schema`` for a
    list of maps). A ``float`` field accepts an int (and returns it as float); ``bool`` never
    passes for ``int``/``float``. An optional field that is absent gets a copy of ``default``.
    """

    name: str
    kind: type
    required: bool = True
    nullable: bool = False
    default: Any = None
    items: type | Schema | None = None
    doc: str = ""

    def expected(self) -> str:
        """The field's form as docs and messages write it: ``list of str``, ``bytes or nil``."""
        text = _KIND_NAMES[self.kind]
        if isinstance(self.items, Schema):
            inner = ", ".join(f"{f.name}: {f.expected()}" for f in self.items.fields)
            text += f" of map ({inner})"
        elif self.items is not None:
            text += f" of {_KIND_NAMES[self.items]}"
        return text + (" or nil" if self.nullable else "")


@dataclass(frozen=True)
class Schema:
    """A message type: who sends it, what it is for, its fields. Unknown fields are allowed
    (kept, never checked) so a newer peer can add optional fields without breaking older ones."""

    name: str
    sender: str
    doc: str
    fields: tuple[Field, ...] = ()

    def validate(self, body: Any) -> dict:
        """The body, copied, with defaults filled in; ``ProtocolError("bad_body")`` naming the
        field, the expected form and what arrived if it does not fit."""
        return _check_fields(f"{self.name} body", self.fields, body, "")


_KIND_NAMES: dict[Any, str] = {
    str: "str", bytes: "bytes", int: "int", float: "float", bool: "bool",
    dict: "map", list: "list", object: "any",
}


def _check_fields(label: str, fields: tuple[Field, ...], body: Any, where: str) -> dict:
    """``body`` copied with defaults filled in; ``where`` prefixes field names (``reports[2].``)."""
    if not isinstance(body, dict):
        what = where[:-1] or "body"
        raise ProtocolError("bad_body", f"{label}: {what} must be a map, got {_describe(body)}")
    for key in body:
        if not isinstance(key, str):
            raise ProtocolError(
                "bad_body", f"{label}: field names must be str, got {_describe(key)}"
            )
    out = dict(body)
    for field in fields:
        name = where + field.name
        if field.name not in body:
            if field.required:
                raise ProtocolError(
                    "bad_body", f"{label}: missing required field {name!r} ({field.expected()})"
                )
            out[field.name] = copy.copy(field.default)
        else:
            out[field.name] = _check_value(label, name, field, body[field.name])
    return out


def _check_value(label: str, name: str, field: Field, value: Any) -> Any:
    """``value`` if it fits ``field`` (ints widened to float where a float is due)."""
    if value is None and (field.nullable or field.kind is object):
        return None
    if not _is_kind(value, field.kind):
        raise ProtocolError(
            "bad_body",
            f"{label}: field {name!r} must be {field.expected()}, got {_describe(value)}",
        )
    if field.kind is float:
        return float(value)
    if field.kind is list and field.items is not None:
        for index, item in enumerate(value):
            where = f"{name}[{index}]"
            if isinstance(field.items, Schema):
                _check_fields(label, field.items.fields, item, where + ".")
            elif not _is_kind(item, field.items):
                want = _KIND_NAMES[field.items]
                raise ProtocolError(
                    "bad_body", f"{label}: field {where!r} must be {want}, got {_describe(item)}"
                )
    return value


def _is_kind(value: Any, kind: type) -> bool:
    if kind is object:
        return True
    if isinstance(value, bool):  # bool is an int subclass; a flag is never a count
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _describe(value: Any, limit: int = 60) -> str:
    """A short rendering of a value that arrived where something else was expected."""
    if isinstance(value, (bytes, bytearray)):
        return f"bytes ({len(value)} bytes)"
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return "nil" if value is None else f"{type(value).__name__} {text}"


def _f(name: str, kind: type, doc: str, **options: Any) -> Field:
    return Field(name, kind, doc=doc, **options)


_REPORT = Schema("report", "envoy", "one run report", (_f("run_id", str, "the run's unique id"),))

_SCHEMAS = (
    Schema("join", "envoy", "enrol with a join token and a CSR (no client certificate yet)", (
        _f("token", str, "the join token an operator created"),
        _f("csr_pem", bytes, "PEM certificate signing request for the envoy's key"),
        _f("hostname", str, "the host's name, for the roster"),
        _f("traits", dict, "traits collected at join time", required=False, default={}),
    )),
    Schema("join_ok", "server", "admitted: the envoy's certificate and what it must trust", (
        _f("envoy_id", str, "the id the fleet knows this envoy by"),
        _f("certificate_pem", bytes, "the envoy's certificate, signed by the fleet CA"),
        _f("ca_pem", bytes, "the fleet CA certificate (to verify gateways)"),
        _f("signing_key_pem", bytes, "public key that signs bundles"),
        _f("term", int, "current term of the envoy's partition"),
    )),
    Schema("checkin", "envoy", "periodic state report; asks for a newer bundle", (
        _f("envoy_id", str, "must match the client certificate"),
        _f("traits", dict, "freshly collected traits"),
        _f("bundle_version", str, "version of the bundle in force", nullable=True),
        _f("serial", int, "highest bundle serial the envoy accepted"),
        _f("term", int, "highest term the envoy saw"),
        _f("queue_depth", int, "run reports queued, not yet acknowledged"),
        _f("oldest_queued_at", float, "epoch seconds of the oldest queued report", nullable=True),
        _f("last_run", dict, "summary of the last run", nullable=True),
        _f("offline_runs", int, "runs done since the last successful checkin",
           required=False, default=0),
    )),
    Schema("checkin_ok", "server", "schedule and, when newer, the bundle", (
        _f("term", int, "current term"),
        _f("interval_s", float, "seconds until the next checkin"),
        _f("splay_s", float, "random extra delay bound, seconds (spreads the fleet)"),
        _f("bundle", bytes, "signed bundle; nil = the envoy's is current", nullable=True),
        _f("bundle_version", str, "version of the bundle the envoy should run", nullable=True),
        _f("serial", int, "serial of that bundle"),
        _f("gateways", list, "every gateway serving now, HOST:PORT; nil = not known (an older server)",
           items=str, required=False, nullable=True),
    )),
    Schema("results", "envoy", "queued run reports, oldest first", (
        _f("envoy_id", str, "must match the client certificate"),
        _f("reports", list, "run reports", items=_REPORT),
    )),
    Schema("results_ok", "server", "the reports now durably stored", (
        _f("acked", list, "run ids the envoy may delete from its queue", items=str),
        _f("term", int, "current term"),
    )),
    Schema("renew", "envoy", "a new certificate for a new key, before the current one expires", (
        _f("envoy_id", str, "must match the client certificate"),
        _f("csr_pem", bytes, "PEM certificate signing request for the envoy's new key"),
    )),
    Schema("renew_ok", "server", "the new certificate; the one presented stays valid until it expires", (
        _f("certificate_pem", bytes, "the envoy's new certificate, signed by the fleet CA"),
        _f("not_after", float, "epoch seconds when the new certificate expires"),
    )),
    Schema("notify", "server", "unsolicited hint (id 0): check in now", (
        _f("reason", str, "why, for logs (bundle_changed, ...)"),
    )),
    Schema("admin", "vigocli", "an operator command", (
        _f("token", str, "the Ray cluster token"),
        _f("op", str, "the operation (envoys.list, token.create, ...)"),
        _f("args", dict, "the operation's arguments"),
    )),
    Schema("admin_ok", "server", "the operation's result", (
        _f("result", object, "any msgpack value (map, list, str, nil, ...)"),
    )),
    Schema("error", "server", "the request (same id) or the connection (id 0) failed", (
        _f("code", str, "one of the error codes; unknown codes mean internal"),
        _f("reason", str, "what was attempted, expected and what arrived"),
        _f("retry_after_s", float, "seconds to wait before retrying",
           required=False, nullable=True),
    )),
    Schema("ping", "client", "keepalive / liveness probe; fields ignored"),
    Schema("pong", "server", "reply to ping; fields ignored"),
)

#: Every message type this version knows, by its "t".
MESSAGES: dict[str, Schema] = {schema.name: schema for schema in _SCHEMAS}

#: The reply type each request type gets when it succeeds (otherwise an ``error``).
REPLIES: dict[str, str] = {
    "join": "join_ok",
    "checkin": "checkin_ok",
    "results": "results_ok",
    "renew": "renew_ok",
    "admin": "admin_ok",
    "ping": "pong",
}

#: What a client may send, by how its TLS connection is authenticated. "anonymous": TLS without
#: a client certificate (an envoy before admission, vigocli: admin is authorised by its token).
#: "envoy": mutual TLS with an envoy certificate. Enforced by the gateway with ``check_allowed``.
CLIENT_MESSAGES: dict[str, frozenset[str]] = {
    "anonymous": frozenset({"join", "ping", "admin"}),
    "envoy": frozenset({"checkin", "results", "renew", "ping"}),
}


def validate_body(type: str, body: Any) -> dict:
    """The body of a ``type`` message, copied with defaults filled in, or ``ProtocolError``
    ("unknown_type" / "bad_body") saying which field, the expected form and what arrived."""
    schema = MESSAGES.get(type)
    if schema is None:
        raise ProtocolError(
            "unknown_type", f"unknown message type {type!r}; known: {', '.join(sorted(MESSAGES))}"
        )
    return schema.validate(body)


def check_allowed(type: str, *, envoy_certificate: bool) -> None:
    """Raise ``ProtocolError`` if a client may not send ``type`` on this connection:
    "unauthenticated" when it needs an envoy certificate the connection lacks, else "forbidden"."""
    kind = "envoy" if envoy_certificate else "anonymous"
    if type in CLIENT_MESSAGES[kind]:
        return
    if not envoy_certificate and type in CLIENT_MESSAGES["envoy"]:
        raise ProtocolError(
            "unauthenticated", f"{type} needs mutual TLS with an envoy certificate: join first"
        )
    raise ProtocolError(
        "forbidden",
        f"{type} is not accepted on an {kind} connection; allowed: "
        f"{', '.join(sorted(CLIENT_MESSAGES[kind]))}",
    )


def error_body(code: str, reason: str, *, retry_after_s: float | None = None) -> dict:
    """The body of an ``error`` frame. ``code`` must be one of ``ERROR_CODES``."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}; known: {', '.join(ERROR_CODES)}")
    body: dict[str, Any] = {"code": code, "reason": reason}
    if retry_after_s is not None:
        body["retry_after_s"] = float(retry_after_s)
    return body
