"""Backups end to end: a real dev server (`vigocli server start --dev`, real Ray, real TLS) and
the real `vigocli backup create | list | verify | restore` as subprocesses.

One dev server for the module on free ports and its own data dir (the pattern of
test_server_e2e.py), stopped with `vigocli server stop` at the end whatever happened.
"""

from __future__ import annotations

import json

import pytest

from tests import devserver
from vigo.server.secrets import SecretBox
from vigo.state.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
PASSPHRASE = "an operator's long backup passphrase"
SECRET = "s3cr3t-from-the-e2e-test"


def run(*args, **kwargs):
    # The passphrase reaches a command only where a test gives it on purpose.
    return devserver.run(*args, drop_env=("VIGO_BACKUP_PASSPHRASE",), **kwargs)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with devserver.dev_server(tmp_path_factory.mktemp("server")) as info:
        run("vigocli", "secrets", "set", "db_password", env=info["env"], stdin=SECRET)
        yield info


@pytest.fixture(scope="module")
def created(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("backups")
    out = folder / "x.vgb"
    proc = run("vigocli", "backup", "create", "--out", out, "--json",
               env={**server["env"], "VIGO_BACKUP_PASSPHRASE": PASSPHRASE})
    return {"folder": folder, "out": out, "result": json.loads(proc.stdout)}


def test_create_writes_the_unit_on_the_server(created):
    result, out = created["result"], created["out"]
    assert result["path"] == str(out)
    assert out.stat().st_size == result["size"]
    assert result["entries"] > 10 and result["partition"] == "p0"
    data = out.read_bytes()
    assert SECRET.encode() not in data and b"PRIVATE KEY" not in data


def test_list_shows_it(created):
    rows = json.loads(run("vigocli", "backup", "list", created["folder"], "--json").stdout)
    assert [(r["name"], r["partition"], r["error"]) for r in rows] == [("x.vgb", "p0", None)]
    human = run("vigocli", "backup", "list", created["folder"]).stdout
    assert "x.vgb" in human and "PARTITION" in human


def test_verify_with_the_passphrase_and_refuses_a_wrong_one(created):
    env = {"VIGO_BACKUP_PASSPHRASE": PASSPHRASE}
    verified = json.loads(run("vigocli", "backup", "verify", created["out"], "--json", env=env).stdout)
    assert verified["database"]["integrity"] == "ok"
    assert verified["backup_id"] == created["result"]["backup_id"]
    wrong = run("vigocli", "backup", "verify", created["out"], env={"VIGO_BACKUP_PASSPHRASE": "nope"}, check=1)
    assert "wrong passphrase or key for backup" in wrong.stderr and "Traceback" not in wrong.stderr


def test_no_passphrase_without_a_terminal_is_a_clear_error(created):
    proc = run("vigocli", "backup", "verify", created["out"], stdin="", check=2)
    assert "no backup passphrase" in proc.stderr and "VIGO_BACKUP_PASSPHRASE" in proc.stderr


def test_restore_makes_a_data_dir_the_store_opens(server, created, tmp_path):
    key_file = tmp_path / "backup.key"
    key_file.write_text(PASSPHRASE + "\n")
    new = tmp_path / "restored"
    proc = run("vigocli", "backup", "restore", created["out"], "--data-dir", new, "--key-file", key_file, "--json")
    result = json.loads(proc.stdout)
    assert result["data_dir"] == str(new) and result["tree_files"] > 5
    store = Store(new)
    try:
        sealed = store.get_file("secrets", "values/db_password.sealed")
        assert sealed is not None and SECRET.encode() not in sealed  # encrypted at rest, as on the server
        assert SecretBox(store.get_file("secrets", "master.key")).open("db_password", sealed) == SECRET.encode()
        assert store.tree_files("stack"), "the pushed example stack is restored"
        assert store.get_file("tls", "ca.pem") == (server["data"] / "tls/ca.pem").read_bytes()
    finally:
        store.close()
    for name in ("server.yaml", "tls/ca.key", "tls/server.key", "secrets/master.key",
                 "secrets/values/db_password.sealed"):
        assert (new / name).is_file(), name
    again = run("vigocli", "backup", "restore", created["out"], "--data-dir", new, "--key-file", key_file, check=1)
    assert "not empty" in again.stderr and "--force" in again.stderr
