"""Backups: a partition's whole state as one encrypted, verifiable file (a "unit", ``*.vgb``).

A unit holds a consistent snapshot of the database (APSW's online backup API, taken inside one
read transaction, so a live server keeps writing while it is copied) and every file of the
trees ``stack/``, ``secrets/``, ``tls/`` and ``server.yaml``, read from the *snapshot's*
``trees`` table so everything is from one instant. The trees are also inside the database; as
separate entries they are cross-checked against it by ``verify_backup`` and can be read out of a
unit without SQLite.

Layout (integers big-endian)::

    magic "VIGOBKUP" (8) | format u16 | header length u32 | header JSON | CRC-32 of all before (u32)
    manifest  sealed record
    entry 0 (state.db)       chunk 0 .. chunk n-1, each a sealed record
    entry 1 .. (trees)       the same, in manifest order; then end of file

    sealed record = ciphertext length u32 | nonce (12) | AES-256-GCM ciphertext + tag (16)

The header is plaintext and holds no secret: created_at, partition, the scrypt salt and
parameters, a random backup id and a key check (below). Its CRC tells a damaged header apart
from a wrong passphrase; the manifest authenticates the header byte for byte (it is the
manifest's associated data), so an edited header fails the manifest. The manifest (JSON) lists
every entry with its size and sha256, the chunk size, the vigo version and the database's page
count. Each chunk's associated data binds the backup id, the entry name, the chunk index and a
final-chunk flag: a chunk moved to another entry or position, or an entry cut short, does not
authenticate, and the error names the entry.

Entry names are not in plaintext: they exist only inside the encrypted manifest, and entries
follow it in manifest order. Names like ``secrets/values/db_password.sealed`` or a stack's file
names say what a fleet runs and which secrets it has; anyone who may read them holds the key
anyway, and ``list_backups`` needs only the header.

Keys. ``scrypt(passphrase, salt)`` gives a 32-byte key (``BackupKey``); the CLI derives it and
sends only the key, salt and parameters to the server, so a passphrase never leaves the
operator's machine. HKDF-SHA256 (salted with the backup id) turns that key into the AES key and
the key check, a public 16-byte value that says "wrong passphrase" without touching the
ciphertext. It gives an attacker nothing the manifest's tag would not: each guess still costs
one scrypt.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import apsw
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

import vigo
from vigo.crypto.aead import KEY_BYTES, NONCE_BYTES, TAG_BYTES, Sealer
from vigo.durable import replace_durably
from vigo.errors import (
    BackupCorruptError,
    BackupError,
    BackupFormatError,
    BackupKeyError,
    ConfigError,
    SecretError,
    VigoError,
)
from vigo.state.store import Store

MAGIC = b"VIGOBKUP"
FORMAT_VERSION = 1
SUFFIX = ".vgb"
_PREFIX = struct.Struct(">8sHI")  # magic, format, header length
_U32 = struct.Struct(">I")

#: Plaintext bytes per encrypted chunk: big enough that the 32 bytes of framing and tag per
#: chunk do not matter, small enough that reading one never needs much memory.
CHUNK_BYTES = 4 * 1024 * 1024
#: The largest chunk a reader accepts, bytes; a length field above it is corruption, not a
#: reason to allocate.
MAX_CHUNK_BYTES = 64 * 1024 * 1024
#: The largest plaintext header accepted, bytes (a real one is about 400).
MAX_HEADER_BYTES = 64 * 1024
#: The largest manifest accepted, bytes (about 200 bytes an entry; a stack is at most 64 MiB).
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
#: Database pages copied per online-backup step (8 MiB at 4 KiB pages): the progress grain.
SNAPSHOT_STEP_PAGES = 2048

SALT_BYTES = 16
BACKUP_ID_BYTES = 16
KEY_CHECK_BYTES = 16

#: scrypt cost for new backups: 128 MiB and about 0.4 s per derivation on a current CPU (the
#: OWASP recommendation for scrypt). Paid once per command on the operator's machine.
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
#: The weakest cost a new backup may use (tests use it to stay fast).
MIN_SCRYPT_N = 2**14
#: The largest scrypt memory (128 * n * r bytes) a header may ask a reader to spend, bytes: the
#: header is untrusted input until the key checks out.
MAX_SCRYPT_MEMORY_BYTES = 1024 * 1024 * 1024

DATABASE_ENTRY = "state.db"
#: Files of the data dir a restore replaces (with --force). The database's side files go with
#: it: an old WAL beside a new database would be replayed into it.
_STATE_FILES = ("state.db", "state.db-wal", "state.db-shm", "state.db-journal")
_TREE_DIRS = ("stack", "secrets", "tls")

_MANIFEST_AAD = b"vigo-backup/1/manifest\0"
_CHUNK_AAD = b"vigo-backup/1/chunk\0"

#: progress(phase, done, total): phase is a short word ("snapshot", "write", "read", "check",
#: "restore"); done and total are in the phase's unit (pages, bytes, files).
Progress = Callable[[str, int, int], None]


# Errors: BackupError (also: a non-empty restore target, an existing --out) with
# BackupFormatError(ValueError), BackupKeyError and BackupCorruptError, in vigo.errors.


# --- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackupKey:
    """The 32-byte key scrypt derives from a passphrase, with the salt and cost that made it."""

    key: bytes = field(repr=False)
    salt: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    @classmethod
    def from_passphrase(cls, passphrase: str | bytes, salt: bytes | None = None,
                        params: dict[str, Any] | None = None) -> BackupKey:
        """Derive from a passphrase; a new random salt unless one is given (to open a backup)."""
        secret = passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase)
        if not secret:
            raise ConfigError("the backup passphrase is empty")
        n, r, p = _scrypt_params(params or {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}, "scrypt parameters")
        salt = os.urandom(SALT_BYTES) if salt is None else bytes(salt)
        key = Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(secret)
        return cls(key, salt, n, r, p)

    @classmethod
    def from_key_file(cls, data: bytes, salt: bytes | None = None,
                      params: dict[str, Any] | None = None) -> BackupKey:
        """Derive from a key file's bytes (see ``key_file_secret``). A key file goes through
        scrypt like a passphrase, so one unit format serves both and a key file may hold a
        passphrase; for random bytes the cost is only wasted time, once."""
        return cls.from_passphrase(key_file_secret(data), salt, params)

    @classmethod
    def from_derived(cls, key: Any, salt: Any, kdf: Any) -> BackupKey:
        """A key derived elsewhere (the CLI), as it arrives over the admin channel: checked,
        because a weak or malformed one would make a backup nobody can open."""
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ConfigError(f"backup key must be {KEY_BYTES} bytes, got {_describe(key)}")
        if not isinstance(salt, bytes) or len(salt) != SALT_BYTES:
            raise ConfigError(f"backup key salt must be {SALT_BYTES} bytes, got {_describe(salt)}")
        if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
            raise ConfigError(f"backup key derivation must be {{'name': 'scrypt', 'n', 'r', 'p'}}, got {kdf!r:.120}")
        n, r, p = _scrypt_params(kdf, "backup key derivation")
        if n < MIN_SCRYPT_N:
            raise ConfigError(f"scrypt n={n} is too weak for a new backup (expected >= {MIN_SCRYPT_N})")
        return cls(key, salt, n, r, p)

    def kdf(self) -> dict[str, Any]:
        """The derivation as the header and the admin channel carry it (the salt separately)."""
        return {"name": "scrypt", "n": self.n, "r": self.r, "p": self.p}


def key_file_secret(data: bytes) -> bytes:
    """A key file's secret: its bytes, less one trailing newline (so ``echo`` and ``openssl rand
    -base64`` files work, and one holding the same text as VIGO_BACKUP_PASSPHRASE opens the same
    backup)."""
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise ConfigError("the backup key file is empty")
    return data


def _scrypt_params(raw: dict[str, Any], what: str) -> tuple[int, int, int]:
    values = []
    for name, low, high in (("n", 2, 2**24), ("r", 1, 64), ("p", 1, 16)):
        value = raw.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{what}: {name} must be a whole number in {low}..{high}, got {value!r:.40}")
        values.append(value)
    n, r, p = values
    if n & (n - 1):
        raise ConfigError(f"{what}: n must be a power of two, got {n}")
    if 128 * n * r > MAX_SCRYPT_MEMORY_BYTES:
        raise ConfigError(f"{what}: n={n}, r={r} need {128 * n * r // 2**20} MiB, "
                          f"more than the {MAX_SCRYPT_MEMORY_BYTES // 2**20} MiB allowed")
    return n, r, p


class _Keys:
    """The two keys HKDF makes from a BackupKey for one backup."""

    def __init__(self, key: bytes, backup_id: bytes) -> None:
        def derive(info: bytes, length: int) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=length, salt=backup_id, info=info).derive(key)

        self.aead = Sealer(derive(b"vigo-backup/1/aes-256-gcm", KEY_BYTES), what="backup key")
        self.check = derive(b"vigo-backup/1/key-check", KEY_CHECK_BYTES)


# --- create -------------------------------------------------------------------------------


def create_backup(conn: apsw.Connection, out: Path, key: BackupKey, *, partition: str,
                  progress: Progress | None = None, chunk_bytes: int = CHUNK_BYTES) -> dict[str, Any]:
    """Write a unit of the database behind ``conn`` (a live one is fine) to ``out``, atomically.

    The snapshot and the unit are built in a private temp folder beside ``out`` (same file
    system, so the final rename is atomic; the plaintext snapshot never leaves that 0700 folder
    and is deleted at the end)."""
    started = time.monotonic()
    out = Path(out)
    if not 1024 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ConfigError(f"backup chunk size must be 1024..{MAX_CHUNK_BYTES} bytes, got {chunk_bytes}")
    if out.exists():
        raise BackupError(f"cannot write backup {out}: it already exists (choose another name; "
                          "a backup is never overwritten)")
    if not out.parent.is_dir():
        raise BackupError(f"cannot write backup {out}: folder {out.parent} does not exist")
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    except OSError as exc:
        raise BackupError(f"cannot write backup {out}: cannot create a temp folder in {out.parent}: {exc}") from exc
    try:
        snapshot = work / "snapshot.db"
        created_at, db_info = _snapshot(conn, snapshot, progress)
        entries, trees = _snapshot_entries(snapshot, chunk_bytes)
        backup_id = os.urandom(BACKUP_ID_BYTES)
        keys = _Keys(key.key, backup_id)
        header = {
            "created_at": created_at,
            "partition": partition,
            "backup_id": backup_id.hex(),
            "kdf": {**key.kdf(), "salt": key.salt.hex()},
            "key_check": keys.check.hex(),
        }
        manifest = {
            "backup_id": backup_id.hex(), "created_at": created_at, "partition": partition,
            "vigo_version": vigo.__version__, "chunk_bytes": chunk_bytes, "database": db_info,
            "entries": entries,
        }
        unit = work / "unit.vgb"
        size = _write_unit(unit, header, manifest, keys, snapshot, trees, chunk_bytes, progress)
        try:
            replace_durably(unit, out)
        except OSError as exc:
            raise BackupError(f"cannot move the finished backup into place at {out}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"path": str(out), "size": size, "entries": len(entries), "created_at": created_at,
            "partition": partition, "backup_id": backup_id.hex(), "database_pages": db_info["page_count"],
            "seconds": round(time.monotonic() - started, 3)}


def _snapshot(conn: apsw.Connection, dest: Path, progress: Progress | None) -> tuple[float, dict[str, Any]]:
    """Copy the database into ``dest`` in steps, all inside one read transaction on ``conn``.

    The online backup API restarts whenever another connection writes between two steps, which
    on a busy server could go on for ever. Holding a read transaction across the steps pins one
    WAL snapshot instead: every step reads the same instant, writers are not blocked (WAL), and
    a checkpoint simply stops at our snapshot until it ends."""
    if conn.in_transaction:
        # Inside someone's transaction the copy could hold uncommitted changes, and ours
        # could not end it: the caller has a bug.
        raise BackupError("cannot take a database snapshot inside an open transaction")
    try:
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchall()  # opens the read transaction
            created_at = time.time()
            target = apsw.Connection(str(dest))
            try:
                with target.backup("main", conn, "main") as step:
                    while not step.done:
                        step.step(SNAPSHOT_STEP_PAGES)
                        if progress:
                            progress("snapshot", step.pagecount - step.remaining, step.pagecount)
                # A plain rollback-journal file: self-contained, no -wal beside it. The Store
                # turns WAL back on when a restore opens it.
                target.pragma("journal_mode", "delete")
                info = {"entry": DATABASE_ENTRY, "page_count": int(target.pragma("page_count")),
                        "page_size": int(target.pragma("page_size")),
                        "schema_version": int(target.pragma("user_version"))}
            finally:
                target.close()
        finally:
            conn.execute("COMMIT")  # a read transaction: nothing to commit, only ends it
    except apsw.Error as exc:
        raise BackupError(f"cannot take a snapshot of the database into {dest}: {exc}") from exc
    return created_at, info


def _snapshot_entries(snapshot: Path, chunk_bytes: int) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Manifest entries (database first, then every tree file) and the tree contents."""
    digest, size = hashlib.sha256(), 0
    with open(snapshot, "rb") as f:
        while block := f.read(chunk_bytes):
            digest.update(block)
            size += len(block)
    entries = [{"name": DATABASE_ENTRY, "size": size, "sha256": digest.hexdigest()}]
    contents = []
    for tree, path, content, mode in _tree_rows(snapshot):
        entries.append({"name": _entry_name(tree, path), "tree": tree, "path": path, "mode": mode,
                        "size": len(content), "sha256": hashlib.sha256(content).hexdigest()})
        contents.append(content)
    return entries, contents


