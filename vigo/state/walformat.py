"""SQLite's write-ahead log, read byte by byte: the header, the frames and the checksum chain.

Layout (https://www.sqlite.org/fileformat2.html#walformat):

    header  32 bytes: magic, version, page size, checkpoint seq, salt-1, salt-2, checksum-1, -2
    frame   24-byte header (page number, db size in pages on a commit frame else 0, the two
            salts, the cumulative checksum) + one page image

A frame counts only if its salts match the header and its checksum continues the chain; a
transaction is in the log once its commit frame (db size != 0) is written. Everything here is
pure: no file is opened, so the sealer, the standby's applier and restore share one reader.

The checksum is two running 32-bit sums over 32-bit words (native byte order of the writer,
told by the magic). Per word pair (a, b): s1 += a + s2; s2 += b + s1. That is the linear
recurrence s_k = M s_(k-1) + (a_k, a_k + b_k) with M = [[1, 1], [1, 2]], so one frame's
contribution is a dot product with precomputed powers of M, and numpy checks a whole segment
at the speed of memory instead of a Python loop per word. Arithmetic wraps modulo 2**64 in
uint64, which is exact modulo 2**32.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vigo.errors import WalFormatError

WAL_HEADER_BYTES = 32
FRAME_HEADER_BYTES = 24
MAGIC_LE = 0x377F0682
MAGIC_BE = 0x377F0683
WAL_FORMAT_VERSION = 3007000
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class WalHeader:
    magic: int
    page_size: int
    checkpoint_seq: int
    salts: tuple[int, int]
    checksum: tuple[int, int]

    @property
    def big_endian(self) -> bool:
        return self.magic == MAGIC_BE

    @property
    def frame_bytes(self) -> int:
        return FRAME_HEADER_BYTES + self.page_size

    def to_bytes(self) -> bytes:
        return struct.pack(">8I", self.magic, WAL_FORMAT_VERSION, self.page_size, self.checkpoint_seq,
                           *self.salts, *self.checksum)


def parse_header(data: bytes) -> WalHeader:
    """The WAL header at the start of ``data``, with its own checksum verified."""
    if len(data) < WAL_HEADER_BYTES:
        raise WalFormatError(f"WAL header needs {WAL_HEADER_BYTES} bytes, got {len(data)}")
    magic, version, page_size, seq, salt1, salt2, c1, c2 = struct.unpack_from(">8I", data)
    if magic not in (MAGIC_LE, MAGIC_BE):
        raise WalFormatError(f"not a WAL header: magic {magic:#010x}, expected {MAGIC_LE:#x} or {MAGIC_BE:#x}")
    if version != WAL_FORMAT_VERSION:
        raise WalFormatError(f"WAL format version {version}, expected {WAL_FORMAT_VERSION}")
    if page_size == 1:
        page_size = 65536  # the file format stores 65536 as 1
    if page_size < 512 or page_size > 65536 or page_size & (page_size - 1):
        raise WalFormatError(f"WAL page size {page_size} is not a power of two between 512 and 65536")
    header = WalHeader(magic, page_size, seq, (salt1, salt2), (c1, c2))
    expected = checksum(data[:24], (0, 0), header.big_endian)
    if expected != (c1, c2):
        raise WalFormatError(f"WAL header checksum {c1:#x}/{c2:#x} does not match its bytes ({expected[0]:#x}/{expected[1]:#x})")
    return header


# --- the checksum -------------------------------------------------------------------------

def _words(data: bytes | memoryview | np.ndarray, big_endian: bool) -> np.ndarray:
    return np.frombuffer(data, dtype=">u4" if big_endian else "<u4")


@lru_cache(maxsize=8)
def _powers(pairs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """Rows of M**(pairs-1) ... M**0 (so row k weighs pair k), and M**pairs itself, mod 2**32."""
    p11 = np.empty(pairs, dtype=np.uint64)
    p12 = np.empty(pairs, dtype=np.uint64)
    p21 = np.empty(pairs, dtype=np.uint64)
    p22 = np.empty(pairs, dtype=np.uint64)
    m = (1, 0, 0, 1)
    for j in range(pairs):  # M**j lands at position pairs-1-j
        k = pairs - 1 - j
        p11[k], p12[k], p21[k], p22[k] = m
        m = _matmul(m, (1, 1, 1, 2))
    return p11, p12, p21, p22, m


def _matmul(x: tuple[int, int, int, int], y: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    a, b, c, d = x
    e, f, g, h = y
    return ((a * e + b * g) & _MASK32, (a * f + b * h) & _MASK32, (c * e + d * g) & _MASK32, (c * f + d * h) & _MASK32)


def _contributions(words: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """For rows of words (F x 2n), each row's checksum from a zero start, and M**n."""
    a = words[:, 0::2].astype(np.uint64)
    s = a + words[:, 1::2].astype(np.uint64)
    p11, p12, p21, p22, mn = _powers(a.shape[1])
    with np.errstate(over="ignore"):
        c1 = (a @ p11 + s @ p12) & _MASK32
        c2 = (a @ p21 + s @ p22) & _MASK32
    return c1, c2, mn


