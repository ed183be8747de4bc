"""The wire protocol: framing edge cases on a hand-fed StreamReader, FrameConnection on a real
loopback TCP server, and property tests that no input makes read_frame raise anything but
ProtocolError.

pytest-asyncio is not used: every test runs its coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vigo.errors import ProtocolError, ServerError, UnavailableError
from vigo.protocol import (
    CLIENT_MESSAGES,
    CLOSING_CODES,
    ERROR_CODES,
    MAX_FRAME_BYTES,
    MESSAGES,
    REPLIES,
    Frame,
    FrameConnection,
    check_allowed,
    encode,
    error_body,
    read_frame,
    validate_body,
    write_frame,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

#: One valid body per message type (every required field, some optional ones left out).
SAMPLES: dict[str, dict[str, Any]] = {
    "join": {"token": "tok-1", "csr_pem": b"-----BEGIN CSR-----", "hostname": "web1",
             "traits": {"os": {"family": "debian"}}},
    "join_ok": {"envoy_id": "e-1", "certificate_pem": b"cert", "ca_pem": b"ca",
                "signing_key_pem": b"pub", "term": 3},
    "checkin": {"envoy_id": "e-1", "traits": {"cpus": 4}, "bundle_version": "v7", "serial": 7,
                "term": 3, "queue_depth": 2, "oldest_queued_at": 1700000000.5,
                "last_run": {"run_id": "r-9", "failed": 0}, "offline_runs": 5},
    "checkin_ok": {"term": 3, "interval_s": 30.0, "splay_s": 5.0, "bundle": b"\x00bundle",
                   "bundle_version": "v8", "serial": 8},
    "results": {"envoy_id": "e-1", "reports": [{"run_id": "r-1", "resources": []},
                                               {"run_id": "r-2"}]},
    "results_ok": {"acked": ["r-1", "r-2"], "term": 3},
    "renew": {"envoy_id": "e-1", "csr_pem": b"-----BEGIN CERTIFICATE REQUEST-----"},
    "renew_ok": {"certificate_pem": b"cert", "not_after": 1700086400.0},
    "notify": {"reason": "bundle_changed"},
    "admin": {"token": "ray-token", "op": "envoys.list", "args": {"limit": 10}},
    "admin_ok": {"result": [{"envoy_id": "e-1"}]},
    "error": {"code": "overloaded", "reason": "too many check-ins", "retry_after_s": 2.5},
    "ping": {},
    "pong": {},
}


# --- helpers ----------------------------------------------------------------------------------


def frame_bytes(envelope: Any) -> bytes:
    """A correctly length-prefixed frame around any msgpack value (valid or not)."""
    payload = msgpack.packb(envelope, use_bin_type=True)
    return struct.pack(">I", len(payload)) + payload


def raw(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def envelope(t: str = "ping", id: int = 1, b: Any = None, v: Any = 1) -> dict:
    return {"v": v, "t": t, "id": id, "b": {} if b is None else b}


async def _read(data: bytes, eof: bool = True, **kwargs: Any) -> Frame | None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return await read_frame(reader, **kwargs)


def read(data: bytes, eof: bool = True, **kwargs: Any) -> Frame | None:
    return asyncio.run(_read(data, eof, **kwargs))


def refused(data: bytes, code: str, eof: bool = True, **kwargs: Any) -> str:
    """The reason read_frame gives when it refuses ``data`` with ``code``."""
    with pytest.raises(ProtocolError) as info:
        read(data, eof, **kwargs)
    assert info.value.code == code, info.value
    return info.value.reason


def read_all(data: bytes, **kwargs: Any) -> list[Frame]:
    async def main() -> list[Frame]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        frames = []
        while (frame := await read_frame(reader, **kwargs)) is not None:
            frames.append(frame)
        return frames

    return asyncio.run(main())


# --- round trips ------------------------------------------------------------------------------


def test_samples_cover_every_message_type():
    assert set(SAMPLES) == set(MESSAGES)
    assert set(REPLIES) | set(REPLIES.values()) <= set(MESSAGES)


@pytest.mark.parametrize("type_", sorted(MESSAGES))
def test_every_message_type_round_trips(type_):
    frame = read(encode(type_, 42, SAMPLES[type_]))
    assert frame == Frame(type_, 42, validate_body(type_, SAMPLES[type_]))
    for key, value in SAMPLES[type_].items():
        assert frame.body[key] == value


def test_several_frames_then_clean_eof():
    data = b"".join(encode(t, i, SAMPLES[t]) for i, t in enumerate(["ping", "notify", "checkin"]))
    frames = read_all(data)
    assert [(f.type, f.id) for f in frames] == [("ping", 0), ("notify", 1), ("checkin", 2)]
    assert read(b"") is None


def test_defaults_are_filled_and_ints_widen_to_float():
    checkin = {k: v for k, v in SAMPLES["checkin"].items() if k != "offline_runs"}
    assert validate_body("checkin", checkin)["offline_runs"] == 0
    join = {k: v for k, v in SAMPLES["join"].items() if k != "traits"}
    assert read(encode("join", 1, join)).body["traits"] == {}
    assert validate_body("error", {"code": "internal", "reason": "x"})["retry_after_s"] is None
    body = read(encode("checkin_ok", 1, {**SAMPLES["checkin_ok"], "interval_s": 30})).body
    assert body["interval_s"] == 30.0 and isinstance(body["interval_s"], float)


def test_unknown_fields_are_kept_for_forward_compatibility():
    body = {**SAMPLES["notify"], "added_in_a_later_release": [1, 2]}
    assert read(encode("notify", 0, body)).body["added_in_a_later_release"] == [1, 2]
    assert read(encode("ping", 1, {"anything": "goes"})).body == {"anything": "goes"}


def test_nullable_fields_accept_nil():
    body = {**SAMPLES["checkin_ok"], "bundle": None, "bundle_version": None}
    assert read(encode("checkin_ok", 1, body)).body["bundle"] is None
    assert read(encode("admin_ok", 1, {"result": None})).body == {"result": None}


# --- read_frame: each error code ----------------------------------------------------------------


def test_oversized_prefix_is_refused_from_the_header_alone():
    # 100 MiB announced, a few body bytes behind it: refused at once, body never consumed.
    announced = 100 * 1024 * 1024

    async def main() -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(struct.pack(">I", announced) + b"BODY")
        started = time.monotonic()
        with pytest.raises(ProtocolError) as info:
            await read_frame(reader, frame_timeout_s=30.0)
        assert time.monotonic() - started < 0.5
        assert info.value.code == "frame_too_large"
        assert str(announced) in info.value.reason and str(MAX_FRAME_BYTES) in info.value.reason
        reader.feed_eof()
        return await reader.read()

    assert asyncio.run(main()) == b"BODY"


def test_max_bytes_is_per_reader():
    data = encode("notify", 0, {"reason": "x" * 200})
    assert refused(data, "frame_too_large", max_bytes=100).endswith("the limit is 100 bytes")
    assert read(data, max_bytes=len(data)).type == "notify"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x00\x00", "frame's header: expected 4 bytes, got 2"),
        (struct.pack(">I", 100) + b"x" * 40, "frame's payload: expected 100 bytes, got 40"),
    ],
)
def test_eof_inside_a_frame_is_truncated(data, expected):
    assert expected in refused(data, "truncated")


def test_half_frame_then_stall_times_out_within_frame_timeout():
    data = struct.pack(">I", 100) + b"x" * 40
    started = time.monotonic()
    reason = refused(data, "timeout", eof=False, frame_timeout_s=0.2, idle_timeout_s=30.0)
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 1.0
    assert "frame timeout" in reason and "0.2 s" in reason and "40 of 100 payload bytes" in reason


def test_half_header_then_stall_times_out():
    reason = refused(b"\x00\x00", "timeout", eof=False, frame_timeout_s=0.1)
    assert "2 of 4 header bytes" in reason


def test_idle_timeout_waits_for_the_first_byte_only():
    started = time.monotonic()
    reason = refused(b"", "timeout", eof=False, idle_timeout_s=0.1)
    assert 0.1 <= time.monotonic() - started < 1.0
    assert reason == "idle timeout: no frame started within 0.1 s"

    # Once a frame started, only the frame timeout applies: a frame trickling in for longer
    # than the idle timeout still arrives.
    async def main() -> Frame | None:
        reader = asyncio.StreamReader()
        data = encode("notify", 0, {"reason": "slow"})

        async def trickle() -> None:
            for byte in data:
                reader.feed_data(bytes([byte]))
                await asyncio.sleep(0.01)

        task = asyncio.create_task(trickle())
        frame = await read_frame(reader, idle_timeout_s=0.05, frame_timeout_s=5.0)
        await task
        return frame

    assert asyncio.run(main()).body["reason"] == "slow"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\xc1", "reserved or invalid type byte"),
        (msgpack.packb({"v": 1}) + b"abc", "3 trailing bytes"),
        (b"", "empty payload"),
        (b"\xa2\xff\xfe", "not valid msgpack"),  # str that is not UTF-8
        (msgpack.packb({1: 2}), "not allowed for map key"),
        (msgpack.packb(msgpack.ExtType(5, b"xyz")), "max_ext_len"),
        (msgpack.packb(msgpack.Timestamp(1, 0)), "max_ext_len"),
        (b"\x91" * 5000 + b"\xc0", "nested too deeply"),
        (b"\xdd\xff\xff\xff\xff", "exceeds max_array_len"),  # 4 billion elements announced
        (b"\xc6\x00\x10\x00\x00", "incomplete input"),  # 1 MiB of bin announced in 5 bytes
    ],
)
def test_bad_msgpack(payload, expected):
    assert expected in refused(raw(payload), "bad_msgpack")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([1, "ping", 1, {}], "envelope must be a map, got list"),
        ({"t": "ping", "id": 1, "b": {}}, "field 'v' must be an int, got nothing"),
        (envelope(v="1"), "field 'v' must be an int, got str '1'"),
        (envelope(v=True), "field 'v' must be an int, got bool True"),
        ({"v": 1, "id": 1, "b": {}}, "field 't' must be a str, got nothing"),
        (envelope(t=7), "field 't' must be a str, got int 7"),
        (envelope(id=-1), "field 'id' must be an int in 0..9223372036854775807, got int -1"),
        (envelope(id=2**64 - 1), "got int 18446744073709551615"),
        (envelope(id=1.0), "field 'id' must be an int"),
        (envelope(b=[]), "field 'b' must be a map, got list []"),
        ({"v": 1, "t": "ping", "id": 1}, "field 'b' must be a map, got nothing"),
    ],
)
def test_bad_envelope(value, expected):
    assert expected in refused(frame_bytes(value), "bad_envelope")


def test_unknown_version_is_checked_before_the_rest_of_the_envelope():
    reason = refused(frame_bytes({"v": 2, "whatever": "a v2 envelope looks like"}),
                     "unknown_version")
    assert reason == "protocol version 2 not spoken: expected 1"


def test_unknown_type_lists_the_known_ones():
    reason = refused(frame_bytes(envelope(t="subscribe")), "unknown_type")
    assert "'subscribe'" in reason
    assert all(name in reason for name in MESSAGES)


@pytest.mark.parametrize(
    ("type_", "change", "expected"),
    [
        ("checkin", {"serial": "7"}, "checkin body: field 'serial' must be int, got str '7'"),
        ("checkin", {"serial": True}, "field 'serial' must be int, got bool True"),
        ("checkin", {"envoy_id": None}, "field 'envoy_id' must be str, got nil"),
        ("checkin", {"traits": []}, "field 'traits' must be map, got list []"),
        ("checkin", {"last_run": "x"}, "field 'last_run' must be map or nil, got str 'x'"),
        ("checkin", {"oldest_queued_at": "x"}, "must be float or nil, got str 'x'"),
        ("join", {"csr_pem": "text"}, "field 'csr_pem' must be bytes, got str 'text'"),
        ("checkin_ok", {"bundle": "x"}, "field 'bundle' must be bytes or nil"),
        ("results", {"reports": {}}, "field 'reports' must be list of map (run_id: str), got dict"),
        ("results", {"reports": [{"run_id": "a"}, "b"]}, "reports[1] must be a map, got str 'b'"),
        ("results", {"reports": [{}]}, "missing required field 'reports[0].run_id' (str)"),
        ("results", {"reports": [{"run_id": 1}]}, "'reports[0].run_id' must be str, got int 1"),
        ("results_ok", {"acked": ["a", b"b"]}, "field 'acked[1]' must be str, got bytes (1 bytes)"),
        ("error", {"retry_after_s": "soon"}, "field 'retry_after_s' must be float or nil"),
    ],
)
def test_bad_body_names_field_expected_and_got(type_, change, expected):
    body = {**SAMPLES[type_], **change}
    assert expected in refused(frame_bytes(envelope(t=type_, b=body)), "bad_body")
    with pytest.raises(ProtocolError, match="bad_body"):  # and the sender refuses to send it
        encode(type_, 1, body)


def test_missing_required_field():
    body = {k: v for k, v in SAMPLES["checkin"].items() if k != "queue_depth"}
    reason = refused(frame_bytes(envelope(t="checkin", b=body)), "bad_body")
    assert reason == "checkin body: missing required field 'queue_depth' (int)"


def test_body_field_names_must_be_strings():
    reason = refused(frame_bytes(envelope(b={b"bytes-key": 1})), "bad_body")
    assert "field names must be str, got bytes" in reason


# --- encode / write_frame ---------------------------------------------------------------------


def test_encode_refuses_what_a_receiver_would_refuse():
    with pytest.raises(ProtocolError) as info:
        encode("notify", 0, {"reason": "x" * 1000}, max_bytes=500)
    assert info.value.code == "frame_too_large" and "the limit is 500" in info.value.reason
    with pytest.raises(ProtocolError, match="unknown_type"):
        encode("subscribe", 1, {})
    with pytest.raises(ProtocolError, match="bad_envelope"):
        encode("ping", -1, {})
    with pytest.raises(ProtocolError, match="bad_envelope"):
        encode("ping", True, {})
    with pytest.raises(ProtocolError, match="cannot be encoded as msgpack"):
        encode("ping", 1, {"x": {1, 2}})
    # packb accepts an int map key deep in traits (a YAML trait file can produce one);
    # the receiver would not, so neither does the sender.
    with pytest.raises(ProtocolError, match=r"would be refused.*map key"):
        encode("checkin", 1, {**SAMPLES["checkin"], "traits": {"custom": {1: "one"}}})


def test_write_frame_over_loopback():
    async def main() -> Frame | None:
        received: asyncio.Future[Frame | None] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.set_result(await read_frame(reader, idle_timeout_s=5))
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            await write_frame(writer, "checkin", 9, SAMPLES["checkin"])
            frame = await asyncio.wait_for(received, 5)
            writer.close()
            return frame

    assert asyncio.run(main()) == Frame("checkin", 9, validate_body("checkin", SAMPLES["checkin"]))


# --- error codes and connection rules ---------------------------------------------------------


def test_error_codes_are_the_documented_set():
    assert list(ERROR_CODES) == [
        "frame_too_large", "truncated", "timeout", "bad_msgpack", "bad_envelope",
        "unknown_version", "unknown_type", "bad_body", "unauthenticated", "forbidden",
        "bad_token", "revoked", "expired", "overloaded", "not_found", "conflict", "internal", "unavailable",
    ]
    assert all(meaning and "\n" not in meaning for meaning in ERROR_CODES.values())
    assert set(ERROR_CODES) >= CLOSING_CODES
    assert {"bad_body", "bad_token", "forbidden", "overloaded"}.isdisjoint(
        CLOSING_CODES
    )


def test_error_body():
    assert error_body("not_found", "no e-9") == {"code": "not_found", "reason": "no e-9"}
    body = error_body("overloaded", "busy", retry_after_s=3)
    assert body["retry_after_s"] == 3.0
    assert read(encode("error", 5, body)).body == {**body, "retry_after_s": 3.0}
    with pytest.raises(ValueError, match="unknown error code 'oops'"):
        error_body("oops", "x")


def test_check_allowed():
    for type_ in CLIENT_MESSAGES["anonymous"]:
        check_allowed(type_, envoy_certificate=False)
    for type_ in CLIENT_MESSAGES["envoy"]:
        check_allowed(type_, envoy_certificate=True)
    with pytest.raises(ProtocolError, match="unauthenticated: checkin needs mutual TLS"):
        check_allowed("checkin", envoy_certificate=False)
    with pytest.raises(ProtocolError, match="unauthenticated: renew needs mutual TLS"):
        check_allowed("renew", envoy_certificate=False)
    with pytest.raises(ProtocolError, match="forbidden: renew_ok"):
        check_allowed("renew_ok", envoy_certificate=True)
    with pytest.raises(ProtocolError, match="forbidden: join is not accepted on an envoy"):
        check_allowed("join", envoy_certificate=True)
    with pytest.raises(ProtocolError, match="forbidden: checkin_ok"):
        check_allowed("checkin_ok", envoy_certificate=False)


# --- properties -------------------------------------------------------------------------------

_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
_field_names = st.sampled_from(sorted({f.name for s in MESSAGES.values() for f in s.fields}))
_envelopes = st.fixed_dictionaries({
    "v": st.sampled_from([1, 1, 1, 2, "1", None]),
    "t": st.sampled_from(sorted(MESSAGES)) | st.text(max_size=8),
    "id": st.integers(-5, 2**64 - 1) | _scalars,
    "b": st.dictionaries(_field_names | st.text(max_size=5), _values, max_size=6) | _values,
})


def _read_until_done(data: bytes, max_bytes: int = MAX_FRAME_BYTES) -> None:
    """Read frames until EOF or a ProtocolError; anything else fails the test."""

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        while True:
            try:
                frame = await read_frame(reader, max_bytes=max_bytes)
            except ProtocolError as exc:
                assert exc.code in ERROR_CODES
                return
            if frame is None:
                return
            assert frame.type in MESSAGES and isinstance(frame.body, dict)

    asyncio.run(main())


_fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fast
@given(
    data=st.binary(max_size=300) | st.binary(max_size=300).map(raw),
    max_bytes=st.sampled_from([16, 1024, MAX_FRAME_BYTES]),
)
def test_arbitrary_bytes_only_ever_raise_protocol_error(data, max_bytes):
    _read_until_done(data, max_bytes)


@_fast
@given(value=_values | _envelopes, tail=st.binary(max_size=8))
def test_arbitrary_msgpack_frames_only_ever_raise_protocol_error(value, tail):
    _read_until_done(frame_bytes(value) + tail)


_traits = st.dictionaries(st.text(max_size=10), _values, max_size=5)
_checkins = st.fixed_dictionaries(
    {
        "envoy_id": st.text(max_size=20),
        "traits": _traits,
        "bundle_version": st.none() | st.text(max_size=10),
        "serial": st.integers(0, 2**63 - 1),
        "term": st.integers(0, 2**63 - 1),
        "queue_depth": st.integers(0, 10**6),
        "oldest_queued_at": st.none() | st.floats(allow_nan=False),
        "last_run": st.none() | _traits,
    },
    optional={"offline_runs": st.integers(0, 10**6), "future_field": _values},
)


@_fast
@given(body=_checkins, id=st.integers(0, 2**63 - 1))
def test_valid_checkins_round_trip(body, id):
    frame = read(encode("checkin", id, body))
    assert frame.type == "checkin" and frame.id == id
    assert frame.body == {**body, "offline_runs": body.get("offline_runs", 0)}


# --- FrameConnection on a real loopback server ------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def gateway(handler: Handler, **options: Any) -> AsyncIterator[FrameConnection]:
    """A loopback TCP server running ``handler`` per connection, and a client connected to it."""

    handlers: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        try:
            await handler(reader, writer)
        except (asyncio.CancelledError, ConnectionError):
            pass  # the test is over, or the client left: both are normal here
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    connection = FrameConnection(reader, writer, **options)
    try:
        yield connection
    finally:
        await connection.__aexit__(None, None, None)
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A toy gateway: ping -> pong; admin op "fail:<code>" -> that error; admin op "notify"
    -> a notify first, then the reply; admin op "slow" -> reply after the next request's."""
    held: list[Frame] = []
    while (frame := await read_frame(reader, idle_timeout_s=5)) is not None:
        if frame.type == "ping":
            await write_frame(writer, "pong", frame.id, {})
            continue
        op = frame.body["op"]
        if op.startswith("fail:"):
            retry = 1.5 if op == "fail:overloaded" else None
            await write_frame(writer, "error", frame.id,
                              error_body(op[5:], f"{op} as asked", retry_after_s=retry))
        elif op == "notify":
            await write_frame(writer, "notify", 0, {"reason": "bundle_changed"})
            await write_frame(writer, "admin_ok", frame.id, {"result": "after notify"})
        elif op == "slow":
            held.append(frame)
            continue
        else:
            await write_frame(writer, "admin_ok", frame.id, {"result": op})
        for late in held:
            await write_frame(writer, "admin_ok", late.id, {"result": late.body["op"]})
        held.clear()