def _tree_rows(db_path: Path) -> list[tuple[str, str, bytes, int]]:
    """The ``trees`` table of a snapshot, opened read-only."""
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return [(r[0], r[1], bytes(r[2]), int(r[3]))
                for r in conn.execute("SELECT tree, path, content, mode FROM trees ORDER BY tree, path")]
    finally:
        conn.close()


def _entry_name(tree: str, path: str) -> str:
    return "server.yaml" if tree == "server.yaml" else f"{tree}/{path}"


def _write_unit(unit: Path, header: dict[str, Any], manifest: dict[str, Any], keys: _Keys, snapshot: Path,
                trees: list[bytes], chunk_bytes: int, progress: Progress | None) -> int:
    header_raw = _header_bytes(header)
    total = sum(e["size"] for e in manifest["entries"])
    done = 0
    fd = os.open(unit, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(header_raw)
        _write_sealed(f, keys.aead, json.dumps(manifest, sort_keys=True).encode(),
                      _MANIFEST_AAD + hashlib.sha256(header_raw).digest())
        # Generators: the snapshot is read chunk by chunk, only when its turn comes.
        sources = [_file_chunks(snapshot, chunk_bytes), *(_bytes_chunks(c, chunk_bytes) for c in trees)]
        for entry, chunks in zip(manifest["entries"], sources, strict=True):
            count = _chunk_count(entry["size"], chunk_bytes)
            for index, chunk in enumerate(chunks):
                aad = _chunk_aad(bytes.fromhex(header["backup_id"]), entry["name"], index, index == count - 1)
                _write_sealed(f, keys.aead, chunk, aad)
                done += len(chunk)
                if progress:
                    progress("write", done, total)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _header_bytes(header: dict[str, Any]) -> bytes:
    body = json.dumps(header, sort_keys=True).encode()
    start = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    return start + _U32.pack(zlib.crc32(start))


def _write_sealed(f: BinaryIO, aead: Sealer, plaintext: bytes, aad: bytes) -> None:
    # A record is ciphertext length | nonce | ciphertext+tag; the sealer's blob is the last two.
    # Random nonces: about 50 records per GB, far below the 2**32 a key may safely seal.
    sealed = aead.seal(plaintext, aad)
    f.write(_U32.pack(len(sealed) - NONCE_BYTES))
    f.write(sealed)


def _chunk_aad(backup_id: bytes, name: str, index: int, final: bool) -> bytes:
    raw = name.encode()
    return _CHUNK_AAD + backup_id + struct.pack(">H", len(raw)) + raw + struct.pack(">IB", index, final)


def _chunk_count(size: int, chunk_bytes: int) -> int:
    return max(1, -(-size // chunk_bytes))  # an empty entry is one empty chunk: it still has a final flag


def _file_chunks(path: Path, chunk_bytes: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        block = f.read(chunk_bytes)
        yield block
        while block := f.read(chunk_bytes):
            yield block


def _bytes_chunks(data: bytes, chunk_bytes: int) -> Iterator[bytes]:
    yield data[:chunk_bytes]
    for start in range(chunk_bytes, len(data), chunk_bytes):
        yield data[start:start + chunk_bytes]


# --- read ---------------------------------------------------------------------------------


class _Reader:
    """Exact reads from a unit, with truncation reported as what was being read and where."""

    def __init__(self, f: BinaryIO, label: str, size: int) -> None:
        self.f, self.label, self.size, self.offset = f, label, size, 0

    def read(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise BackupCorruptError(
                f"backup {self.label} is truncated: {what} needs {n} bytes at byte {self.offset}, "
                f"but the file ends at byte {self.size}")
        self.offset += n
        return data

    def sealed(self, limit: int, what: str) -> tuple[int, bytes]:
        """One sealed record: (its offset, nonce + ciphertext as the sealer opens it)."""
        start = self.offset
        (length,) = _U32.unpack(self.read(_U32.size, what))
        if not TAG_BYTES <= length <= limit + TAG_BYTES:
            raise BackupCorruptError(
                f"backup {self.label}: {what} at byte {start} has a length field of {length} bytes, "
                f"expected {TAG_BYTES}..{limit + TAG_BYTES}: the file is corrupted")
        nonce = self.read(NONCE_BYTES, what)  # read apart so a truncation says which part is cut
        return start, nonce + self.read(length, what)


@dataclass
class _Opened:
    label: str
    header: dict[str, Any]
    manifest: dict[str, Any]
    keys: _Keys
    reader: _Reader


def read_header(f: BinaryIO, label: str, size: int) -> tuple[dict[str, Any], bytes]:
    """The plaintext header (checked: magic, format, CRC, fields) and its raw bytes."""
    reader = _Reader(f, label, size)
    head = f.read(_PREFIX.size)
    if head[:len(MAGIC)] != MAGIC[:len(head)] or not head:
        raise BackupFormatError(f"{label} is not a vigo backup (expected it to start with {MAGIC!r}, "
                                f"got {head[:len(MAGIC)]!r})")
    if len(head) < _PREFIX.size:
        raise BackupCorruptError(f"backup {label} is truncated: the header needs {_PREFIX.size} bytes, "
                                 f"the file has {size}")
    reader.offset = len(head)
    _, version, length = _PREFIX.unpack(head)
    if version != FORMAT_VERSION:
        raise BackupFormatError(f"backup {label} is format version {version}; this vigo "
                                f"({vigo.__version__}) reads version {FORMAT_VERSION} (newer vigo, or a damaged file)")
    if length > MAX_HEADER_BYTES:
        raise BackupCorruptError(f"backup {label}: header length field says {length} bytes, "
                                 f"expected at most {MAX_HEADER_BYTES}: the header is damaged")
    body = reader.read(length, "the header")
    (crc,) = _U32.unpack(reader.read(_U32.size, "the header checksum"))
    if crc != zlib.crc32(head + body):
        raise BackupCorruptError(f"backup {label}: the plaintext header fails its CRC-32 check: "
                                 "the header is damaged (this is not a wrong passphrase)")
    try:
        header = json.loads(body)
        header["kdf"]["salt"] = bytes.fromhex(header["kdf"]["salt"])
        lengths = {"backup_id": BACKUP_ID_BYTES, "key_check": KEY_CHECK_BYTES}
        for name, want in lengths.items():
            if len(bytes.fromhex(header[name])) != want:
                raise ValueError(f"{name} must be {want} bytes")
        if not isinstance(header["created_at"], int | float) or not isinstance(header["partition"], str):
            raise TypeError("created_at must be a number and partition text")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        # The CRC matched, so these bytes were written like this: a writer bug, not damage.
        raise BackupFormatError(f"backup {label}: the header does not hold the fields format "
                                f"{FORMAT_VERSION} needs ({type(exc).__name__}: {exc})") from exc
    header["format"] = version
    return header, head + body + _U32.pack(crc)


def _open(f: BinaryIO, label: str, size: int, secret: str | bytes | BackupKey) -> _Opened:
    """Header, key check and manifest: everything before the first entry."""
    header, header_raw = read_header(f, label, size)
    reader = _Reader(f, label, size)
    reader.offset = len(header_raw)
    kdf = header["kdf"]
    try:
        # Checked before deriving: the header is untrusted until the key check passes, and
        # its cost parameters decide how much memory scrypt takes.
        _scrypt_params(kdf, "scrypt parameters")
    except ConfigError as exc:
        raise BackupCorruptError(f"backup {label}: the header's key derivation cannot be used: {exc}") from exc
    key = secret if isinstance(secret, BackupKey) else BackupKey.from_passphrase(secret, kdf["salt"], kdf)
    keys = _Keys(key.key, bytes.fromhex(header["backup_id"]))
    if not hmac.compare_digest(keys.check, bytes.fromhex(header["key_check"])):
        hint = ""
        if isinstance(secret, BackupKey) and secret.salt != kdf["salt"]:
            hint = "; the key given was derived with another salt, give the passphrase instead"
        raise BackupKeyError(f"wrong passphrase or key for backup {label} (its key check does not "
                             f"match, so the manifest does not authenticate{hint})")
    offset, sealed = reader.sealed(MAX_MANIFEST_BYTES, "the manifest")
    try:
        raw = keys.aead.open(sealed, _MANIFEST_AAD + hashlib.sha256(header_raw).digest())
    except SecretError as exc:
        raise BackupCorruptError(
            f"backup {label}: the manifest (at byte {offset}) failed authentication although the key is "
            "right: the file is corrupted or was tampered with (an edited header shows up here too)") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:  # authenticated, so written like this: a writer bug, not damage
        raise BackupFormatError(f"backup {label}: the manifest authenticates but is not JSON: {exc}") from exc
    _check_manifest(manifest, header, label)
    return _Opened(label, header, manifest, keys, reader)


def _check_manifest(manifest: dict[str, Any], header: dict[str, Any], label: str) -> None:
    """An authenticated manifest came from a vigo writer; this catches writers that disagree."""
    problems = []
    for name in ("backup_id", "created_at", "partition"):
        if manifest.get(name) != header[name]:
            problems.append(f"{name} is {manifest.get(name)!r} in the manifest, {header[name]!r} in the header")
    entries = manifest.get("entries") or []
    if not entries or entries[0].get("name") != DATABASE_ENTRY:
        problems.append(f"the first entry must be {DATABASE_ENTRY}")
    names = [e.get("name") for e in entries]
    if len(set(names)) != len(names):
        problems.append("entry names repeat")
    if not all(isinstance(e.get("name"), str) and isinstance(e.get("size"), int) and e["size"] >= 0
               and isinstance(e.get("sha256"), str) for e in entries):
        problems.append("every entry needs a name, a size and a sha256")
    chunk = manifest.get("chunk_bytes")
    if not isinstance(chunk, int) or not 1 <= chunk <= MAX_CHUNK_BYTES:
        problems.append(f"chunk_bytes {chunk!r} is outside 1..{MAX_CHUNK_BYTES}")
    if problems:
        raise BackupFormatError(f"backup {label}: the manifest is inconsistent: {'; '.join(problems)}")


def _read_entry(opened: _Opened, entry: dict[str, Any], sink: Callable[[bytes], None],
                on_bytes: Callable[[int], None]) -> None:
    """Decrypt one entry chunk by chunk into ``sink``; check its size and sha256."""
    name, size = entry["name"], int(entry["size"])
    chunk_bytes = opened.manifest["chunk_bytes"]
    backup_id = bytes.fromhex(opened.header["backup_id"])
    count = _chunk_count(size, chunk_bytes)
    digest, got = hashlib.sha256(), 0
    for index in range(count):
        final = index == count - 1
        what = f"entry {name} (chunk {index + 1} of {count})"
        expected = size - index * chunk_bytes if final else chunk_bytes
        offset, sealed = opened.reader.sealed(chunk_bytes, what)
        held = len(sealed) - NONCE_BYTES - TAG_BYTES
        if held != expected:
            raise BackupCorruptError(
                f"backup {opened.label}: {what} at byte {offset} holds {held} bytes, the "
                f"manifest says {expected}: the file is corrupted or was tampered with")
        try:
            plain = opened.keys.aead.open(sealed, _chunk_aad(backup_id, name, index, final))
        except SecretError as exc:
            raise BackupCorruptError(
                f"backup entry {name} failed authentication: the file is corrupted or was tampered with "
                f"(chunk {index + 1} of {count} at byte {offset} of {opened.label})") from exc
        digest.update(plain)
        got += len(plain)
        sink(plain)
        on_bytes(len(sealed) + _U32.size)
    if got != size or digest.hexdigest() != entry["sha256"]:
        raise BackupCorruptError(
            f"backup entry {name}: decrypted {got} bytes with sha256 {digest.hexdigest()[:16]}..., the "
            f"manifest says {size} bytes with sha256 {entry['sha256'][:16]}...")


def _verify_into(path: Path, label: str, secret: str | bytes | BackupKey, work: Path,
                 progress: Progress | None) -> dict[str, Any]:
    """Decrypt and check everything; leaves the database snapshot at ``work/state.db``."""
    started = time.monotonic()
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below; the reader needs it open throughout)
    except OSError as exc:
        raise BackupError(f"cannot read backup {label}: {exc}") from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        opened = _open(f, label, size, secret)
        done = [opened.reader.offset]

        def advance(n: int) -> None:
            done[0] += n
            if progress:
                progress("read", done[0], size)

        db_path = work / DATABASE_ENTRY
        fd = os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as db_file:
            _read_entry(opened, opened.manifest["entries"][0], db_file.write, advance)
            db_file.flush()
            os.fsync(db_file.fileno())
        trees: dict[str, bytes] = {}
        for entry in opened.manifest["entries"][1:]:
            parts: list[bytes] = []
            _read_entry(opened, entry, parts.append, advance)
            trees[entry["name"]] = b"".join(parts)
        trailing = size - opened.reader.offset
        if trailing:
            raise BackupCorruptError(f"backup {label}: {trailing} unexpected bytes after the last entry "
                                     f"(from byte {opened.reader.offset}): the file was altered or appended to")
    if progress:
        progress("check", 0, 1)
    tables = _check_database(db_path, opened, trees)
    if progress:
        progress("check", 1, 1)
    manifest = opened.manifest
    return {
        "path": label, "format": opened.header["format"], "partition": manifest["partition"],
        "created_at": manifest["created_at"], "backup_id": manifest["backup_id"],
        "vigo_version": manifest["vigo_version"], "size": size,
        "entry_count": len(manifest["entries"]),
        "entries": [{"name": e["name"], "size": e["size"]} for e in manifest["entries"]],
        "database": {**manifest["database"], "integrity": "ok", "tables": tables},
        "seconds": round(time.monotonic() - started, 3),
    }


def _check_database(db_path: Path, opened: _Opened, trees: dict[str, bytes]) -> dict[str, int]:
    """integrity_check, the page count, and the trees rows against the tree entries."""
    label, expected = opened.label, opened.manifest["database"]
    by_name = {e["name"]: e for e in opened.manifest["entries"][1:]}
    try:
        # Read-write on purpose: on a read-only connection integrity_check skips CHECK
        # constraints. The file is our private copy and nothing here writes to it.
        conn = apsw.Connection(str(db_path))
    except apsw.Error as exc:
        raise BackupCorruptError(f"backup {label}: the database snapshot does not open: {exc}") from exc
    try:
        try:
            problems = [str(r[0]) for r in conn.execute("PRAGMA integrity_check(20)")]
            pages = int(conn.pragma("page_count"))
        except apsw.Error as exc:
            raise BackupCorruptError(f"backup {label}: the database snapshot cannot be read: {exc}") from exc
        if problems != ["ok"]:
            raise BackupCorruptError(f"backup {label}: the database snapshot fails PRAGMA integrity_check "
                                     f"(expected 'ok'): {'; '.join(problems[:5])}")
        if pages != expected["page_count"]:
            raise BackupCorruptError(f"backup {label}: the database snapshot has {pages} pages, "
                                     f"the manifest says {expected['page_count']}")
        tables = {name: conn.execute(f'SELECT COUNT(*) FROM "{name.replace(chr(34), chr(34) * 2)}"').fetchall()[0][0]
                  for (name,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table' "
                                              "AND name NOT LIKE 'sqlite_%' ORDER BY name")}
        rows = [(r[0], r[1], bytes(r[2]), int(r[3]))
                for r in conn.execute("SELECT tree, path, content, mode FROM trees ORDER BY tree, path")]
    finally:
        conn.close()
    in_db = set()
    for tree, path, content, mode in rows:
        name = _entry_name(tree, path)
        in_db.add(name)
        if name not in trees:
            raise BackupCorruptError(f"backup {label}: the database's trees row {name} has no entry in the unit")
        if trees[name] != content:
            raise BackupCorruptError(
                f"backup entry {name} differs from the database's trees row (sha256 "
                f"{hashlib.sha256(trees[name]).hexdigest()[:16]}... in the unit, "
                f"{hashlib.sha256(content).hexdigest()[:16]}... in the database)")
        if by_name[name].get("mode") != mode:
            raise BackupCorruptError(f"backup entry {name} has mode {by_name[name].get('mode')!r} in the "
                                     f"manifest, {oct(mode)} in the database")
    extra = sorted(set(trees) - in_db)
    if extra:
        raise BackupCorruptError(f"backup {label}: entries {', '.join(extra[:5])} are not rows of the "
                                 "database's trees table")
    return tables


def verify_backup(path: Path | str, passphrase_or_key: str | bytes | BackupKey,
                  progress: Progress | None = None, *, endpoint_url: str | None = None) -> dict[str, Any]:
    """Decrypt every entry, check every sha256, run integrity_check on the database snapshot and
    compare the tree entries with its ``trees`` rows. Raises a BackupError naming what failed.

    The snapshot is decrypted into a private (0700) temp folder and deleted afterwards: it holds
    the secrets in the clear while it exists."""
    with _local(path, progress=progress, endpoint_url=endpoint_url) as (local, label), \
            tempfile.TemporaryDirectory(prefix="vigo-verify-") as work:
        return _verify_into(local, label, passphrase_or_key, Path(work), progress)


# --- restore ------------------------------------------------------------------------------


def restore_backup(path: Path | str, key: str | bytes | BackupKey, data_dir: Path | str, *,
                   force: bool = False, progress: Progress | None = None,
                   endpoint_url: str | None = None) -> dict[str, Any]:
    """Verify the unit, then make ``data_dir`` hold its state: state.db (atomically) and the
    trees materialised from it. Refuses a non-empty ``data_dir`` unless ``force``; with force it
    replaces the database (and its -wal/-shm) and the trees, and reports what else it left.

    Nothing but the database and the trees is restored: a restored server starts a fresh archive
    generation and has no standbys until they are added again. Stop the server first."""
    started = time.monotonic()
    data_dir = Path(data_dir).resolve()
    if data_dir.exists() and not data_dir.is_dir():
        raise BackupError(f"cannot restore into {data_dir}: it is a file, expected a folder")
    existing = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    if existing and not force:
        shown = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
        raise BackupError(f"refusing to restore into {data_dir}: it is not empty (holds {shown}); "
                          "restore into a new folder, or pass --force to replace its state")
    created = not data_dir.exists()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Work inside the data dir: the same file system, so the database arrives by one rename,
    # and the plaintext snapshot never sits anywhere the restored secrets will not.
    work = Path(tempfile.mkdtemp(prefix=".vigo-restore-", dir=data_dir))
    try:
        with _local(path, work, progress, endpoint_url) as (local, label):
            result = _verify_into(local, label, key, work, progress)
        # The old database's side files go first (an old WAL would be replayed into the new
        # database), then one rename swaps the database, then the old trees go; from here on a
        # crash leaves the restored database in place and a start materialises its trees.
        target = data_dir / DATABASE_ENTRY
        try:
            removed = _remove(data_dir, _STATE_FILES[1:]) + ([DATABASE_ENTRY] if target.exists() else [])
            replace_durably(work / DATABASE_ENTRY, target)
            removed += _remove(data_dir, (*_TREE_DIRS, "server.yaml"))
        except OSError as exc:
            raise BackupError(f"cannot put the restored database in place at {target}: {exc}") from exc
        if progress:
            progress("restore", 0, 1)
        store = Store(data_dir)  # the server's store: its migration and WAL setup apply
        try:
            written = store.materialise_trees()
        finally:
            store.close()
        if progress:
            progress("restore", 1, 1)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        if created:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    # What was there before and is not state we replace (the Store may have added its own
    # files since, like the stream's folder: those are not the operator's).
    kept = sorted(set(existing) - {*_STATE_FILES, *_TREE_DIRS, "server.yaml"})
    return {"data_dir": str(data_dir), "path": result["path"], "partition": result["partition"],
            "created_at": result["created_at"], "backup_id": result["backup_id"],
            "database_bytes": result["entries"][0]["size"], "tree_files": written,
            "replaced": sorted(removed), "kept": kept, "seconds": round(time.monotonic() - started, 3)}


def _remove(data_dir: Path, names: tuple[str, ...]) -> list[str]:
    """Remove these files or folders of the data dir; the names of those that existed."""
    removed = []
    for name in names:
        target = data_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            continue
        removed.append(name)
    return removed


# --- list ---------------------------------------------------------------------------------


def list_backups(location: Path | str, progress: Progress | None = None, *,
                 endpoint_url: str | None = None) -> list[dict[str, Any]]:
    """Units in a folder (or under a file:// or s3:// prefix) with their plaintext header facts,
    newest first. A file that looks like a unit but cannot be read is listed with ``error``; a
    file that is neither named ``*.vgb`` nor starts with the magic is not a backup and skipped.
    Header facts are not authenticated until ``verify_backup``."""
    if _is_url(location):
        found = _list_target(str(location), progress, endpoint_url)
    else:
        folder = Path(location)
        if not folder.exists():
            raise BackupError(f"cannot list backups in {folder}: it does not exist")
        files = [folder] if folder.is_file() else sorted(
            p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        found = []
        for i, file in enumerate(files):
            item = _list_file(file)
            if item is not None:
                found.append(item)
            if progress:
                progress("list", i + 1, len(files))
    return sorted(found, key=lambda b: (b.get("error") is None, b.get("created_at") or 0), reverse=True)


def _list_file(file: Path) -> dict[str, Any] | None:
    item: dict[str, Any] = {"name": file.name, "location": str(file), "size": None,
                            "created_at": None, "partition": None, "format": None, "error": None}
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            item["size"] = size
            if f.read(len(MAGIC)) != MAGIC and file.suffix != SUFFIX:
                return None
            f.seek(0)
            header, _ = read_header(f, str(file), size)
    except (OSError, BackupError) as exc:
        item["error"] = str(exc)
        return item
    item.update(created_at=header["created_at"], partition=header["partition"], format=header["format"])
    return item


# --- targets (file:// and s3:// URLs) -----------------------------------------------------

# Object metadata a unit carries in an archive target, so `list` needs no download.
_META = ("vigo-backup-format", "created-at", "partition")


def _is_url(location: Path | str) -> bool:
    return isinstance(location, str) and location.startswith(("file://", "s3://"))


def _split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/dir/x.vgb`` -> (``s3://bucket/dir``, ``x.vgb``)."""
    base, _, key = url.rstrip("/").rpartition("/")
    if not key or base.endswith(":/") or "://" not in base:
        raise ConfigError(f"backup URL {url!r} must name an object, like s3://bucket/backups/p0.vgb")
    return base, key


def _open_target(url: str, endpoint_url: str | None) -> Any:
    """The archive target for a URL; ``endpoint_url`` (an S3-compatible service) for s3:// only.
    Imported here: boto3 loads only when a URL asks for it."""
    from vigo.snapshots.targets import open_target

    return open_target(url, endpoint_url=endpoint_url or None) if url.startswith("s3://") else open_target(url)


@contextlib.contextmanager
def _local(location: Path | str, work: Path | None = None, progress: Progress | None = None,
           endpoint_url: str | None = None) -> Iterator[tuple[Path, str]]:
    """A local path for a backup location, downloading a URL into ``work`` (or a temp folder)."""
    if not _is_url(location):
        yield Path(location), str(location)
        return
    base, key = _split_url(str(location))
    with contextlib.ExitStack() as stack:
        folder = work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vigo-backup-")))
        local = folder / "download.vgb"
        report = (lambda done, total: progress("download", done, total)) if progress else None
        _open_target(base, endpoint_url).get_file(key, local, report)
        yield local, str(location)


def _list_target(url: str, progress: Progress | None, endpoint_url: str | None) -> list[dict[str, Any]]:
    """Objects named ``*.vgb`` under the URL. Listings carry no metadata, so each one is
    ``head``-ed for the header facts ``create_backup_at`` stored with it."""
    base = url.rstrip("/")
    target = _open_target(base, endpoint_url)
    objects = [o for o in target.list("") if o.key.endswith(SUFFIX)]
    found = []
    for i, obj in enumerate(objects):
        item: dict[str, Any] = {"name": obj.key.rpartition("/")[2], "location": f"{base}/{obj.key}",
                                "size": obj.size, "created_at": None, "partition": None, "format": None,
                                "error": None}
        try:
            info = target.head(obj.key)
            meta = dict(info.metadata) if info is not None else {}
            item.update(created_at=float(meta["created-at"]), partition=meta["partition"],
                        format=int(meta["vigo-backup-format"]))
        except VigoError as exc:
            item["error"] = str(exc)
        except (KeyError, ValueError) as exc:
            item["error"] = (f"no vigo backup metadata on this object (missing or bad {exc}); "
                             "`vigocli backup verify` reads the unit itself")
        found.append(item)
        if progress:
            progress("list", i + 1, len(objects))
    return found


def create_backup_at(conn: apsw.Connection, out: str, key: BackupKey, *, partition: str,
                     work_dir: Path, endpoint_url: str | None = None) -> dict[str, Any]:
    """``create_backup`` to a path or URL (the server's ``backup.create``). A URL's unit is
    written to a temp folder in ``work_dir`` (the data dir: room for the database is known to
    be there), uploaded with the object metadata ``list_backups`` reads, and deleted."""
    if not _is_url(out):
        path = Path(out)
        if not path.is_absolute():
            raise ConfigError(f"backup --out must be an absolute path on the server host, got {out!r}")
        if path.is_dir():
            path = path / default_name(partition)
        return create_backup(conn, path, key, partition=partition)
    url = out.rstrip("/") + "/" + default_name(partition) if out.endswith("/") else out
    base, name = _split_url(url)
    target = _open_target(base, endpoint_url)
    if target.head(name) is not None:
        raise BackupError(f"cannot write backup {url}: it already exists (choose another name; "
                          "a backup is never overwritten)")
    with tempfile.TemporaryDirectory(prefix=".backup-upload-", dir=work_dir) as tmp:
        local = Path(tmp) / name
        result = create_backup(conn, local, key, partition=partition)
        started = time.monotonic()
        metadata = dict(zip(_META, (str(FORMAT_VERSION), repr(result["created_at"]), partition), strict=True))
        target.put_file(name, local, metadata)
        upload_s = time.monotonic() - started
    return {**result, "path": url, "seconds": round(result["seconds"] + upload_s, 3)}


def default_name(partition: str) -> str:
    """``vigo-p0-20250101T120000Z.vgb``: sorts by time, says what it holds."""
    return f"vigo-{partition}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}{SUFFIX}"


def _describe(value: Any) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return type(value).__name__
