"""The S3 backend: ``s3://bucket/prefix`` on AWS or any S3-compatible endpoint.

Write-once comes from the server: PutObject and CompleteMultipartUpload carry
``If-None-Match: *``, and a 412 answer is settled by HEAD-ing the object and comparing its
sha256 metadata (same bytes: success, so a retried upload is idempotent). Every PUT also
carries ``x-amz-checksum-sha256`` so S3 rejects bytes damaged on the way. Endpoints that
ignore ``If-None-Match`` (older MinIO and Ceph releases) silently lose write-once.

Credentials come from the usual boto3 sources (environment, ``~/.aws``, instance role), never
from the URL. Objects carry ``sha256`` metadata; listings do not (see `Target.list`).

Every botocore exception is translated here: connection refused, timeouts, throttling and
5xx become `TargetUnavailable` (the caller spools and retries); missing buckets, refused
credentials and the like become `TargetError`, with what was attempted, where, and what the
server said. Multipart uploads that fail are aborted best-effort; add a bucket lifecycle rule
(AbortIncompleteMultipartUpload) for the ones an outage leaves behind.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from typing import Any, BinaryIO

import boto3
import botocore.config
from botocore import exceptions as bx

from vigo.durable import atomic_file
from vigo.errors import (
    ConfigError,
    InvalidRequest,
    NotFound,
    ObjectConflict,
    ObjectCorrupt,
    TargetError,
    TargetUnavailable,
)
from vigo.snapshots.targets.base import (
    COPY_CHUNK_BYTES,
    SHA256_KEY,
    ObjectInfo,
    Progress,
    Target,
    check_key,
    check_metadata,
    check_prefix,
    conflict_message,
    corrupt_message,
    hash_stream,
    sha256_hex,
)

MIB = 1024 * 1024
#: A connect normally takes milliseconds; a dropped SYN means the endpoint is down, and the
#: caller should learn that within a few seconds so it spools instead of stalling.
CONNECT_TIMEOUT_S = 2.0
#: Longest wait for the next bytes of an answer (per socket read, not per request, so large
#: transfers are fine). S3 keeps slow CompleteMultipartUploads alive with whitespace.
READ_TIMEOUT_S = 10.0
#: botocore's own retries, first attempt included. Few: the caller retries with backoff.
RETRY_TOTAL_ATTEMPTS = 2
#: Objects above this go up as multipart uploads, in parts of at least PART_BYTES.
MULTIPART_THRESHOLD_BYTES = 64 * MIB
PART_BYTES = 64 * MIB
#: S3's floor for every part but the last, and its ceiling on the number of parts.
MIN_PART_BYTES = 5 * MIB
MAX_PARTS = 10_000
#: get_file fetches objects above this as parallel ranged GETs of this size. Large ranges
#: keep each connection streaming (one S3 connection moves ~100 MB/s) and keep the request
#: count low: moto re-reads the whole object for every ranged GET.
RANGE_BYTES = 64 * MIB
#: Parallel ranged GETs per get_file.
DOWNLOAD_WORKERS = 8
#: S3's ceiling on keys per DeleteObjects call.
DELETE_BATCH = 1000

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Error codes that pass by themselves: worth a retry later, so TargetUnavailable.
_TRANSIENT_CODES = frozenset({
    "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
    "ThrottlingException", "RequestThrottled", "ConditionalRequestConflict",
})
_DENIED_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "AccountProblem", "AllAccessDisabled",
})


class S3Target(Target):
    """Objects under ``s3://bucket/prefix``. Safe to share between threads (boto3 clients are).

    The size knobs exist for tests (multipart and ranged paths on small files); the defaults
    suit production.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any = None,
        multipart_threshold_bytes: int = MULTIPART_THRESHOLD_BYTES,
        part_bytes: int = PART_BYTES,
        range_bytes: int = RANGE_BYTES,
        download_workers: int = DOWNLOAD_WORKERS,
    ) -> None:
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ConfigError(
                f"invalid S3 bucket name {bucket!r}: expected 3-63 characters of [a-z0-9.-], "
                "starting and ending with a letter or digit"
            )
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_prefix(prefix)
            except InvalidRequest as exc:
                raise ConfigError(f"invalid prefix in s3://{bucket}/{prefix}: {exc}") from exc
        if part_bytes < MIN_PART_BYTES or multipart_threshold_bytes < MIN_PART_BYTES:
            raise ConfigError(
                f"S3 part size and multipart threshold must be at least {MIN_PART_BYTES} bytes, "
                f"got {part_bytes} and {multipart_threshold_bytes}"
            )
        if range_bytes < MIB or download_workers < 1:
            raise ConfigError(
                f"S3 download range must be at least {MIB} bytes and workers at least 1, "
                f"got {range_bytes} and {download_workers}"
            )
        self._bucket = bucket
        self._prefix = prefix
        self._base = f"{prefix}/" if prefix else ""
        self._multipart_threshold = multipart_threshold_bytes
        self._part_bytes = part_bytes
        self._range_bytes = range_bytes
        self._workers = download_workers
        self._bucket_seen = False
        self._client = client or boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=botocore.config.Config(
                connect_timeout=CONNECT_TIMEOUT_S,
                read_timeout=READ_TIMEOUT_S,
                retries={"mode": "standard", "total_max_attempts": RETRY_TOTAL_ATTEMPTS},
                # Several S3-compatible services reject botocore's default aws-chunked CRC
                # trailers (notes/wal-archiving.md §12); we send sha256 ourselves.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # Path-style: no bucket-subdomain DNS on local and self-hosted endpoints.
                s3={"addressing_style": "path"},
                max_pool_connections=download_workers + 2,
            ),
        )

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._prefix}" if self._prefix else f"s3://{self._bucket}"

    def describe(self) -> str:
        return f"{self.url} at {self._client.meta.endpoint_url}"

    # --- writing ------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, metadata: dict[str, str]) -> None:
        key = check_key(key)
        metadata = check_metadata(metadata)
        sha = sha256_hex(data)
        with self._boundary(f"put {key} to", key):
            try:
                self._client.put_object(
                    Bucket=self._bucket, Key=self._base + key, Body=data,
                    Metadata={**metadata, SHA256_KEY: sha}, ChecksumSHA256=_b64(sha),
                    IfNoneMatch="*",
                )
            except bx.ClientError as exc:
                if not _precondition_failed(exc):
                    raise
                # Something is there already, perhaps our own earlier attempt.
                self._check_same(key, sha)

    def put_file(
        self, key: str, path: str | os.PathLike[str], metadata: dict[str, str],
        progress: Progress | None = None,
    ) -> None:
        key = check_key(key)
        metadata = check_metadata(metadata)
        with open(path, "rb") as src:
            # S3 takes metadata before the first byte, so the file is read twice: once here
            # for the sha256, once to upload. Changes in between are caught (see below).
            sha, total = hash_stream(src)
            src.seek(0)
            with self._boundary(f"put {key} to", key):
                # A retry after a crash finds the object there: skip re-sending 200+ MB.
                existing = self._head_raw(key, f"put {key} to")
                if existing is not None:
                    self._check_same(key, sha, existing)
                elif total <= self._multipart_threshold:
                    try:
                        # S3 checks the body against ChecksumSHA256: a file that changed since
                        # it was hashed is refused (BadDigest), never stored under a wrong sha.
                        self._client.put_object(
                            Bucket=self._bucket, Key=self._base + key, Body=src,
                            ContentLength=total, Metadata={**metadata, SHA256_KEY: sha},
                            ChecksumSHA256=_b64(sha), IfNoneMatch="*",
                        )
                    except bx.ClientError as exc:
                        if not _precondition_failed(exc):
                            raise
                        self._check_same(key, sha)
                else:
                    self._multipart(key, src, total, sha, metadata, progress)
        if progress:
            progress(total, total)

    def _multipart(
        self, key: str, src: BinaryIO, total: int, sha: str, metadata: dict[str, str],
        progress: Progress | None,
    ) -> None:
        part_bytes = max(self._part_bytes, math.ceil(total / MAX_PARTS))
        upload_id = self._client.create_multipart_upload(
            Bucket=self._bucket, Key=self._base + key, Metadata={**metadata, SHA256_KEY: sha},
            ChecksumAlgorithm="SHA256",
        )["UploadId"]
        completed = False
        try:
            digest = hashlib.sha256()
            parts = []
            done = 0
            # One part in memory at a time: PART_BYTES bounds the memory, not the file size.
            while chunk := src.read(part_bytes):
                digest.update(chunk)
                part_sha = _b64(sha256_hex(chunk))
                number = len(parts) + 1
                answer = self._client.upload_part(
                    Bucket=self._bucket, Key=self._base + key, UploadId=upload_id,
                    PartNumber=number, Body=chunk, ChecksumSHA256=part_sha,
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": part_sha})
                done += len(chunk)
                if progress and done < total:
                    progress(done, total)
            if digest.hexdigest() != sha or done != total:
                raise TargetError(
                    f"cannot put {key} to {self.describe()}: the file changed while it was "
                    f"uploaded (expected {total} bytes with sha256 {sha}, read {done} bytes "
                    f"with sha256 {digest.hexdigest()}); upload a file nobody writes to",
                    key=key,
                )
            try:
                self._client.complete_multipart_upload(
                    Bucket=self._bucket, Key=self._base + key, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}, IfNoneMatch="*",
                )
                completed = True
            except bx.ClientError as exc:
                if not _precondition_failed(exc):
                    raise
                self._check_same(key, sha)
        finally:
            if not completed:
                # Best effort: during an outage this fails too, and a lifecycle rule cleans up.
                with suppress(Exception):
                    self._client.abort_multipart_upload(
                        Bucket=self._bucket, Key=self._base + key, UploadId=upload_id
                    )

    def _check_same(self, key: str, sha: str, info: dict[str, Any] | None = None) -> None:
        """After a 412: succeed if the stored object has ``sha``, else `ObjectConflict`."""
        info = info or self._head_raw(key, f"put {key} to")
        if info is None:
            raise TargetError(
                f"cannot put {key} to {self.describe()}: the server refused it as already "
                "existing (412), but HEAD finds no object; deleted meanwhile?",
                key=key,
            )
        stored = info["Metadata"].get(SHA256_KEY)
        if stored != sha:
            raise ObjectConflict(conflict_message(key, self.describe(), stored, sha), key=key)

    # --- reading ------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        key = check_key(key)
        with self._boundary(f"get {key} from", key):
            answer = self._client.get_object(Bucket=self._bucket, Key=self._base + key)
            data = answer["Body"].read()
        expected = self._expected_sha(key, answer["Metadata"])
        got = sha256_hex(data)
        if got != expected:
            raise ObjectCorrupt(corrupt_message(key, self.describe(), expected, got), key=key)
        return data

    def get_file(
        self, key: str, path: str | os.PathLike[str], progress: Progress | None = None
    ) -> None:
        key = check_key(key)
        with self._boundary(f"get {key} from", key):
            info = self._head_raw(key, f"get {key} from")
            if info is None:
                raise NotFound(f"cannot get {key} from {self.describe()}: not found", key=key)
            expected = self._expected_sha(key, info["Metadata"])
            size, etag = info["ContentLength"], info["ETag"]
            with atomic_file(path) as out:
                if size <= self._range_bytes:
                    got = self._download_whole(key, etag, out, size, progress)
                else:
                    got = self._download_ranges(key, etag, out, size, progress)
                if got != expected:
                    raise ObjectCorrupt(
                        corrupt_message(key, self.describe(), expected, got), key=key
                    )

    def _download_whole(
        self, key: str, etag: str, out: BinaryIO, size: int, progress: Progress | None
    ) -> str:
        # If-Match: the bytes must be the ones whose sha256 HEAD just showed us.
        body = self._client.get_object(Bucket=self._bucket, Key=self._base + key, IfMatch=etag)["Body"]
        digest = hashlib.sha256()
        done = 0
        for chunk in body.iter_chunks(COPY_CHUNK_BYTES):
            digest.update(chunk)
            out.write(chunk)
            done += len(chunk)
            if progress:
                progress(done, size)
        if progress and done == 0:
            progress(0, size)
        return digest.hexdigest()

    def _download_ranges(
        self, key: str, etag: str, out: BinaryIO, size: int, progress: Progress | None
    ) -> str:
        """Parallel ranged GETs written in place; hashed in order as the ranges arrive."""
        out.truncate(size)
        fd = out.fileno()
        starts = list(range(0, size, self._range_bytes))

        def fetch(start: int) -> int:
            end = min(start + self._range_bytes, size) - 1
            body = self._client.get_object(
                Bucket=self._bucket, Key=self._base + key, IfMatch=etag, Range=f"bytes={start}-{end}"
            )["Body"]
            offset = start
            for chunk in body.iter_chunks(COPY_CHUNK_BYTES):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
            if offset != end + 1:
                raise TargetUnavailable(
                    f"cannot get {key} from {self.describe()}: range {start}-{end} ended "
                    f"after {offset - start} bytes, expected {end + 1 - start}",
                    key=key,
                )
            return end + 1 - start

        digest = hashlib.sha256()
        arrived: set[int] = set()
        hashed = 0  # index into starts of the first range not hashed yet
        done = 0
        pool = ThreadPoolExecutor(self._workers, thread_name_prefix="s3-get")
        try:
            pending: set[Future[int]] = set()
            by_future: dict[Future[int], int] = {}
            for i, start in enumerate(starts):
                future = pool.submit(fetch, start)
                pending.add(future)
                by_future[future] = i
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    done += future.result()  # re-raises a range's failure here, in order
                    arrived.add(by_future[future])
                # Hash from the page cache while later ranges are still downloading.
                while hashed in arrived:
                    start = starts[hashed]
                    _hash_range(fd, start, min(start + self._range_bytes, size), digest)
                    hashed += 1
                if progress:
                    progress(done, size)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return digest.hexdigest()

    def head(self, key: str) -> ObjectInfo | None:
        key = check_key(key)
        with self._boundary(f"head {key} in", key):
            info = self._head_raw(key, f"head {key} in")
        if info is None:
            return None
        return ObjectInfo(key, info["ContentLength"], dict(info["Metadata"]))

    def _head_raw(self, key: str, what: str) -> dict[str, Any] | None:
        try:
            return self._client.head_object(Bucket=self._bucket, Key=self._base + key)
        except bx.ClientError as exc:
            if _status(exc) != 404:
                raise
        # A HEAD answer has no body, so a missing bucket looks like a missing key: tell them
        # apart once, or a typo'd bucket would read as "nothing archived yet" forever.
        self._require_bucket(what, key)
        return None

    def _require_bucket(self, what: str, key: str | None) -> None:
        if self._bucket_seen:
            return
        try:
            self._client.head_bucket(Bucket=self._bucket)
        except bx.ClientError as exc:
            if _status(exc) != 404:
                raise
            raise TargetError(_no_bucket(what, self.describe(), self._bucket), key=key) from exc
        self._bucket_seen = True

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        prefix = check_prefix(prefix)
        found = []
        with self._boundary(f"list {prefix!r} in" if prefix else "list", None):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self._bucket, Prefix=self._base + prefix
            )
            for page in pages:
                for obj in page.get("Contents", ()):
                    found.append(ObjectInfo(obj["Key"][len(self._base):], obj["Size"]))
        found.sort(key=lambda info: info.key)  # S3 sorts by UTF-8 bytes; other stores may not
        return found

    # --- deleting -----------------------------------------------------------------------------

    def delete(self, keys: list[str]) -> None:
        keys = list(dict.fromkeys(check_key(key) for key in keys))  # all valid, or none deleted
        for first in range(0, len(keys), DELETE_BATCH):
            batch = keys[first:first + DELETE_BATCH]
            more = ", ..." if len(batch) > 1 else ""
            what = f"delete {len(batch)} object(s) ({batch[0]}{more}) from"
            with self._boundary(what, None):
                answer = self._client.delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": self._base + k} for k in batch], "Quiet": True},
                )
            errors = [e for e in answer.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                sample = "; ".join(
                    f"{e.get('Key', '?')[len(self._base):]}: {e.get('Code')} {e.get('Message', '')}"
                    for e in errors[:3]
                )
                transient = all(e.get("Code") in _TRANSIENT_CODES for e in errors)
                error = TargetUnavailable if transient else TargetError
                raise error(
                    f"cannot {what} {self.describe()}: {len(errors)} of {len(batch)} refused "
                    f"({sample})"
                )

    # --- helpers ------------------------------------------------------------------------------

    def _expected_sha(self, key: str, metadata: dict[str, str]) -> str:
        sha = metadata.get(SHA256_KEY)
        if sha is None:
            raise ObjectCorrupt(
                f"object {key} at {self.describe()} has no {SHA256_KEY!r} metadata; expected "
                "one on every object a vigo target put there",
                key=key,
            )
        return sha

    @contextmanager
    def _boundary(self, what: str, key: str | None) -> Iterator[None]:
        """Translate botocore's exceptions: ``cannot <what> <target>: <reason>``."""
        where = self.describe()
        try:
            yield
        except TargetError:
            raise
        except bx.ClientError as exc:
            raise self._client_error(what, key, exc) from exc
        except (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError) as exc:
            raise TargetError(
                f"cannot {what} {where}: no usable AWS credentials ({exc}); expected them in "
                "the environment, ~/.aws or an instance role",
                key=key,
            ) from exc
        except bx.SSLError as exc:
            raise TargetError(f"cannot {what} {where}: TLS failed: {exc}", key=key) from exc
        except bx.ConnectTimeoutError as exc:
            raise TargetUnavailable(
                f"cannot {what} {where}: no connection within {self._client.meta.config.connect_timeout:g} s",
                key=key,
            ) from exc
        except bx.EndpointConnectionError as exc:
            cause = str(exc.kwargs.get("error", ""))
            reason = "connection refused" if "refused" in cause.lower() else f"cannot connect ({cause})"
            raise TargetUnavailable(f"cannot {what} {where}: {reason}", key=key) from exc
        except bx.ReadTimeoutError as exc:
            raise TargetUnavailable(
                f"cannot {what} {where}: no answer within {self._client.meta.config.read_timeout:g} s",
                key=key,
            ) from exc
        except (bx.ConnectionError, bx.HTTPClientError, bx.IncompleteReadError) as exc:
            raise TargetUnavailable(f"cannot {what} {where}: connection broke: {exc}", key=key) from exc
        except bx.BotoCoreError as exc:
            raise TargetError(f"cannot {what} {where}: {exc}", key=key) from exc

    def _client_error(self, what: str, key: str | None, exc: bx.ClientError) -> TargetError:
        where = self.describe()
        error = exc.response.get("Error", {})
        code, message, status = error.get("Code", "?"), error.get("Message", ""), _status(exc)
        said = f"{code} (HTTP {status}){': ' + message if message else ''}"
        if code == "NoSuchBucket":
            return TargetError(_no_bucket(what, where, self._bucket), key=key)
        if code == "NoSuchKey":
            return NotFound(f"cannot {what} {where}: not found", key=key)
        if code in _DENIED_CODES or status == 403:
            return TargetError(
                f"cannot {what} {where}: access denied, {said}; check the credentials and the "
                "bucket policy",
                key=key,
            )
        if code == "PreconditionFailed":
            return TargetError(
                f"cannot {what} {where}: the object changed while it was read ({said})", key=key
            )
        if code in _TRANSIENT_CODES or status in (408, 429) or (status or 0) >= 500:
            return TargetUnavailable(f"cannot {what} {where}: {said}", key=key)
        return TargetError(f"cannot {what} {where}: {said}", key=key)


def _no_bucket(what: str, where: str, bucket: str) -> str:
    return f"cannot {what} {where}: bucket {bucket!r} does not exist (create it first)"


def _status(exc: bx.ClientError) -> int | None:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def _precondition_failed(exc: bx.ClientError) -> bool:
    return _status(exc) == 412 or exc.response.get("Error", {}).get("Code") == "PreconditionFailed"


def _b64(hex_digest: str) -> str:
    """The base64 form S3's checksum headers want."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def _hash_range(fd: int, start: int, end: int, digest: Any) -> None:
    offset = start
    while offset < end:
        chunk = os.pread(fd, min(COPY_CHUNK_BYTES, end - offset), offset)
        if not chunk:
            raise OSError(f"short read at {offset} of a file that should hold {end} bytes")
        digest.update(chunk)
        offset += len(chunk)
