"""The frame half of the wire protocol: length-prefixed msgpack envelopes, and a client's connection.

``encode`` / ``write_frame`` build a frame (validating its body as the receiver will),
``read_frame`` turns every way a peer can break the framing or the envelope into a
``ProtocolError`` (codes in ``vigo.protocol.messages.ERROR_CODES``), and ``FrameConnection``
is the envoy's and vigocli's end of a gateway connection: one reader task matching replies to
requests by id. The body schemas are in ``vigo.protocol.messages``.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from vigo.errors import ProtocolError, UnavailableError, error_from_code
from vigo.protocol.messages import _describe, _is_kind, validate_body

__all__ = [
    "FRAME_READ_TIMEOUT_S",
    "HEADER_BYTES",
    "IDLE_TIMEOUT_S",
    "MAX_FRAME_BYTES",
    "MAX_ID",
    "PROTOCOL_VERSION",
    "REQUEST_TIMEOUT_S",
    "Frame",
    "FrameConnection",
    "encode",
    "read_frame",
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
