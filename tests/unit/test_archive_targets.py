"""One conformance suite for every archive target backend (vigo.snapshots.targets).

Each test runs against a FileTarget in tmp_path and an S3Target on a real moto S3 server on
loopback (tests/s3server.py). The S3 target uses small part and range sizes, so multi-MB
files already take the multipart upload and parallel ranged download paths.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.config
import pytest

from tests.s3server import S3Server, aws_env, s3_server  # noqa: F401  (fixtures)
from vigo.errors import (
    ConfigError,
    InvalidRequest,
    NotFound,
    ObjectConflict,
    ObjectCorrupt,
    TargetError,
    TargetUnavailable,
)
from vigo.snapshots.targets import Target, open_target
from vigo.snapshots.targets.file import FileTarget
from vigo.snapshots.targets.s3 import S3Target

MIB = 1024 * 1024
BUCKET = "vigo-archive"
PREFIX = "cluster-a/archive"
#: An outage must surface as TargetUnavailable this fast, not as a hang.
OUTAGE_DETECTED_WITHIN_S = 5.0
#: Objects for the listing test: past S3's 1000-key page and DeleteObjects batch.
MANY_S3 = 1010
MANY_FILE = 300


@dataclass
class Backend:
    name: str
    target: Target
    #: Flip one byte of the stored object, leaving its stored sha256 as it was.
    corrupt: Callable[[str], None]
    #: A target of the same kind whose bucket / root directory does not exist.
    missing_container: Callable[[], Target]


def _flip(data: bytes) -> bytes:
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    return bytes(flipped)


def _s3_target(server: S3Server, bucket: str = BUCKET) -> S3Target:
    return S3Target(
        bucket, PREFIX, endpoint_url=server.endpoint_url,
        multipart_threshold_bytes=5 * MIB, part_bytes=5 * MIB, range_bytes=2 * MIB,
    )


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "file":
        root = tmp_path / "archive"
        root.mkdir()

        def corrupt_file(key: str) -> None:
            path = root.joinpath(*key.split("/"))
            path.write_bytes(_flip(path.read_bytes()))

        return Backend("file", FileTarget(root), corrupt_file, lambda: FileTarget(tmp_path / "absent"))

    server: S3Server = request.getfixturevalue("s3_server")
    server.create_bucket(BUCKET)
    raw = server.client()

    def corrupt_s3(key: str) -> None:
        # Overwrite through a plain client, keeping the old metadata (and so the old sha256).
        old = raw.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")
        raw.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}", Body=_flip(old["Body"].read()),
                       Metadata=old["Metadata"])

    return Backend("s3", _s3_target(server), corrupt_s3, lambda: _s3_target(server, "no-such-bucket"))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# --- round trips --------------------------------------------------------------------------------


def test_put_get_round_trip_keeps_bytes_and_metadata(backend: Backend):
    target = backend.target
    data = os.urandom(100_000)
    key = "p0/generations/0123456789abcdef/wal/00000001/0000000000000020-0000000000001000.seg"
    target.put(key, data, {"created-ms": "1700000000123", "term": "3"})

    assert target.get(key) == data
    info = target.head(key)
    assert info is not None
    assert (info.key, info.size) == (key, len(data))
    assert info.metadata == {"created-ms": "1700000000123", "term": "3", "sha256": _sha(data)}

    # Edge cases: an empty object, and every character the key rules allow.
    odd_key = "a-b/c_d.e=f+g@h:i/Z9"
    target.put("empty", b"", {})
    target.put(odd_key, b"odd", {"x": "printable ASCII, inner spaces ok"})
    assert target.get("empty") == b""
    assert target.head("empty").size == 0
    assert target.get(odd_key) == b"odd"
    assert target.head(odd_key).metadata["x"] == "printable ASCII, inner spaces ok"


def test_put_is_write_once_and_idempotent(backend: Backend, tmp_path: Path):
    target = backend.target
    target.put("wal/seg", b"first bytes", {"n": "1"})
    target.put("wal/seg", b"first bytes", {"n": "2"})  # a retry: same bytes, success
    assert target.head("wal/seg").metadata["n"] == "1"  # the first write's metadata stays

    with pytest.raises(ObjectConflict) as err:
        target.put("wal/seg", b"other bytes", {"n": "3"})
    assert isinstance(err.value, TargetError)
    assert "wal/seg" in str(err.value) and "write-once" in str(err.value)
    assert err.value.key == "wal/seg"
    assert target.get("wal/seg") == b"first bytes"

    same, other = tmp_path / "same", tmp_path / "other"
    same.write_bytes(b"first bytes")
    other.write_bytes(b"other bytes")
    target.put_file("wal/seg", same, {})
    with pytest.raises(ObjectConflict, match="wal/seg"):
        target.put_file("wal/seg", other, {})
    assert target.get("wal/seg") == b"first bytes"


def test_put_file_and_get_file_stream_large_objects_with_progress(backend: Backend, tmp_path: Path):
    target = backend.target
    data = os.urandom(12 * MIB + 7)  # S3: 3 multipart parts up, 7 ranged GETs down
    src = tmp_path / "snapshot.db"
    src.write_bytes(data)

    up: list[tuple[int, int]] = []
    target.put_file("snapshots/00000001.db", src, {"created-ms": "1"}, progress=lambda d, t: up.append((d, t)))
    info = target.head("snapshots/00000001.db")
    assert (info.size, info.metadata["sha256"]) == (len(data), _sha(data))
    _assert_progress(up, len(data))

    down: list[tuple[int, int]] = []
    dest = tmp_path / "restore" / "state.db"
    dest.parent.mkdir()
    target.get_file("snapshots/00000001.db", dest, progress=lambda d, t: down.append((d, t)))
    assert dest.read_bytes() == data
    _assert_progress(down, len(data))
    assert _leftovers(dest.parent) == ["state.db"]  # the temp file was renamed, not left

    # A small file takes the single-request paths.
    small = tmp_path / "small"
    small.write_bytes(b"x" * 10_000)
    target.put_file("small", small, {})
    target.get_file("small", tmp_path / "small.back")
    assert (tmp_path / "small.back").read_bytes() == small.read_bytes()
    assert target.get("snapshots/00000001.db") == data


def _assert_progress(calls: list[tuple[int, int]], total: int) -> None:
    assert len(calls) >= 2, calls
    assert {t for _, t in calls} == {total}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total


# --- listing and deleting ----------------------------------------------------------------------


def test_list_sorts_filters_and_pages_then_delete_removes_many(backend: Backend):
    target = backend.target
    # Only S3 pages (1000 keys per listing and per DeleteObjects); fewer keep files quick.
    many = MANY_S3 if backend.name == "s3" else MANY_FILE
    first_index = many * 3 // 5
    wal = [f"g/wal/{i // first_index:08x}/{i:016x}.seg" for i in range(many)]
    others = ["g/snapshots/00000000.db", "h/other", "g/wal-notes"]
    keys = wal + others
    shuffled = random.Random(3).sample(keys, len(keys))
    with ThreadPoolExecutor(16) as pool:  # also: a target is shared between threads
        list(pool.map(lambda k: target.put(k, k.encode(), {}), shuffled))

    listed = target.list()
    assert [o.key for o in listed] == sorted(keys)
    assert all(o.size == len(o.key) and o.metadata == {} for o in listed)
    assert [o.key for o in target.list("g/wal/00000001/")] == sorted(wal[first_index:])
    assert [o.key for o in target.list("g/wal/0000000")] == sorted(wal)  # mid-segment prefix
    assert [o.key for o in target.list("g/wal")] == sorted([*wal, "g/wal-notes"])
    assert target.list("nothing/") == []

    target.delete([*wal, "g/wal/ffffffff/never-existed.seg"])  # missing keys are fine
    assert [o.key for o in target.list()] == sorted(others)
    assert target.head(wal[0]) is None
    target.delete([])


def test_missing_key(backend: Backend, tmp_path: Path):
    target = backend.target
    with pytest.raises(NotFound) as err:
        target.get("wal/absent")
    assert "wal/absent" in str(err.value) and "not found" in str(err.value)
    assert target.head("wal/absent") is None
    with pytest.raises(NotFound, match="wal/absent"):
        target.get_file("wal/absent", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- integrity ---------------------------------------------------------------------------------


def test_flipped_byte_is_detected_and_never_written_out(backend: Backend, tmp_path: Path):
    target = backend.target
    small, big = os.urandom(1000), os.urandom(5 * MIB + 123)  # S3: big is 3 ranged GETs
    target.put("wal/small", small, {})
    target.put("snap/big", big, {})
    backend.corrupt("wal/small")
    backend.corrupt("snap/big")

    with pytest.raises(ObjectCorrupt) as err:
        target.get("wal/small")
    assert "wal/small" in str(err.value) and _sha(small) in str(err.value)
    with pytest.raises(ObjectCorrupt, match="snap/big"):
        target.get("snap/big")

    out = tmp_path / "restore"
    out.mkdir()
    (out / "state.db").write_bytes(b"previous")
    for key in ("wal/small", "snap/big"):
        with pytest.raises(ObjectCorrupt, match=key):
            target.get_file(key, out / "state.db")
    # The destination is untouched and no temp file is left behind.
    assert (out / "state.db").read_bytes() == b"previous"
    assert _leftovers(out) == ["state.db"]


# --- refused input -----------------------------------------------------------------------------

BAD_KEYS = [
    "", "/abs/key", "..", "../up", "a/../b", "a/./b", "a//b", "a/", ".hidden", "a/.tmp",
    "x.meta.json", "back\\slash", "sp ace", "nul\x00", "é", "a/" + "b" * 201, "k/" * 450,
]
BAD_METADATA = [
    {"Upper": "x"}, {"under_score": "x"}, {"sha256": "0" * 64}, {"x": "é"}, {"x": " padded"},
    {"x": "line\nbreak"}, {"x": "v" * 2000}, {"x": 1},
]


def test_bad_keys_prefixes_and_metadata_are_refused(backend: Backend, tmp_path: Path):
    target = backend.target
    src = tmp_path / "src"
    src.write_bytes(b"data")
    for key in BAD_KEYS:
        for op in (
            lambda k: target.put(k, b"data", {}),
            lambda k: target.put_file(k, src, {}),
            target.get,
            lambda k: target.get_file(k, tmp_path / "out"),
            target.head,
            lambda k: target.delete(["fine", k]),
        ):
            with pytest.raises(InvalidRequest) as err:
                op(key)
            assert isinstance(err.value, ValueError)
            assert repr(key) in str(err.value)
    for prefix in ("/abs", "../", "a//", ".hidden"):
        with pytest.raises(InvalidRequest, match="prefix"):
            target.list(prefix)
    for metadata in BAD_METADATA:
        with pytest.raises(InvalidRequest, match="metadata"):
            target.put("fine", b"data", metadata)
    assert target.list() == []  # nothing refused was half-written


# --- the target itself missing or down ---------------------------------------------------------


def test_missing_bucket_or_directory_is_a_permanent_clear_error(backend: Backend, tmp_path: Path):
    target = backend.missing_container()
    container = "no-such-bucket" if backend.name == "s3" else str(tmp_path / "absent")
    src = tmp_path / "src"
    src.write_bytes(b"data")
    for op in (
        lambda: target.put("wal/k", b"data", {}),
        lambda: target.put_file("wal/k", src, {}),
        lambda: target.get("wal/k"),
        lambda: target.get_file("wal/k", tmp_path / "out"),
        lambda: target.head("wal/k"),  # not None: "nothing archived yet" would hide the typo
        lambda: target.list(),
        lambda: target.delete(["wal/k"]),
    ):
        with pytest.raises(TargetError) as err:
            op()
        assert not isinstance(err.value, (TargetUnavailable, NotFound))
        assert container in str(err.value) and "does not exist" in str(err.value)
    assert not (tmp_path / "absent").exists()  # a typo'd root is not created


def test_s3_outage_is_reported_quickly_and_heals(s3_server: S3Server, tmp_path: Path):  # noqa: F811
    s3_server.create_bucket(BUCKET)
    target = _s3_target(s3_server)
    target.put("wal/before", b"archived before the outage", {})
    src = tmp_path / "src"
    src.write_bytes(b"data")

    s3_server.stop()
    for op in (
        lambda: target.put("wal/during", b"data", {}),
        lambda: target.put_file("wal/during", src, {}),
        lambda: target.get("wal/before"),
        lambda: target.get_file("wal/before", tmp_path / "out"),
        lambda: target.head("wal/before"),
        lambda: target.list(),
        lambda: target.delete(["wal/before"]),
    ):
        started = time.monotonic()
        with pytest.raises(TargetUnavailable) as err:
            op()
        assert time.monotonic() - started < OUTAGE_DETECTED_WITHIN_S
        assert isinstance(err.value, ConnectionError)
        message = str(err.value)
        assert "connection refused" in message and s3_server.endpoint_url in message
        assert f"s3://{BUCKET}/{PREFIX}" in message
    assert not (tmp_path / "out").exists()

    s3_server.restart()  # same port; moto keeps its data across a restart
    assert target.get("wal/before") == b"archived before the outage"
    target.put("wal/during", b"data", {})
    assert [o.key for o in target.list("wal/")] == ["wal/before", "wal/during"]


@pytest.fixture
def unanswered_port() -> Iterator[tuple[int, int]]:
    """(blackholed, hung): connects to the first time out; the second accepts, never answers."""
    with socket.socket() as blackholed, socket.socket() as hung:
        # Backlog 0 plus one pending connection: the kernel drops further SYNs.
        blackholed.bind(("127.0.0.1", 0))
        blackholed.listen(0)
        with socket.create_connection(blackholed.getsockname()):
            hung.bind(("127.0.0.1", 0))
            hung.listen(16)  # the kernel completes handshakes; nobody ever reads
            yield blackholed.getsockname()[1], hung.getsockname()[1]


def test_s3_endpoint_that_never_answers_is_unavailable_not_a_hang(
    aws_env: dict[str, str], unanswered_port: tuple[int, int],  # noqa: F811
):
    # Short timeouts keep this quick; with the production ones (CONNECT_TIMEOUT_S, two
    # attempts) a dropped SYN is reported within about 2 x 2 s plus one backoff.
    def target_at(port: int) -> S3Target:
        client = boto3.session.Session().client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}",
            config=botocore.config.Config(
                connect_timeout=0.3, read_timeout=0.5, retries={"total_max_attempts": 1}
            ),
        )
        return S3Target(BUCKET, PREFIX, client=client)

    blackholed, hung = unanswered_port
    started = time.monotonic()
    with pytest.raises(TargetUnavailable, match=r"no connection within 0\.3 s") as err:
        target_at(blackholed).head("wal/k")
    assert "head wal/k in" in str(err.value) and f"127.0.0.1:{blackholed}" in str(err.value)

    with pytest.raises(TargetUnavailable, match=r"no answer within 0\.5 s") as err:
        target_at(hung).put("wal/k", b"data", {})
    assert "put wal/k to" in str(err.value)
    assert time.monotonic() - started < 5.0


def test_s3_multipart_settles_a_lost_race_by_sha256(s3_server: S3Server, tmp_path: Path):  # noqa: F811
    # put_file HEADs first, so CompleteMultipartUpload's 412 happens only when another writer
    # (or our own earlier, unrecorded attempt) finishes in between: simulate that by making
    # the first HEAD see nothing.
    s3_server.create_bucket(BUCKET)
    target = _s3_target(s3_server)
    data = os.urandom(6 * MIB)
    src = tmp_path / "snap"
    src.write_bytes(data)
    target.put_file("snap", src, {})

    real_head = target._head_raw
    heads: list[str] = []

    def blind_first_head(key: str, what: str):
        heads.append(key)
        return None if len(heads) == 1 else real_head(key, what)

    target._head_raw = blind_first_head  # type: ignore[method-assign]
    target.put_file("snap", src, {})  # 412 on complete, then same sha256: success
    src.write_bytes(_flip(data))
    heads.clear()
    with pytest.raises(ObjectConflict, match="snap"):
        target.put_file("snap", src, {})
    assert len(heads) == 2  # the blind HEAD, then the one that settled the 412
    uploads = s3_server.client().list_multipart_uploads(Bucket=BUCKET)
    assert uploads.get("Uploads", []) == []  # both refused uploads were aborted
    assert target.get("snap") == data


# --- the file backend's own layout -------------------------------------------------------------


def test_file_layout_survives_crash_leftovers_and_deletes_empty_dirs(tmp_path: Path):
    root = tmp_path / "archive"
    root.mkdir()
    target = FileTarget(root)
    target.put("g/wal/00000001/a.seg", b"a", {})
    assert _leftovers(root / "g" / "wal" / "00000001") == ["a.seg", "a.seg.meta.json"]

    # A crash between the metadata rename and the link leaves an orphan .meta.json; a crash
    # mid-write leaves a temp file. Neither is an object, and the retried put succeeds.
    seg = root / "g" / "wal" / "00000001"
    (seg / "b.seg.meta.json").write_text('{"format": 1, "metadata": {"sha256": "00"}}')
    (seg / ".b.seg.x1y2.part").write_bytes(b"partial")
    assert target.head("g/wal/00000001/b.seg") is None
    assert [o.key for o in target.list()] == ["g/wal/00000001/a.seg"]
    target.put("g/wal/00000001/b.seg", b"b", {})
    assert target.get("g/wal/00000001/b.seg") == b"b"

    # A metadata file removed behind our back is corruption, not a silent pass.
    (seg / "a.seg.meta.json").unlink()
    with pytest.raises(ObjectCorrupt, match=re.escape("g/wal/00000001/a.seg")):
        target.get("g/wal/00000001/a.seg")

    (seg / ".b.seg.x1y2.part").unlink()
    target.delete(["g/wal/00000001/a.seg", "g/wal/00000001/b.seg"])
    assert _leftovers(root) == [".lock"]  # emptied directories went too


# --- URLs --------------------------------------------------------------------------------------


def test_open_target_builds_the_backend_a_url_names(tmp_path: Path):
    target = open_target(f"file://{tmp_path}")
    assert isinstance(target, FileTarget) and target.url == tmp_path.as_uri()
    assert open_target(f"file://localhost{tmp_path}").url == tmp_path.as_uri()
    assert open_target("file:///srv/vigo%20archive/").url == "file:///srv/vigo%20archive"

    s3 = open_target("s3://bucket/some/prefix/", endpoint_url="http://127.0.0.1:9", region="eu-west-1")
    assert isinstance(s3, S3Target)
    assert s3.url == "s3://bucket/some/prefix"
    assert s3.describe() == "s3://bucket/some/prefix at http://127.0.0.1:9"
    assert open_target("s3://bucket", endpoint_url="http://127.0.0.1:9").url == "s3://bucket"


@pytest.mark.parametrize(("url", "kwargs", "says"), [
    ("", {}, "empty"),
    ("/srv/archive", {}, "no scheme"),
    ("ftp://host/x", {}, "scheme 'ftp'"),
    ("file:relative/dir", {}, "relative path"),
    ("file://backup-host/x", {}, "names host"),
    ("file:///srv/../etc", {}, "'..'"),
    ("file:///srv/archive", {"endpoint_url": "http://127.0.0.1:9"}, "s3:// targets only"),
    ("s3://", {}, "no bucket"),
    ("s3:///prefix", {}, "no bucket"),
    ("s3://Bad_Bucket/x", {}, "invalid S3 bucket name"),
    ("s3://bucket:9000/x", {}, "port"),
    ("s3://bucket/a/../b", {}, "'..'"),
    ("s3://bucket/x?versionId=1", {}, "query"),
    ("s3://bucket/x", {"endpoint_url": "127.0.0.1:9000"}, "http(s)://host"),
    ("s3://bucket/x", {"region": " "}, "region"),
])
def test_open_target_refuses_malformed_urls(url: str, kwargs: dict[str, str], says: str):
    with pytest.raises(ConfigError) as err:
        open_target(url, **kwargs)
    assert says in str(err.value)


@pytest.mark.parametrize(("url", "kwargs"), [
    ("s3://AKIAEXAMPLE:hunter2secret@bucket/x", {}),
    ("s3://bucket/x", {"endpoint_url": "http://AKIAEXAMPLE:hunter2secret@127.0.0.1:9000"}),
])
def test_credentials_in_urls_are_refused_without_echoing_them(url: str, kwargs: dict[str, str]):
    with pytest.raises(ConfigError, match="credentials") as err:
        open_target(url, **kwargs)
    assert "hunter2secret" not in str(err.value)
