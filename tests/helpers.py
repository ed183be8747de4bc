"""Shared test helpers: stacks on disk, signed bundles, the real CLIs, raw LMDB access.

Everything here uses the real code paths (load_stack, bundle.build, the installed console
scripts); nothing is mocked.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vigo.policy import bundle as bundle_mod
from vigo.policy.bundle import Bundle
from vigo.policy.stack import load_stack

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_STACK = REPO / "examples" / "stack"
#: The value of the example stack's ``api_token``: distinctive, so a scan cannot match by chance.
SECRET = "vigo-test-SECRET-9f3c2a71e4b8d605"
BIN = Path(sys.executable).parent
#: Names of the LMDB databases in STATE_DIR/cache (see vigo/agent/cache.py).
CACHE_DBS = ("meta", "bundles", "traits", "queue", "runs", "quarantine")


def cli(name: str) -> str:
    """Path of an installed console script, preferring the one beside this interpreter."""
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        raise RuntimeError(f"console script {name!r} not found beside {sys.executable} or on PATH")
    return found


def run_cli(name: str, *args: object, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [cli(name), *map(str, args)], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{name} {' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


# --- stacks ------------------------------------------------------------------------------------


def write_policy(stack_dir: Path, name: str, resources: list[dict[str, Any]], **extra: Any) -> Path:
    stack_dir.mkdir(parents=True, exist_ok=True)
    path = stack_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, **extra, "resources": resources}, sort_keys=False))
    return path


def example_stack_copy(dest: Path) -> Path:
    shutil.copytree(EXAMPLE_STACK, dest)
    return dest


def many_files_stack(dest: Path, count: int) -> Path:
    """The example stack plus ``count`` plain file resources (a run that takes a while)."""
    example_stack_copy(dest)
    resources = [
        {"file": f"/srv/many/f{i:04d}.txt", "content": f"file {i}\n" + "x" * 200 + "\n", "mode": "0644"}
        for i in range(count)
    ]
    write_policy(dest, "many", [{"directory": "/srv/many"}, *resources])
    return dest


def write_traits_dir(path: Path, roles: list[str] | tuple[str, ...] = ("web",)) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "roles.yaml").write_text(yaml.safe_dump({"roles": list(roles)}))
    return path


def write_secrets(path: Path, values: dict[str, str] | None = None) -> Path:
    path.write_text(yaml.safe_dump(values if values is not None else {"api_token": SECRET}))
    return path


def build_bundle(
    stack_dir: Path,
    key: Ed25519PrivateKey,
    *,
    serial: int,
    term: int = 0,
    secrets: dict[str, str] | None = None,
) -> Bundle:
    """A signed bundle built in-process (what `vigocli stack build` does, minus the file)."""
    if secrets is None:
        secrets = {"api_token": SECRET}
    return bundle_mod.build(load_stack(stack_dir), signing_key=key, serial=serial, term=term, secrets=secrets)


# --- bytes and raw LMDB -------------------------------------------------------------------------


def flip_byte(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0xFF
    return bytes(out)


def flip_inside(data: bytes, part: bytes) -> bytes:
    """``data`` with one byte flipped in the middle of where ``part`` occurs in it."""
    at = data.find(part)
    assert at >= 0, "part not found in data"
    return flip_byte(data, at + len(part) // 2)


@contextmanager
def raw_lmdb(state_dir: Path, *, write: bool = True) -> Iterator[tuple[lmdb.Transaction, dict[str, Any]]]:
    """A transaction on STATE_DIR/cache opened with the lmdb module directly (no vigo code),
    for tests that corrupt or inspect stored entries. No Cache may be open on it in this process."""
    env = lmdb.open(str(state_dir / "cache"), max_dbs=len(CACHE_DBS), subdir=True, create=False)
    try:
        dbs = {name: env.open_db(name.encode(), create=False) for name in CACHE_DBS}
        with env.begin(write=write) as txn:
            yield txn, dbs
    finally:
        env.close()


def raw_put(state_dir: Path, db: str, key: bytes, value: bytes) -> None:
    with raw_lmdb(state_dir) as (txn, dbs):
        txn.put(key, value, db=dbs[db])


def raw_get(state_dir: Path, db: str, key: bytes) -> bytes | None:
    with raw_lmdb(state_dir, write=False) as (txn, dbs):
        value = txn.get(key, db=dbs[db])
        return None if value is None else bytes(value)


def unpack(raw: bytes) -> Any:
    return msgpack.unpackb(raw, raw=False)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def secret_needles(secret: str = SECRET) -> list[bytes]:
    """Encodings of a secret a leak could take: its raw bytes, and its base64 at each of the
    three alignments it could have inside a longer base64 text (the stable middle of each)."""
    import base64

    raw = secret.encode()
    needles = [raw]
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw)
        middle = encoded[4 if offset else 0 : -4]  # drop chars mixed with the prefix / padding
        needles += [middle, middle.replace(b"+", b"-").replace(b"/", b"_")]
    return list(dict.fromkeys(needles))


def files_containing(root: Path, needles: list[bytes]) -> list[str]:
    """Every regular file under ``root`` whose bytes contain any of ``needles``."""
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits.extend(f"{path}: {needle!r}" for needle in needles if needle in data)
    return hits
