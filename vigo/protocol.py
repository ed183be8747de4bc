"""The wire protocol between envoys / vigocli and a gateway: frames, messages, error codes.

One frame on the stream (TLS underneath, not this module's concern)::

    +---------------------+--------------------------------------------------------+
    | N: uint32 big-endian | N bytes: msgpack map {"v": 1, "t": type, "id": int,   |
    |      (4 bytes)       |                       "b": {body fields}}              |
    +---------------------+--------------------------------------------------------+

``read_frame`` turns every way a peer can break this into a ``ProtocolError`` whose ``code`` is
one of ``ERROR_CODES`` and whose reason says what was expected and what arrived; the gateway
puts that code into an ``error`` frame. ``CLOSING_CODES`` says which codes end the connection.
Full reference: docs/protocol.md.

This module is imported by the envoy: it must stay light (msgpack and the standard library).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from vigo.errors import ProtocolError, UnavailableError, error_from_code

__all__ = [
    "CLIENT_MESSAGES",
    "CLOSING_CODES",
    "ERROR_CODES",
    "FRAME_READ_TIMEOUT_S",
    "HEADER_BYTES",
    "IDLE_TIMEOUT_S",
    "MAX_FRAME_BYTES",
    "MAX_ID",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "REPLIES",
    "REQUEST_TIMEOUT_S",
    "Field",
    "Frame",
    "FrameConnection",
    "Schema",
    "check_allowed",
    "encode",
    "error_body",
    "read_frame",
    "validate_body",
    "write_frame",
]

# --- Limits -----------------------------------------------------------------------------------

#: Envelope version (the "v" field). Bumped only for changes old peers cannot ignore.
PROTOCOL_VERSION = 1
#: Largest payload (bytes after the length prefix) a peer accepts by default. A bundle is the
#: biggest thing sent; 8 MiB leaves room for large stacks while bounding per-connection memory.
MAX_FRAME_BYTES = 8 * 1024 * 1024
#: Length prefix size in bytes (so no payload can exceed 2**32 - 1 bytes whatever the limit).
HEADER_BYTES = 4
#: Seconds allowed to receive one whole frame once its first byte arrived. Bounds how long a
#: slow or half-sent frame (slowloris) can hold a connection and its buffer.
FRAME_READ_TIMEOUT_S = 30.0
#: Seconds to wait for the first byte of the next frame before giving up on an idle peer.
#: Envoys check in far more often; an idle connection past this is a leak or a dead peer.
IDLE_TIMEOUT_S = 300.0
#: Seconds a FrameConnection waits for the reply to one request (the gateway batches, so a
#: reply can take a while; past this the gateway is treated as unreachable).
REQUEST_TIMEOUT_S = 60.0
#: Largest correlation id (ids are non-negative and fit a signed 64-bit integer).
MAX_ID = 2**63 - 1

_HEADER = struct.Struct(">I")
#: After a write fails, how long a request waits for an error frame that arrived before the
#: peer closed (it explains the failure better than the broken pipe does), seconds.
_ANSWER_AFTER_FAILED_SEND_S = 0.5
_READ_CHUNK_BYTES = 256 * 1024  # bytes asked of the reader per call: memory follows arrivals

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


# --- Frames -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One decoded, validated message. ``body`` has defaults filled in."""

    type: str
    id: int
    body: dict