def _advance(state: tuple[int, int], mn: tuple[int, int, int, int], c: tuple[int, int]) -> tuple[int, int]:
    s1, s2 = state
    return ((mn[0] * s1 + mn[1] * s2 + c[0]) & _MASK32, (mn[2] * s1 + mn[3] * s2 + c[1]) & _MASK32)


def checksum(data: bytes, start: tuple[int, int], big_endian: bool) -> tuple[int, int]:
    """SQLite's checksum of ``data`` (a multiple of 8 bytes) continuing from ``start``."""
    if len(data) % 8:
        raise WalFormatError(f"checksummed data must be a multiple of 8 bytes, got {len(data)}")
    if not data:
        return start
    c1, c2, mn = _contributions(_words(data, big_endian).reshape(1, -1))
    return _advance(start, mn, (int(c1[0]), int(c2[0])))


# --- frames -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Commit:
    end: int  # WAL offset just past the commit frame
    db_pages: int  # database size in pages after this transaction


@dataclass(frozen=True)
class Scan:
    """What a run of frames holds, up to its last valid commit frame."""

    commit_end: int  # WAL offset past the last valid commit frame (== start if none)
    checksum: tuple[int, int]  # the chain's value at commit_end
    commits: tuple[Commit, ...]
    stopped: str  # why scanning stopped: "end", "partial", "salt", "checksum"
    pages: tuple[tuple[int, int], ...] = ()  # (page number, frame offset) up to commit_end


def scan_frames(data: bytes | memoryview, start: int, header: WalHeader, chain: tuple[int, int]) -> Scan:
    """Validate the frames in ``data`` (which begins at WAL offset ``start``, on a frame
    boundary), continuing the checksum ``chain``. Stops at the first frame with wrong salts or
    a broken checksum (what SQLite's recovery does) and reports everything up to the last
    commit frame before it. Frames after the last commit are an unfinished transaction."""
    fb = header.frame_bytes
    count = len(data) // fb
    stopped = "end" if len(data) % fb == 0 else "partial"
    commits: list[Commit] = []
    pages: list[tuple[int, int]] = []
    commit_end, commit_chain, commit_pages = start, chain, 0
    if count == 0:
        return Scan(start, chain, (), stopped)
    raw = np.frombuffer(data, dtype=np.uint8, count=count * fb).reshape(count, fb)
    heads = raw[:, :FRAME_HEADER_BYTES].copy().view(">u4").reshape(count, 6)  # header fields are big-endian
    body = np.concatenate((raw[:, :8], raw[:, FRAME_HEADER_BYTES:]), axis=1)
    words = body.view(">u4" if header.big_endian else "<u4")
    c1, c2, mn = _contributions(words)
    state = chain
    salt1, salt2 = header.salts
    for i in range(count):
        pgno, db_pages, f_salt1, f_salt2, f_c1, f_c2 = (int(x) for x in heads[i])
        if (f_salt1, f_salt2) != (salt1, salt2) or pgno == 0:
            stopped = "salt"
            break
        state = _advance(state, mn, (int(c1[i]), int(c2[i])))
        if state != (f_c1, f_c2):
            stopped = "checksum"
            break
        pages.append((pgno, start + i * fb))
        if db_pages:
            commit_end, commit_chain, commit_pages = start + (i + 1) * fb, state, len(pages)
            commits.append(Commit(commit_end, db_pages))
    return Scan(commit_end, commit_chain, tuple(commits), stopped, tuple(pages[:commit_pages]))


def frame_checksum_at(data: bytes, offset_in_data: int) -> tuple[int, int]:
    """The cumulative checksum stored in the frame header at ``offset_in_data``."""
    return struct.unpack_from(">II", data, offset_in_data + 16)
