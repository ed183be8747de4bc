"""The wire protocol between envoys / vigocli and a gateway: frames, messages, error codes.

One frame on the stream (TLS underneath, not this package's concern)::

    +---------------------+--------------------------------------------------------+
    | N: uint32 big-endian | N bytes: msgpack map {"v": 1, "t": type, "id": int,   |
    |      (4 bytes)       |                       "b": {body fields}}              |
    +---------------------+--------------------------------------------------------+

``read_frame`` turns every way a peer can break this into a ``ProtocolError`` whose ``code`` is
one of ``ERROR_CODES`` and whose reason says what was expected and what arrived; the gateway
puts that code into an ``error`` frame. ``CLOSING_CODES`` says which codes end the connection.
Full reference: docs/protocol.md.

    messages.py  error codes, the body schema of every message type, who may send what
    frames.py    the length-prefixed envelope: encode, read_frame / write_frame, FrameConnection

Callers use the names below (``from vigo import protocol``; ``protocol.read_frame``), not the
modules. This package is imported by the envoy: it must stay light (msgpack and the standard
library).
"""

from vigo.protocol.frames import (
    FRAME_READ_TIMEOUT_S,
    HEADER_BYTES,
    IDLE_TIMEOUT_S,
    MAX_FRAME_BYTES,
    MAX_ID,
    PROTOCOL_VERSION,
    REQUEST_TIMEOUT_S,
    Frame,
    FrameConnection,
    encode,
    read_frame,
    write_frame,
)
from vigo.protocol.messages import (
    CLIENT_MESSAGES,
    CLOSING_CODES,
    ERROR_CODES,
    MESSAGES,
    REPLIES,
    Field,
    Schema,
    check_allowed,
    error_body,
    validate_body,
)

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
