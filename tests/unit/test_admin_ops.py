"""The admin-operation table (vigo/server/admin.py): dispatch and argument checks on a real
Partition, the table against its handlers, its `writes` column against the stream, the docs
and `vigocli server ops`."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_STACK
from tests.serverharness import stack_files
from vigo.agent.enrolment import make_envoy_key_and_csr
from vigo.config import ServerConfig
from vigo.errors import ConfigError, ProtocolError
from vigo.server import admin
from vigo.server.admissions import hash_token
from vigo.server.partition import Partition
from vigo.snapshots.backup import MIN_SCRYPT_N, BackupKey

DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.fixture
def part(tmp_path):
    p = Partition(tmp_path / "p", ServerConfig.local(tmp_path / "p"))
    yield p
    p.close()


def refused(part: Partition, op, args) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        part.admin(op, args)
    return info.value


# --- dispatch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["nope", "envoys_show", "__init__", "_one", "envoys.list.x", "", None, 5, ["status"]])
def test_only_operations_in_the_table_run(part, op):
    error = refused(part, op, {})
    assert error.code == "not_found" and "unknown admin operation" in error.reason


@pytest.mark.parametrize(
    ("op", "args", "says"),
    [
        ("status", ["x"], "status: arguments must be a map of name to value, got list ['x']"),
        ("token.create", {"colour": "red"},
         "token.create has no argument 'colour'; it takes ttl_s: number (optional), uses: whole number (optional), "
         'note: text = ""'),
        ("status", {"verbose": True}, "status has no argument 'verbose'; it takes no arguments"),
        ("envoys.show", {}, "envoys.show needs argument envoy_id (text)"),
        ("envoys.show", {"envoy_id": "x", "runs": "many"}, "envoys.show expects runs to be whole number, got str 'many'"),
        ("envoys.show", {"envoy_id": "x", "runs": True}, "envoys.show expects runs to be whole number, got bool True"),
        ("envoys.show", {"envoy_id": None}, "envoys.show expects envoy_id to be text, got NoneType None"),
        ("envoys.revoke", {"envoy_id": b"abc"}, "envoys.revoke expects envoy_id to be text, got bytes b'abc'"),
        ("token.create", {"uses": 1.5}, "token.create expects uses to be whole number or nil, got float 1.5"),
        ("token.create", {"ttl_s": "1h"}, "token.create expects ttl_s to be number or nil, got str '1h'"),
        ("secrets.set", {"name": "k", "value": 5}, "secrets.set expects value to be text or bytes, got int 5"),
        ("stack.push", {"files": {"a.yaml": "text not bytes"}},
         "stack.push expects files to be map of path (text) to bytes, got dict {'a.yaml': 'text not bytes'}"),
        ("stack.push", {"files": {}, "serial": "7"}, "stack.push expects serial to be whole number or nil, got str '7'"),
        ("backup.create", {"out": "/tmp/x", "key": "k", "salt": b"s", "kdf": {}},
         "backup.create expects key to be bytes, got str 'k'"),
        ("token.install", {"id": "t", "hash": "0" * 64, "created_at": "now", "expires_at": 1.0, "uses": 1},
         "token.install expects created_at to be number, got str 'now'"),
    ],
)
def test_arguments_are_checked_against_the_table(part, op, args, says):
    error = refused(part, op, args)
    assert (error.code, error.reason) == ("bad_body", says)


def test_a_long_wrong_value_is_cut_in_the_reason(part):
    error = refused(part, "envoys.show", {"envoy_id": "x" * 10_000})
    assert error.code == "not_found"  # the right type: the handler answers
    error = refused(part, "envoys.show", {"envoy_id": ["x" * 10_000]})
    assert error.code == "bad_body" and len(error.reason) < 200 and error.reason.endswith("...")


def test_defaults_are_filled_and_nil_is_accepted_where_the_default_is_nil(part):
    assert admin.OPS["envoys.show"].bind({"envoy_id": "x"}) == {"envoy_id": "x", "runs": 10}
    assert admin.OPS["stack.push"].bind({"files": {}}) == {"files": {}, "name": "stack", "serial": None}
    assert admin.OPS["status"].bind(None) == {}
    token = part.admin("token.create", {"ttl_s": None, "uses": None})  # what `vigocli token create` sends
    assert token["uses"] == part.cfg.admissions.token_uses
    assert refused(part, "token.create", {"note": None}).code == "bad_body"  # "" is the default, not nil


def test_value_checks_stay_with_the_handlers(part):
    assert "positive number of seconds" in refused(part, "token.create", {"ttl_s": 0}).reason
    assert "at most 200 characters" in refused(part, "token.create", {"note": "n" * 201}).reason
    assert "0..1000" in refused(part, "envoys.show", {"envoy_id": "x", "runs": 1001}).reason
    assert "non-empty" in refused(part, "envoys.show", {"envoy_id": ""}).reason
    assert refused(part, "stack.push", {"files": {}, "name": "../up"}).code == "bad_body"


# --- the table against the code ---------------------------------------------------------------


def test_each_row_names_its_handlers_parameters_in_order(part):
    for op in admin.OPS.values():
        handler = op.handler(part)
        params = [p.name for p in inspect.signature(handler).parameters.values()]
        assert params == [a.name for a in op.args], op.name


def test_writes_says_which_operations_change_the_state(part, tmp_path):
    """Each operation runs once on a real partition; those marked `writes` move the stream
    position (what a synchronous standby must confirm), the others leave it where it was."""
    key = BackupKey.from_passphrase("pass phrase", params={"n": MIN_SCRYPT_N, "r": 8, "p": 1})
    token = part.admin("token.create", {"uses": 1})["token"]
    _, csr = make_envoy_key_and_csr("h")
    envoy_id = part.handle_batch([{"type": "join", "body": {"token": token, "csr_pem": csr}}])[0]["ok"]["envoy_id"]
    calls = [  # in an order that lets each one succeed
        ("status", {}), ("secrets.set", {"name": "api_token", "value": "t"}), ("secrets.list", {}),
        ("stack.push", {"files": stack_files(EXAMPLE_STACK)}), ("stack.show", {}),
        ("token.create", {}), ("token.list", {}),
        ("token.install", {"id": "t1", "hash": hash_token("vigo_x"), "created_at": time.time(),
                           "expires_at": time.time() + 60, "uses": 1}),
        ("envoys.list", {}), ("envoys.page", {"status": "pending"}), ("envoys.show", {"envoy_id": envoy_id}), ("envoys.revoke", {"envoy_id": envoy_id}),
        ("backup.create", {"out": str(tmp_path / "b.vgb"), "key": key.key, "salt": key.salt, "kdf": key.kdf()}),
        ("spanner.status", {}),
    ]
    assert sorted(name for name, _ in calls) == sorted(admin.OPS), "every operation needs a call here"
    for name, args in calls:
        before = part.store.stream.position()
        try:
            part.admin(name, args)
        except ConfigError:
            assert name == "spanner.status"
        assert (part.store.stream.position() != before) == admin.OPS[name].writes, name


# --- where the table is read ------------------------------------------------------------------


def test_the_docs_list_the_table():
    text = DOCS.read_text()
    section = text.split("\n## Admin operations\n", 1)
    assert len(section) == 2, "docs/protocol.md has no 'Admin operations' section"
    body = section[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    assert "\n".join(rows) == admin.markdown(), (
        "docs/protocol.md's admin table differs from vigo.server.admin; paste the output of\n"
        "  python -c 'from vigo.server import admin; print(admin.markdown())'")


def test_vigocli_server_ops_prints_the_table_without_a_server_or_ray():
    probe = (
        "import sys\n"
        "from vigo.cli.main import main\n"
        "code = main(['server', 'ops', '--json'])\n"
        "print('RAY' if 'ray' in sys.modules else 'NO-RAY', code, file=sys.stderr)\n"
    )
    # Nothing listens on port 9: an answer proves the command never asked a server.
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         check=True, env={**os.environ, "VIGO_ADDRESS": "http://127.0.0.1:9"})
    assert out.stderr.strip().splitlines()[-1] == "NO-RAY 0"
    assert json.loads(out.stdout) == json.loads(json.dumps(admin.describe()))
    readable = subprocess.run([sys.executable, "-m", "vigo.cli.main", "server", "ops"], capture_output=True,
                              text=True, timeout=120, check=True)
    lines = readable.stdout.splitlines()
    assert lines[0].split() == ["OP", "ARGUMENTS", "WRITES", "WHAT", "IT", "DOES"]
    assert [line.split()[0] for line in lines[2:]] == list(admin.OPS)
