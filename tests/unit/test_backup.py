"""Backup units on real APSW databases: round trip, keys, every kind of damage, live writers.

The partition fixture is a real bootstrapped data dir (CA, server key, signing key, master key),
with a secret, the example stack pushed and one envoy joined, so the unit holds what a real one
does. scrypt runs at its minimum cost here (MIN_SCRYPT_N) to keep the suite fast.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import apsw
import pytest

from tests.conftest import EXAMPLE_STACK
from tests.s3server import aws_env, s3_server  # noqa: F401  (fixtures)
from tests.serverharness import stack_files
from vigo.agent.enrolment import make_envoy_key_and_csr
from vigo.errors import (
    BackupCorruptError,
    BackupError,
    BackupFormatError,
    BackupKeyError,
    ConfigError,
)
from vigo.server.partition import Partition
from vigo.server.secrets import SecretBox
from vigo.snapshots import backup
from vigo.snapshots.backup import BackupKey

PASSPHRASE = "correct horse battery staple"
FAST = {"n": backup.MIN_SCRYPT_N, "r": 8, "p": 1}
SECRET_VALUE = b"hunter2-secret-value"


@pytest.fixture(scope="module")
def key() -> BackupKey:
    return BackupKey.from_passphrase(PASSPHRASE, params=FAST)


def make_partition(data_dir: Path) -> Partition:
    part = Partition(data_dir)
    part.admin("secrets.set", {"name": "db_password", "value": SECRET_VALUE})
    part.admin("secrets.set", {"name": "api_token", "value": "demo-token-value"})
    part.admin("stack.push", {"files": stack_files(EXAMPLE_STACK)})
    token = part.admin("token.create", {"uses": 1})["token"]
    _, csr = make_envoy_key_and_csr("web1")
    part.handle_batch([{"type": "join", "body": {"token": token, "csr_pem": csr, "hostname": "web1"}}])
    return part


@pytest.fixture
def partition(tmp_path):
    part = make_partition(tmp_path / "data")
    yield part
    part.close()


@pytest.fixture
def unit(partition, key, tmp_path) -> Path:
    out = tmp_path / "p0.vgb"
    backup.create_backup(partition.store.db, out, key, partition="p0")
    return out


def rows(db_path: Path) -> dict[str, list[tuple]]:
    """Every row of every table, in a stable order: the database's logical content."""
    conn = apsw.Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
        return {t: sorted(tuple(r) for r in conn.execute(f'SELECT * FROM "{t}"')) for t in tables}
    finally:
        conn.close()