def admin(op: str) -> dict:
    return {"token": "t", "op": op, "args": {}}


def test_request_gets_the_reply_with_its_own_id():
    async def main() -> None:
        async with gateway(answering) as connection:
            assert (await connection.request("ping", {})).type == "pong"
            reply = await connection.request("admin", admin("hello"))
            assert reply.type == "admin_ok" and reply.body == {"result": "hello"}
            # Replies in the other order than the requests: each still gets its own.
            slow, fast = await asyncio.gather(
                connection.request("admin", admin("slow")),
                connection.request("admin", admin("fast")),
            )
            assert (slow.body["result"], fast.body["result"]) == ("slow", "fast")
            assert slow.id < fast.id

    asyncio.run(main())


def test_error_reply_raises_server_error_with_its_code():
    async def main() -> None:
        async with gateway(answering) as connection:
            with pytest.raises(ServerError) as info:
                await connection.request("admin", admin("fail:not_found"))
            assert not isinstance(info.value, UnavailableError)
            assert (info.value.code, info.value.reason) == ("not_found", "fail:not_found as asked")
            with pytest.raises(UnavailableError) as info:
                await connection.request("admin", admin("fail:overloaded"))
            assert info.value.code == "overloaded" and info.value.retry_after_s == 1.5
            # The connection stays usable after message-level errors.
            assert (await connection.request("ping", {})).type == "pong"

    asyncio.run(main())


