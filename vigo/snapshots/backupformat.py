"""The backup unit's file format (``*.vgb``): framing, one sealed record per chunk, keys,
manifest, and reading a unit back. What a unit holds and the operations on units (create from a
live server, list, verify, restore, file:// and s3:// locations) are vigo/snapshots/backup.py.

A unit holds a consistent snapshot of the database and every file of the trees ``stack/``,
``secrets/``, ``tls/`` and ``server.yaml``, each one *entry*: the database first, then the tree
files, named as ``entry_name`` says.

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

import hashlib
import hmac
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

import vigo
from vigo.crypto.aead import KEY_BYTES, NONCE_BYTES, TAG_BYTES, Sealer
from vigo.errors import (
    BackupCorruptError,
    BackupError,
    BackupFormatError,
    BackupKeyError,
    ConfigError,
    SecretError,
)

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


class UnitKeys:
    """The two keys HKDF makes from a BackupKey for one backup: the AEAD and the key check."""

    def __init__(self, key: bytes, backup_id: bytes) -> None:
        def derive(info: bytes, length: int) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=length, salt=backup_id, info=info).derive(key)

        self.aead = Sealer(derive(b"vigo-backup/1/aes-256-gcm", KEY_BYTES), what="backup key")
        self.check = derive(b"vigo-backup/1/key-check", KEY_CHECK_BYTES)


# --- write --------------------------------------------------------------------------------


def new_unit(key: BackupKey, *, created_at: float, partition: str, chunk_bytes: int, database: dict[str, Any],
             entries: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any], UnitKeys]:
    """The header, the manifest and the keys of a new unit, under a fresh random backup id."""
    backup_id = os.urandom(BACKUP_ID_BYTES)
    keys = UnitKeys(key.key, backup_id)
    header = {
        "created_at": created_at,
        "partition": partition,
        "backup_id": backup_id.hex(),
        "kdf": {**key.kdf(), "salt": key.salt.hex()},
        "key_check": keys.check.hex(),
    }
    manifest = {
        "backup_id": backup_id.hex(), "created_at": created_at, "partition": partition,
        "vigo_version": vigo.__version__, "chunk_bytes": chunk_bytes, "database": database,
        "entries": entries,
    }
    return header, manifest, keys


def entry_name(tree: str, path: str) -> str:
    """The manifest's name for a ``trees`` row: ``server.yaml``, or ``<tree>/<path>``."""
    return "server.yaml" if tree == "server.yaml" else f"{tree}/{path}"


def write_unit(unit: Path, header: dict[str, Any], manifest: dict[str, Any], keys: UnitKeys, snapshot: Path,
               trees: list[bytes], chunk_bytes: int, progress: Progress | None) -> int:
    """Write a new unit file (0600, never over an existing one) and fsync it; returns its size.
    The database entry is read from ``snapshot`` chunk by chunk, the tree entries are ``trees``
    in manifest order."""
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
class Opened:
    """A unit read up to its first entry: the header, the manifest, the keys, the reader."""

    label: str
    header: dict[str, Any]
    manifest: dict[str, Any]
    keys: UnitKeys
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


def open_unit(f: BinaryIO, label: str, size: int, secret: str | bytes | BackupKey) -> Opened:
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
    keys = UnitKeys(key.key, bytes.fromhex(header["backup_id"]))
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
    return Opened(label, header, manifest, keys, reader)


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


def read_entry(opened: Opened, entry: dict[str, Any], sink: Callable[[bytes], None],
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


def decrypt_unit(path: Path, label: str, secret: str | bytes | BackupKey, db_path: Path,
                 progress: Progress | None) -> tuple[Opened, dict[str, bytes], int]:
    """Decrypt a whole unit, checking every chunk and every entry's size and sha256: the database
    entry into ``db_path`` (created 0600, fsynced), the tree entries into memory. Returns the
    opened unit, the tree entries by name and the unit's size."""
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below; the reader needs it open throughout)
    except OSError as exc:
        raise BackupError(f"cannot read backup {label}: {exc}") from exc
    with f:
        size = os.fstat(f.fileno()).st_size
        opened = open_unit(f, label, size, secret)
        done = [opened.reader.offset]

        def advance(n: int) -> None:
            done[0] += n
            if progress:
                progress("read", done[0], size)

        fd = os.open(db_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as db_file:
            read_entry(opened, opened.manifest["entries"][0], db_file.write, advance)
            db_file.flush()
            os.fsync(db_file.fileno())
        trees: dict[str, bytes] = {}
        for entry in opened.manifest["entries"][1:]:
            parts: list[bytes] = []
            read_entry(opened, entry, parts.append, advance)
            trees[entry["name"]] = b"".join(parts)
        trailing = size - opened.reader.offset
        if trailing:
            raise BackupCorruptError(f"backup {label}: {trailing} unexpected bytes after the last entry "
                                     f"(from byte {opened.reader.offset}): the file was altered or appended to")
    return opened, trees, size


def _describe(value: Any) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return type(value).__name__