def encode(type: str, id: int, body: dict, *, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    """One frame as bytes. Validates like the receiver will, so a bad body fails at the sender."""
    if not _is_kind(id, int) or not 0 <= id <= MAX_ID:
        raise ProtocolError(
            "bad_envelope", f"id must be an int in 0..{MAX_ID}, got {_describe(id)}"
        )
    validate_body(type, body)

    envelope = {"v": PROTOCOL_VERSION, "t": type, "id": id, "b": body}
    try:
        payload = msgpack.packb(envelope, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ProtocolError("bad_body", f"{type} body cannot be encoded as msgpack: {exc}") from exc
    limit = min(max_bytes, 2**32 - 1)
    if len(payload) > limit:
        raise ProtocolError(
            "frame_too_large", f"{type} frame would be {len(payload)} bytes; the limit is {limit}"
        )
    # Decode it the way the receiver will: catches what packb accepts but a receiver refuses
    # (a non-str map key deep inside traits, say), here rather than as a remote error.
    try:
        _unpack(payload)
    except ProtocolError as exc:
        raise ProtocolError("bad_body", f"{type} body would be refused: {exc.reason}") from exc
    return _HEADER.pack(len(payload)) + payload


async def write_frame(
    writer: asyncio.StreamWriter,
    type: str,
    id: int,
    body: dict,
    *,
    max_bytes: int = MAX_FRAME_BYTES,
) -> None:
    """Encode one frame, write it and wait until the transport's buffer drained."""
    writer.write(encode(type, id, body, max_bytes=max_bytes))
    await writer.drain()


async def read_frame(
    reader: asyncio.StreamReader,
    *,
    max_bytes: int = MAX_FRAME_BYTES,
    idle_timeout_s: float | None = IDLE_TIMEOUT_S,
    frame_timeout_s: float | None = FRAME_READ_TIMEOUT_S,
) -> Frame | None:
    """The next frame, or None on a clean end of stream between frames.

    Raises ``ProtocolError`` for anything the peer got wrong (codes in ``ERROR_CODES``).
    Connection errors from the reader (``OSError``) pass through unchanged. A None timeout
    waits forever.
    """
    # Idle: wait for the first byte of the next frame.
    try:
        async with asyncio.timeout(idle_timeout_s):
            first = await reader.read(1)
    except TimeoutError:
        raise ProtocolError(
            "timeout", f"idle timeout: no frame started within {idle_timeout_s} s"
        ) from None
    if not first:
        return None

    # The rest of the frame, header then payload, under one deadline from the first byte.
    header = bytearray(first)
    payload = bytearray()
    size: int | None = None
    try:
        async with asyncio.timeout(frame_timeout_s):
            await _read_into(reader, header, HEADER_BYTES, "header")
            (size,) = _HEADER.unpack(header)
            if size > max_bytes:  # decided from the header alone: the payload is never read
                raise ProtocolError(
                    "frame_too_large",
                    f"frame announces {size} bytes; the limit is {max_bytes} bytes",
                )
            await _read_into(reader, payload, size, "payload")
    except TimeoutError:
        got = (
            f"{len(header)} of {HEADER_BYTES} header bytes" if size is None
            else f"{len(payload)} of {size} payload bytes"
        )
        raise ProtocolError(
            "timeout", f"frame timeout: frame not complete within {frame_timeout_s} s ({got})"
        ) from None

    return _frame_from(_unpack(payload))


async def _read_into(reader: asyncio.StreamReader, buf: bytearray, size: int, part: str) -> None:
    """Append to ``buf`` until it holds ``size`` bytes; "truncated" at end of stream. Reads in
    chunks so memory grows with what arrives, not with what the header announced."""
    while len(buf) < size:
        chunk = await reader.read(min(size - len(buf), _READ_CHUNK_BYTES))
        if not chunk:
            raise ProtocolError(
                "truncated",
                f"stream ended inside a frame's {part}: expected {size} bytes, got {len(buf)}",
            )
        buf += chunk


def _unpack(payload: bytes | bytearray) -> Any:
    """Exactly one msgpack value, with every container bounded by the payload's own size."""
    size = len(payload)
    if size == 0:
        raise ProtocolError("bad_msgpack", "empty payload: expected one msgpack map")
    try:
        return msgpack.unpackb(
            payload,
            raw=False,               # str is UTF-8 text, bin is bytes
            strict_map_key=True,     # map keys are str or bytes only
            max_str_len=size,
            max_bin_len=size,
            max_array_len=size,      # every element takes at least one byte
            max_map_len=size // 2,   # every pair takes at least two
            max_ext_len=0,           # the protocol uses no ext types (nor timestamps)
        )
    except msgpack.ExtraData as exc:
        raise ProtocolError(
            "bad_msgpack", f"{len(exc.extra)} trailing bytes after the msgpack value"
        ) from exc
    except msgpack.StackError as exc:
        raise ProtocolError("bad_msgpack", "msgpack value nested too deeply") from exc
    except msgpack.FormatError as exc:
        raise ProtocolError("bad_msgpack", "not msgpack: reserved or invalid type byte") from exc
    except Exception as exc:  # the decoder's ValueError family, and anything else it throws
        raise ProtocolError("bad_msgpack", f"not valid msgpack: {exc}") from exc


def _frame_from(envelope: Any) -> Frame:
    """Check the envelope, then the body against its type's schema."""
    if not isinstance(envelope, dict):
        raise ProtocolError("bad_envelope", f"envelope must be a map, got {_describe(envelope)}")
    version = envelope.get("v")
    if not _is_kind(version, int):
        raise _envelope_error("v", "an int", version)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "unknown_version", f"protocol version {version} not spoken: expected {PROTOCOL_VERSION}"
        )
    type_, id_, body = envelope.get("t"), envelope.get("id"), envelope.get("b")
    if not isinstance(type_, str):
        raise _envelope_error("t", "a str", type_)
    if not _is_kind(id_, int) or not 0 <= id_ <= MAX_ID:
        raise _envelope_error("id", f"an int in 0..{MAX_ID}", id_)
    if not isinstance(body, dict):
        raise _envelope_error("b", "a map", body)
    try:
        return Frame(type_, id_, validate_body(type_, body))
    except ProtocolError as exc:
        # A message-level error: the stream is still at a frame boundary, so the receiver can
        # answer this request by its id and keep the connection.
        exc.frame_id = id_
        raise


def _envelope_error(field: str, expected: str, got: Any) -> ProtocolError:
    what = "nothing (missing or nil)" if got is None else _describe(got)
    return ProtocolError("bad_envelope", f"envelope field {field!r} must be {expected}, got {what}")


# --- Client connection ------------------------------------------------------------------------


class FrameConnection:
    """A client's end of one gateway connection.

    One background task reads every frame: a reply goes to the ``request`` waiting for its id,
    anything else (``notify``, late replies) goes to a queue that ``receive`` reads, so nothing
    is lost and cancelling a ``receive`` never leaves the stream mid-frame. Requests may
    overlap; writes are serialised by a lock. Create it inside a running event loop.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        max_bytes: int = MAX_FRAME_BYTES,
        idle_timeout_s: float | None = None,  # the gateway's idle timeout bounds the wait
        frame_timeout_s: float | None = FRAME_READ_TIMEOUT_S,
        request_timeout_s: float | None = REQUEST_TIMEOUT_S,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._max_bytes = max_bytes
        self._idle_timeout_s = idle_timeout_s
        self._frame_timeout_s = frame_timeout_s
        self._request_timeout_s = request_timeout_s
        self._next_id = 1  # 0 is for frames that answer no request (notify, connection errors)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        # Unbounded: only the gateway (authenticated by TLS) fills it, and notify is rare.
        self._inbox: asyncio.Queue[Frame | None] = asyncio.Queue()  # None: the stream ended
        self._write_lock = asyncio.Lock()
        self._read_task: asyncio.Task[None] | None = None
        self._ended = False
        self._failure: BaseException | None = None  # why reading stopped; None = clean EOF

    async def request(self, type: str, body: dict) -> Frame:
        """Send a request and return its reply. An ``error`` reply raises what
        ``errors.error_from_code`` makes of it: ``ServerError``, or ``UnavailableError`` (a
        ``TransportError``) for overloaded/unavailable; a closed connection and a reply that
        does not come within ``request_timeout_s`` raise ``UnavailableError`` ("unavailable")."""
        self._start_reading()
        id_ = self._allocate_id()
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[id_] = future
        try:
            if self._ended:
                raise self._closed_error(f"the reply to {type} #{id_}")
            try:
                await self.send(type, body, id=id_)
            except OSError:
                # The gateway may have said why and closed before this write (a connection-level
                # error answers every waiting request, this one too): that says more.
                if not await self._answered_soon(future):
                    raise
            try:
                async with asyncio.timeout(self._request_timeout_s):
                    frame = await future
            except TimeoutError:
                raise UnavailableError(
                    "unavailable", f"no reply to {type} #{id_} within {self._request_timeout_s} s"
                ) from None
        finally:
            self._pending.pop(id_, None)
        if frame.type == "error":
            body = frame.body
            raise error_from_code(body["code"], body["reason"], retry_after_s=body.get("retry_after_s"))
        return frame

    async def send(self, type: str, body: dict, *, id: int | None = None) -> int:
        """Send one frame without waiting for a reply; returns its id (a fresh one if None)."""
        id_ = self._allocate_id() if id is None else id
        frame = encode(type, id_, body, max_bytes=self._max_bytes)
        async with self._write_lock:
            self._writer.write(frame)
            await self._writer.drain()
        return id_

    async def receive(self) -> Frame | None:
        """The next frame that answers no pending request (``notify`` above all); None once the
        gateway closed the stream. Raises what broke the stream (``ProtocolError``, ``OSError``)."""
        self._start_reading()
        frame = await self._inbox.get()
        if frame is None:
            self._inbox.put_nowait(None)  # keep the end marker for every later call
            if self._failure is not None:
                raise self._failure
        return frame

    def close(self) -> None:
        """Stop reading and close the transport. Pending requests fail with UnavailableError."""
        if self._read_task is not None:
            self._read_task.cancel()
        self._writer.close()

    async def wait_closed(self) -> None:
        """Wait until the transport and the reading task are finished."""
        if self._read_task is not None:
            await asyncio.gather(self._read_task, return_exceptions=True)
        with contextlib.suppress(OSError):  # the peer reset a connection we were closing anyway
            await self._writer.wait_closed()

    async def __aenter__(self) -> FrameConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()

    # -- internals

    async def _answered_soon(self, future: asyncio.Future[Frame]) -> bool:
        """Whether the reader resolves ``future`` with a frame soon (after our write failed)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_ANSWER_AFTER_FAILED_SEND_S):
                await asyncio.shield(future)
                return True
        return False

    def _allocate_id(self) -> int:
        id_ = self._next_id
        self._next_id += 1
        return id_

    def _start_reading(self) -> None:
        if self._read_task is None and not self._ended:
            self._read_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                frame = await read_frame(
                    self._reader,
                    max_bytes=self._max_bytes,
                    idle_timeout_s=self._idle_timeout_s,
                    frame_timeout_s=self._frame_timeout_s,
                )
                if frame is None:
                    return
                future = self._pending.pop(frame.id, None) if frame.id else None
                if future is not None:
                    if not future.done():
                        future.set_result(frame)
                elif frame.type == "error" and frame.id == 0 and self._pending:
                    # A connection-level error (the gateway is about to close): it answers
                    # every request still waiting.
                    for waiting in self._pending.values():
                        if not waiting.done():
                            waiting.set_result(frame)
                    self._pending.clear()
                else:
                    self._inbox.put_nowait(frame)
        except Exception as exc:  # surfaced to every waiting caller and to receive(), never lost
            self._failure = exc
        finally:
            self._ended = True
            for id_, waiting in list(self._pending.items()):
                if not waiting.done():
                    waiting.set_exception(self._closed_error(f"the reply to #{id_}"))
            self._pending.clear()
            self._inbox.put_nowait(None)

    def _closed_error(self, waiting_for: str) -> ProtocolError | UnavailableError:
        if isinstance(self._failure, ProtocolError):
            return self._failure
        error = UnavailableError(
            "unavailable", f"connection to the gateway ended before {waiting_for}"
            + (f": {self._failure}" if self._failure else "")
        )
        error.__cause__ = self._failure
        return error