def test_notify_arriving_while_waiting_is_delivered_by_receive():
    async def main() -> None:
        async with gateway(answering) as connection:
            # A cancelled receive() must not lose anything either.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(connection.receive(), 0.05)
            reply = await connection.request("admin", admin("notify"))
            assert reply.body == {"result": "after notify"}
            notify = await asyncio.wait_for(connection.receive(), 5)
            assert (notify.type, notify.id) == ("notify", 0)
            assert notify.body == {"reason": "bundle_changed"}

    asyncio.run(main())


def test_gateway_closing_ends_requests_and_receive():
    async def close_after_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader, idle_timeout_s=5)

    async def main() -> None:
        async with gateway(close_after_one) as connection:
            with pytest.raises(UnavailableError, match="ended before the reply to #1"):
                await connection.request("ping", {})
            assert await connection.receive() is None
            assert await connection.receive() is None
            with pytest.raises(UnavailableError):
                await connection.request("ping", {})

    asyncio.run(main())


def test_connection_level_error_answers_the_waiting_request():
    async def reject(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader, idle_timeout_s=5)
        await write_frame(writer, "error", 0, error_body("unauthenticated", "join first"))

    async def main() -> None:
        async with gateway(reject) as connection:
            with pytest.raises(ServerError) as info:
                await connection.request("checkin", SAMPLES["checkin"])
            assert info.value.code == "unauthenticated"

    asyncio.run(main())