def layout(path: Path, key: BackupKey) -> dict[str, list[tuple[int, int]]]:
    """Where each record lives, parsed independently of the reader: {name: [(offset, length)]}
    with "header" and "manifest" too. Names and sizes come from a verify of the intact unit."""
    data = path.read_bytes()
    verified = backup.verify_backup(path, key)
    header_len = struct.unpack(">8sHI", data[:14])[2]
    out = {"header": [(0, 14 + header_len + 4)]}
    offset = 14 + header_len + 4

    def record() -> tuple[int, int]:
        nonlocal offset
        (n,) = struct.unpack(">I", data[offset:offset + 4])
        found = (offset, 4 + 12 + n)
        offset += 4 + 12 + n
        return found

    out["manifest"] = [record()]
    chunk = backup.CHUNK_BYTES
    for entry in verified["entries"]:
        out[entry["name"]] = [record() for _ in range(max(1, -(-entry["size"] // chunk)))]
    assert offset == len(data)
    return out


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


# --- round trip -----------------------------------------------------------------------------


def test_round_trip_restores_the_same_state(partition, key, unit, tmp_path):
    source_rows = rows(partition.store.data_dir / "state.db")
    verified = backup.verify_backup(unit, PASSPHRASE)
    assert verified["database"]["integrity"] == "ok"
    assert verified["partition"] == "p0"
    assert verified["database"]["tables"]["envoys"] == 1
    names = {e["name"] for e in verified["entries"]}
    assert {"state.db", "server.yaml", "tls/ca.key", "tls/server.key", "secrets/master.key",
            "secrets/bundle-signing.key", "secrets/values/db_password.sealed", "stack/web.yaml"} <= names

    restored = tmp_path / "restored"
    result = backup.restore_backup(unit, PASSPHRASE, restored)
    assert result["tree_files"] == len(names) - 1 and result["kept"] == [] and result["replaced"] == []
    assert rows(restored / "state.db") == source_rows
    for tree, path, content, mode in partition.store.query("SELECT tree, path, content, mode FROM trees"):
        on_disk = restored / "server.yaml" if tree == "server.yaml" else restored / tree / path
        assert on_disk.read_bytes() == bytes(content), on_disk
        assert on_disk.stat().st_mode & 0o777 == mode, on_disk
    # The secret opens with the restored master key, and the restored partition is the same one.
    box = SecretBox((restored / "secrets/master.key").read_bytes())
    assert box.open("db_password", (restored / "secrets/values/db_password.sealed").read_bytes()) == SECRET_VALUE
    reopened = Partition(restored)
    try:
        assert reopened.ca.fingerprint() == partition.ca.fingerprint()
        assert reopened.admin("stack.show", {})["version"] == partition.admin("stack.show", {})["version"]
    finally:
        reopened.close()


def test_key_file_and_passphrase_with_the_same_text_open_the_same_backup(unit, tmp_path):
    key_file = tmp_path / "backup.key"
    key_file.write_bytes(PASSPHRASE.encode() + b"\n")
    header = backup.verify_backup(unit, backup.key_file_secret(key_file.read_bytes()))
    assert header["partition"] == "p0"
    salt, kdf = _header(unit)["kdf"]["salt"], _header(unit)["kdf"]
    assert BackupKey.from_key_file(key_file.read_bytes(), bytes.fromhex(salt), kdf).key == \
        BackupKey.from_passphrase(PASSPHRASE, bytes.fromhex(salt), kdf).key


def test_an_empty_tree_file_and_multi_chunk_entries_round_trip(partition, key, tmp_path):
    with partition.store.write() as db:
        partition.store.put_file(db, "stack", "files/empty", b"", mode=0o644)
        partition.store.put_file(db, "stack", "files/big.bin", os.urandom(10_000), mode=0o644)
    out = tmp_path / "small-chunks.vgb"
    backup.create_backup(partition.store.db, out, key, partition="p0", chunk_bytes=4096)
    restored = tmp_path / "r"
    backup.restore_backup(out, key, restored)
    assert (restored / "stack/files/empty").read_bytes() == b""
    assert (restored / "stack/files/big.bin").read_bytes() == partition.store.get_file("stack", "files/big.bin")


def _header(path: Path) -> dict:
    data = path.read_bytes()
    length = struct.unpack(">8sHI", data[:14])[2]
    return json.loads(data[14:14 + length])


# --- nothing secret in the clear --------------------------------------------------------------


def test_no_secret_private_key_or_name_appears_in_the_unit(partition, unit):
    data = unit.read_bytes()
    master = partition.store.get_file("secrets", "master.key")
    ca_key = partition.store.get_file("tls", "ca.key")
    assert len(master) == 32
    assert SECRET_VALUE not in data
    assert b"PRIVATE KEY" not in data
    assert master not in data
    for line in ca_key.splitlines()[1:-1]:  # the PEM body, line by line
        assert line not in data
    assert b"SQLite format 3" not in data
    assert b"db_password" not in data  # entry names live only in the encrypted manifest
    assert b"ca.key" not in data


# --- wrong keys -------------------------------------------------------------------------------


def test_a_wrong_passphrase_says_so(unit):
    with pytest.raises(BackupKeyError, match=r"wrong passphrase or key for backup .*p0\.vgb"):
        backup.verify_backup(unit, "not the passphrase")


def test_a_key_derived_for_another_backup_says_to_use_the_passphrase(unit):
    other = BackupKey.from_passphrase(PASSPHRASE, params=FAST)  # a new salt
    with pytest.raises(BackupKeyError, match=r"derived with another salt"):
        backup.verify_backup(unit, other)


def test_the_key_sent_to_the_server_is_checked():
    good = BackupKey.from_passphrase(PASSPHRASE, params=FAST)
    assert BackupKey.from_derived(good.key, good.salt, good.kdf()) == good
    with pytest.raises(ConfigError, match=r"32 bytes, got 31 bytes"):
        BackupKey.from_derived(good.key[:-1], good.salt, good.kdf())
    with pytest.raises(ConfigError, match=r"salt must be 16 bytes"):
        BackupKey.from_derived(good.key, "salt", good.kdf())
    with pytest.raises(ConfigError, match=r"too weak"):
        BackupKey.from_derived(good.key, good.salt, {**good.kdf(), "n": 1024})
    with pytest.raises(ConfigError, match=r"power of two"):
        BackupKey.from_derived(good.key, good.salt, {**good.kdf(), "n": 100_000})
    with pytest.raises(ConfigError, match=r"must be"):
        BackupKey.from_derived(good.key, good.salt, {"name": "argon2"})


# --- damage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("entry", ["state.db", "tls/ca.key", "secrets/master.key", "server.yaml"])
def test_a_flipped_byte_inside_an_entry_names_that_entry(unit, key, entry, tmp_path):
    offset, length = layout(unit, key)[entry][0]
    flip(unit, offset + 16 + length // 2 - 8)  # inside the ciphertext, past length and nonce
    with pytest.raises(BackupCorruptError, match=f"backup entry {entry} failed authentication: "
                                                 "the file is corrupted or was tampered with"):
        backup.verify_backup(unit, PASSPHRASE)
    with pytest.raises(BackupCorruptError, match=f"backup entry {entry} failed"):
        backup.restore_backup(unit, PASSPHRASE, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_flipped_nonce_or_length_field_names_the_entry(unit, key):
    offset, _ = layout(unit, key)["tls/server.key"][0]
    original = unit.read_bytes()
    flip(unit, offset + 6)  # in the nonce
    with pytest.raises(BackupCorruptError, match=r"backup entry tls/server.key failed authentication"):
        backup.verify_backup(unit, PASSPHRASE)
    unit.write_bytes(original)
    flip(unit, offset + 3)  # the length field's low byte
    with pytest.raises(BackupCorruptError, match=r"entry tls/server\.key \(chunk 1 of 1\)"):
        backup.verify_backup(unit, PASSPHRASE)


def test_reordered_chunks_are_detected(partition, key, tmp_path):
    out = tmp_path / "chunks.vgb"
    backup.create_backup(partition.store.db, out, key, partition="p0", chunk_bytes=4096)
    data = bytearray(out.read_bytes())
    header_len = struct.unpack(">8sHI", data[:14])[2]
    offset = 14 + header_len + 4
    offset += 16 + struct.unpack(">I", data[offset:offset + 4])[0]  # past the manifest
    first = bytes(data[offset:offset + 16 + 4096 + 16])
    second = bytes(data[offset + len(first):offset + 2 * len(first)])
    data[offset:offset + 2 * len(first)] = second + first  # two full chunks of state.db, swapped
    out.write_bytes(bytes(data))
    with pytest.raises(BackupCorruptError, match=r"backup entry state.db failed authentication.*chunk 1 of"):
        backup.verify_backup(out, PASSPHRASE)


def test_a_flipped_byte_in_the_manifest_is_not_a_wrong_passphrase(unit, key):
    offset, length = layout(unit, key)["manifest"][0]
    flip(unit, offset + length - 5)
    with pytest.raises(BackupCorruptError, match=r"manifest .* failed authentication although the key is right"):
        backup.verify_backup(unit, PASSPHRASE)


def test_a_flipped_byte_in_the_header_is_not_a_wrong_passphrase(unit):
    flip(unit, 30)
    with pytest.raises(BackupCorruptError, match=r"header fails its CRC-32 check"):
        backup.verify_backup(unit, PASSPHRASE)
    listed = backup.list_backups(unit.parent)
    assert "CRC-32" in listed[0]["error"]


def test_an_edited_header_with_a_fixed_checksum_fails_the_manifest(unit):
    data = unit.read_bytes()
    length = struct.unpack(">8sHI", data[:14])[2]
    header = json.loads(data[14:14 + length])
    header["partition"] = "p9"
    body = json.dumps(header, sort_keys=True).encode()
    start = struct.pack(">8sHI", backup.MAGIC, 1, len(body)) + body
    unit.write_bytes(start + struct.pack(">I", zlib.crc32(start)) + data[14 + length + 4:])
    assert backup.list_backups(unit)[0]["partition"] == "p9"  # list trusts the header: it says so
    with pytest.raises(BackupCorruptError, match=r"manifest .* failed authentication"):
        backup.verify_backup(unit, PASSPHRASE)


def test_a_header_asking_for_absurd_scrypt_memory_is_refused_before_deriving(unit):
    data = unit.read_bytes()
    length = struct.unpack(">8sHI", data[:14])[2]
    header = json.loads(data[14:14 + length])
    header["kdf"]["n"] = 2**24
    body = json.dumps(header, sort_keys=True).encode()
    start = struct.pack(">8sHI", backup.MAGIC, 1, len(body)) + body
    unit.write_bytes(start + struct.pack(">I", zlib.crc32(start)) + data[14 + length + 4:])
    started = time.monotonic()
    with pytest.raises(BackupCorruptError, match=r"key derivation cannot be used.*MiB allowed"):
        backup.verify_backup(unit, PASSPHRASE)
    assert time.monotonic() - started < 5


def test_not_a_backup_and_unknown_versions_are_named(unit, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(BackupFormatError, match=r"is not a vigo backup \(expected it to start with b'VIGOBKUP'"):
        backup.verify_backup(text, PASSPHRASE)
    data = bytearray(unit.read_bytes())
    data[8:10] = struct.pack(">H", 7)
    unit.write_bytes(bytes(data))
    with pytest.raises(BackupFormatError, match=r"format version 7; this vigo .* reads version 1"):
        backup.verify_backup(unit, PASSPHRASE)


@pytest.mark.parametrize("where", ["header", "manifest", "tls/ca.key", "end"])
def test_truncation_is_reported_with_what_was_cut(unit, key, where):
    places = layout(unit, key)
    data = unit.read_bytes()
    if where == "end":
        cut, expect = len(data) - 1, "truncated: entry"
    else:
        offset, length = places[where][0]
        cut = offset + length // 2
        expect = {"header": "truncated: the header", "manifest": "truncated: the manifest",
                  "tls/ca.key": r"truncated: entry tls/ca\.key \(chunk 1 of 1\)"}[where]
    unit.write_bytes(data[:cut])
    with pytest.raises(BackupCorruptError, match=expect):
        backup.verify_backup(unit, PASSPHRASE)


def test_bytes_appended_after_the_last_entry_are_reported(unit):
    with open(unit, "ab") as f:
        f.write(b"extra")
    with pytest.raises(BackupCorruptError, match=r"5 unexpected bytes after the last entry"):
        backup.verify_backup(unit, PASSPHRASE)


def test_a_database_that_fails_integrity_check_fails_verify(key, tmp_path):
    conn = scratch_db(tmp_path / "scratch.db")
    conn.execute("CREATE TABLE amounts(x INTEGER CHECK (x > 0))")
    conn.pragma("ignore_check_constraints", True)
    conn.execute("INSERT INTO amounts VALUES (-1)")  # a row that breaks its table's CHECK
    out = tmp_path / "bad.vgb"
    backup.create_backup(conn, out, key, partition="p0")
    with pytest.raises(BackupCorruptError, match=r"fails PRAGMA integrity_check .*CHECK constraint failed"):
        backup.verify_backup(out, PASSPHRASE)


def test_tree_entries_that_disagree_with_the_database_are_named(key, tmp_path, monkeypatch):
    conn = scratch_db(tmp_path / "scratch.db")
    real = backup._tree_rows
    monkeypatch.setattr(backup, "_tree_rows",
                        lambda path: [(t, p, c + b"!" if p == "a.yaml" else c, m) for t, p, c, m in real(path)])
    out = tmp_path / "odd.vgb"
    backup.create_backup(conn, out, key, partition="p0")
    with pytest.raises(BackupCorruptError, match=r"backup entry stack/a.yaml differs from the database's trees row"):
        backup.verify_backup(out, PASSPHRASE)


# --- restore targets ------------------------------------------------------------------------


def test_restore_refuses_a_non_empty_data_dir(unit, tmp_path):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes").write_text("mine")
    with pytest.raises(BackupError, match=r"refusing to restore into .*occupied: it is not empty \(holds notes\)"):
        backup.restore_backup(unit, PASSPHRASE, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes"]


def test_restore_with_force_replaces_a_servers_state(key, tmp_path):
    data_dir = tmp_path / "server"
    part = make_partition(data_dir)
    unit = tmp_path / "before.vgb"
    backup.create_backup(part.store.db, unit, key, partition="p0")
    before = rows(data_dir / "state.db")
    part.admin("secrets.set", {"name": "later", "value": "set after the backup"})
    part.close()
    (data_dir / "operator-notes.txt").write_text("keep me")
    result = backup.restore_backup(unit, PASSPHRASE, data_dir, force=True)
    assert {"state.db", "secrets", "tls", "stack", "server.yaml"} <= set(result["replaced"])
    assert "operator-notes.txt" in result["kept"]
    assert not (data_dir / "secrets/values/later.sealed").exists()
    after = rows(data_dir / "state.db")
    assert after == before
    assert (data_dir / "operator-notes.txt").read_text() == "keep me"


# --- live writers ---------------------------------------------------------------------------


def scratch_db(path: Path) -> apsw.Connection:
    """A WAL database with a trees table like the server's and a little content."""
    conn = apsw.Connection(str(path))
    conn.pragma("journal_mode", "wal")
    conn.execute("CREATE TABLE trees (tree TEXT NOT NULL, path TEXT NOT NULL, content BLOB NOT NULL, "
                 "sha256 TEXT NOT NULL, mode INTEGER NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (tree, path))")
    conn.execute("INSERT INTO trees VALUES ('stack', 'a.yaml', x'6869', '', 420, 0), "
                 "('tls', 'ca.key', x'00', '', 384, 0)")
    return conn


def test_a_backup_taken_while_another_connection_writes_is_one_consistent_instant(key, tmp_path, monkeypatch):
    db_path = tmp_path / "busy.db"
    conn = scratch_db(db_path)
    conn.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, body BLOB NOT NULL)")
    conn.execute("CREATE TABLE counter (n INTEGER NOT NULL)")
    conn.execute("INSERT INTO counter VALUES (0)")
    with conn:
        for _ in range(3000):  # about 12 MB: many snapshot steps at one page each
            conn.execute("INSERT INTO events(body) VALUES (randomblob(4000))")
    # Every write transaction adds an event and bumps the counter: a torn snapshot would show
    # them disagreeing.
    conn.execute("UPDATE counter SET n = (SELECT COUNT(*) FROM events)")
    stop, written = threading.Event(), [0]

    def writer() -> None:
        other = apsw.Connection(str(db_path))
        other.setbusytimeout(5000)
        while not stop.is_set():
            with other:
                other.execute("INSERT INTO events(body) VALUES (randomblob(4000))")
                other.execute("UPDATE counter SET n = n + 1")
            written[0] += 1
        other.close()

    seen = []  # the writer's commit count at each snapshot step
    monkeypatch.setattr(backup, "SNAPSHOT_STEP_PAGES", 50)
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.05)
        out = tmp_path / "busy.vgb"
        backup.create_backup(conn, out, key, partition="p0",
                             progress=lambda phase, *_: seen.append(written[0]) if phase == "snapshot" else None)
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 10 and seen[-1] > seen[0], "the writer must commit between snapshot steps"
    assert backup.verify_backup(out, PASSPHRASE)["database"]["integrity"] == "ok"
    # Decrypt the snapshot itself: the writer's invariant holds, and nothing committed after
    # the first step is in it (one instant, not a blend of the steps).
    work = tmp_path / "work"
    work.mkdir()
    backup._verify_into(out, str(out), PASSPHRASE, work, None)
    snap = apsw.Connection(str(work / "state.db"), flags=apsw.SQLITE_OPEN_READONLY)
    events, counter = snap.execute("SELECT (SELECT COUNT(*) FROM events), (SELECT n FROM counter)").fetchall()[0]
    snap.close()
    assert events == counter
    assert 3000 <= events <= 3000 + seen[0]


# --- list ---------------------------------------------------------------------------------------


def test_list_shows_units_newest_first_and_unreadable_ones_with_an_error(partition, key, tmp_path, monkeypatch):
    folder = tmp_path / "backups"
    folder.mkdir()
    clock = iter([1_700_000_000.0, 1_700_000_100.0])
    for name in ("older.vgb", "newer.vgb"):
        monkeypatch.setattr(backup.time, "time", lambda: next(clock))
        backup.create_backup(partition.store.db, folder / name, key, partition="p0")
    monkeypatch.undo()
    (folder / "README.txt").write_text("not a backup, not named like one: skipped")
    (folder / "broken.vgb").write_bytes(b"VIGOBKUP\x00")
    (folder / "foreign.vgb").write_bytes(b"PK\x03\x04 a zip file")
    listed = backup.list_backups(folder)
    assert [b["name"] for b in listed[:2]] == ["newer.vgb", "older.vgb"]
    assert listed[0]["created_at"] == 1_700_000_100.0 and listed[0]["partition"] == "p0"
    assert listed[0]["size"] == (folder / "newer.vgb").stat().st_size
    errors = {b["name"]: b["error"] for b in listed[2:]}
    assert set(errors) == {"broken.vgb", "foreign.vgb"}
    assert "truncated" in errors["broken.vgb"]
    assert "not a vigo backup" in errors["foreign.vgb"]


def test_list_of_a_missing_folder_says_so(tmp_path):
    with pytest.raises(BackupError, match=r"cannot list backups in .*nowhere: it does not exist"):
        backup.list_backups(tmp_path / "nowhere")


# --- the server's admin operation ---------------------------------------------------------------


def test_backup_create_admin_op_writes_a_unit_the_passphrase_opens(partition, tmp_path):
    derived = BackupKey.from_passphrase(PASSPHRASE, params=FAST)
    args = {"key": derived.key, "salt": derived.salt, "kdf": derived.kdf()}
    result = partition.admin("backup.create", {"out": str(tmp_path), **args})  # a folder: generated name
    written = Path(result["path"])
    assert written.parent == tmp_path and written.name.startswith("vigo-p0-") and written.suffix == ".vgb"
    assert result["size"] == written.stat().st_size and result["entries"] > 10
    assert backup.verify_backup(written, PASSPHRASE)["backup_id"] == result["backup_id"]
    with pytest.raises(BackupError, match=r"already exists"):
        partition.admin("backup.create", {"out": str(written), **args})
    with pytest.raises(ConfigError, match=r"absolute path on the server host"):
        partition.admin("backup.create", {"out": "relative.vgb", **args})
    with pytest.raises(ConfigError, match=r"too weak"):
        partition.admin("backup.create", {"out": str(tmp_path / "weak.vgb"), **args, "kdf": {**derived.kdf(), "n": 16}})
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == [], "temp folders must not outlive a backup"


# --- archive targets (file:// and s3:// on a real moto S3) --------------------------------------


@pytest.fixture(params=["file", "s3"])
def target_url(request, tmp_path) -> tuple[str, str | None]:
    """A URL prefix backups go under, and the S3 endpoint (None for file://)."""
    if request.param == "file":
        root = tmp_path / "archive"
        root.mkdir()
        return root.as_uri(), None
    server = request.getfixturevalue("s3_server")
    server.create_bucket("vigo-backups")
    return "s3://vigo-backups/backups", server.endpoint_url


def test_backups_to_a_url_list_verify_and_restore(partition, target_url, tmp_path):
    url, endpoint = target_url
    partition.cfg.archive.endpoint_url = endpoint or ""
    derived = BackupKey.from_passphrase(PASSPHRASE, params=FAST)
    args = {"key": derived.key, "salt": derived.salt, "kdf": derived.kdf()}
    result = partition.admin("backup.create", {"out": url + "/", **args})  # a generated name
    assert result["path"].startswith(url + "/vigo-p0-") and result["path"].endswith(".vgb")
    leftovers = [p.name for p in partition.store.data_dir.iterdir() if p.name.startswith(".backup-upload-")]
    assert leftovers == [], "the upload's temp folder must go"

    listed = backup.list_backups(url, endpoint_url=endpoint)
    assert [(b["location"], b["partition"], b["created_at"], b["size"], b["error"]) for b in listed] == [
        (result["path"], "p0", result["created_at"], result["size"], None)]
    verified = backup.verify_backup(result["path"], PASSPHRASE, endpoint_url=endpoint)
    assert verified["backup_id"] == result["backup_id"]
    restored = backup.restore_backup(result["path"], PASSPHRASE, tmp_path / "restored", endpoint_url=endpoint)
    assert rows(Path(restored["data_dir"]) / "state.db") == rows(partition.store.data_dir / "state.db")
    with pytest.raises(BackupError, match="already exists"):
        partition.admin("backup.create", {"out": result["path"], **args})