def test_an_error_sent_just_before_the_gateway_closed_explains_a_failed_write():
    """The gateway refuses the connection (an `expired` or `revoked` frame, id 0) and closes
    before the client's first request is written: the write fails, the request reports the
    gateway's reason, not the broken pipe."""

    class ClosedWriter:
        def write(self, data: bytes) -> None:
            pass

        async def drain(self) -> None:
            await asyncio.sleep(0.01)  # the reader gets the frame meanwhile
            raise ConnectionResetError("Connection lost")

        def close(self) -> None:
            pass

        async def wait_closed(self) -> None:
            pass

    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(encode("error", 0, error_body("expired", "certificate 1a expired")))
        reader.feed_eof()
        connection = FrameConnection(reader, ClosedWriter())  # type: ignore[arg-type]
        with pytest.raises(ServerError) as info:
            await connection.request("checkin", SAMPLES["checkin"])
        assert (info.value.code, info.value.reason) == ("expired", "certificate 1a expired")
        # Without an answer, the write error stands.
        silent = asyncio.StreamReader()
        silent.feed_eof()
        with pytest.raises(ConnectionResetError):
            await FrameConnection(silent, ClosedWriter()).request("ping", {})  # type: ignore[arg-type]

    asyncio.run(main())


def test_request_timeout_and_broken_frames_from_the_gateway():
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader, idle_timeout_s=5)
        writer.write(raw(b"\xc1"))
        await writer.drain()
        await asyncio.sleep(5)

    async def main() -> None:
        async with gateway(silent, request_timeout_s=0.2) as connection:
            with pytest.raises(UnavailableError, match=r"no reply to ping #1 within 0\.2 s"):
                await connection.request("ping", {})
        async with gateway(garbage) as connection:
            with pytest.raises(ProtocolError, match="bad_msgpack"):
                await connection.request("ping", {})
            with pytest.raises(ProtocolError, match="bad_msgpack"):
                await connection.receive()

    asyncio.run(main())


# --- docs and weight --------------------------------------------------------------------------


def test_docs_describe_every_message_field_and_error_code():
    text = DOCS.read_text()
    for name, schema in MESSAGES.items():
        section = text.split(f"### `{name}`", 1)
        assert len(section) == 2, f"docs/protocol.md has no section for {name}"
        body = section[1].split("\n### ", 1)[0]
        for field in schema.fields:
            assert f"| `{field.name}` | {field.expected()} |" in body, (name, field.name)
    for code, meaning in ERROR_CODES.items():
        assert f"| `{code}` | {meaning} |" in text, code


def test_protocol_imports_nothing_heavy():
    probe = (
        "import sys, vigo.protocol\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('ray', 'yaml', 'jinja2', 'lmdb')]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"
