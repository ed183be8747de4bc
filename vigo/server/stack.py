"""The pushed stack and its bundles: what `stack push` stores and what envoys download.

A push arrives as files (the CLI reads the folder, the server never reads the operator's
disk), is loaded and validated like `vigocli stack check` would, built into a bundle signed
with the partition's key and stored with its secrets sealed under the master key, all in one
transaction with the pushed source (the `stack` tree). A bundle row holds the signed body
without secrets; ``bundle_bytes`` puts them back in for the envoys that download it.

Plain Python over the store, no Ray; ``Partition`` wires it (vigo/server/partition.py).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from vigo.config import ServerConfig
from vigo.errors import ProtocolError, StackError
from vigo.policy import bundle as bundle_mod
from vigo.policy.stack import load_stack
from vigo.server.secrets import SecretsCore
from vigo.state.store import Store

# The partition's one logger: operators follow one name for everything a partition does.
log = logging.getLogger("vigo.server.partition")

#: A pushed stack's name: a folder name, never a path.
STACK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Room left in a check-in answer's frame for everything but the bundle, bytes.
FRAME_HEADROOM_BYTES = 64 * 1024
#: Largest stack push accepted (all files together), bytes.
MAX_STACK_PUSH_BYTES = 64 * 1024 * 1024
#: Bundle secrets are sealed as one value under this name (a bundle's secrets travel together).
BUNDLE_SECRETS_NAME = "bundle_secrets"
#: Pushes shown in `stack show`'s history.
HISTORY_LENGTH = 10


class StackCore:
    """Bundles of one partition: push, show, the current serial, the bytes an envoy gets.

    ``signing_key`` is an attribute, not a constructor-time constant: a spanner bolt adopts the
    first bolt's key at deploy (``Partition.adopt_fleet_material``) and sets it here.
    ``term`` is read at each push, because a promotion raises it while the partition runs.
    """

    def __init__(self, store: Store, cfg: ServerConfig, secrets: SecretsCore, signing_key: Any,
                 term: Callable[[], int]) -> None:
        self.store = store
        self.cfg = cfg
        self.secrets = secrets
        self.signing_key = signing_key
        self.term = term
        self._bundle_cache: dict[int, bytes] = {}

    def current_serial(self) -> int | None:
        row = self.store.one("SELECT MAX(serial) FROM bundles")
        return row[0] if row and row[0] is not None else None

    def bundle_bytes(self, serial: int) -> bytes:
        """The full bundle (secrets included) an envoy receives for ``serial``."""
        cached = self._bundle_cache.get(serial)
        if cached is not None:
            return cached
        row = self.store.one("SELECT bundle, secrets_sealed FROM bundles WHERE serial = ?", (serial,))
        if row is None:
            raise ProtocolError("not_found", f"no bundle with serial {serial}")
        outer = msgpack.unpackb(bytes(row[0]), raw=False)
        raw_secrets = self.secrets.box.open(BUNDLE_SECRETS_NAME, bytes(row[1])) if row[1] is not None else None
        data = bundle_mod.encode(outer["body"], outer["signature"], outer["key_id"], raw_secrets)
        self._bundle_cache = {serial: data}  # only the newest matters; keep memory flat
        return data

    def push(self, files: dict[str, bytes], name: str, serial: int | None) -> dict[str, Any]:
        """Build, sign and store the pushed stack. ``serial`` (spanner) is the serial the push
        gets at every bolt, so one serial always means one stack wherever an envoy is served.
        The admin table (vigo/server/admin.py) has checked the arguments' types."""
        if not STACK_NAME_RE.match(name):
            raise ProtocolError("bad_body", f"stack name must be a folder name (letters, digits, . _ -), got {name!r:.80}")
        size = sum(len(v) for v in files.values())
        if size > MAX_STACK_PUSH_BYTES:
            raise StackError("stack too large to push", expected=f"<= {MAX_STACK_PUSH_BYTES} bytes", got=size)
        term = self.term()
        with tempfile.TemporaryDirectory(prefix="vigo-push-") as tmp:
            root = Path(tmp) / (name or "stack")
            for rel, data in files.items():
                parts = rel.split("/")
                if rel.startswith("/") or ".." in parts or "" in parts:
                    raise StackError("pushed path leaves the stack folder", file=rel, expected="a relative path", got=rel)
                target = root / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            stack = load_stack(root)
            secrets = self.secrets.values(stack.secret_names())
            next_serial = (self.current_serial() or 0) + 1
            if serial is not None and serial < next_serial:
                raise ProtocolError("conflict", f"stack.push serial {serial!r} is not above this partition's {next_serial - 1}")
            serial = serial or next_serial
            built = bundle_mod.build(stack, signing_key=self.signing_key, serial=serial, term=term, secrets=secrets)
        limit = self.cfg.gateway.max_frame_bytes - FRAME_HEADROOM_BYTES
        if len(built.encode()) > limit:
            raise StackError("the built bundle would not fit in one check-in answer",
                             expected=f"<= {limit} bytes (gateway.max_frame_bytes minus headroom)",
                             got=f"{len(built.encode())} bytes")
        summary = {**built.summary(), "secrets": sorted(built.secrets), "files": sorted(files)}
        current = self.store.one("SELECT version, term FROM bundles ORDER BY serial DESC LIMIT 1")
        # Same content, same term: envoys already have it; a new serial would only churn. The
        # pushed source is still kept (it may differ in files no policy references).
        unchanged = current is not None and tuple(current) == (built.version, term)
        sealed = self.secrets.box.seal(BUNDLE_SECRETS_NAME, built.raw_secrets) if built.raw_secrets else None
        with self.store.write() as db:
            self.store.delete_tree(db, "stack")
            for rel, data in sorted(files.items()):
                self.store.put_file(db, "stack", rel, data, mode=0o644)
            if unchanged:
                return {**summary, "serial": self.current_serial(), "unchanged": True}
            db.execute("INSERT INTO bundles(serial, version, term, pushed_at, summary, bundle, secrets_sealed) "
                       "VALUES (?,?,?,?,?,?,?)",
                       (serial, built.version, term, time.time(), json.dumps(summary),
                        bundle_mod.encode(built.raw_body, built.raw_signature, built.key_id, None), sealed))
        log.info("stack pushed: bundle %s serial %d term %d", built.version, serial, term)
        return summary

    def show(self) -> dict[str, Any] | None:
        """The newest bundle's summary and the last pushes; None before the first push."""
        row = self.store.one("SELECT serial, version, term, pushed_at, summary FROM bundles ORDER BY serial DESC LIMIT 1")
        if row is None:
            return None
        history = [{"serial": r[0], "version": r[1], "pushed_at": r[2]} for r in self.store.query(
            "SELECT serial, version, pushed_at FROM bundles ORDER BY serial DESC LIMIT ?", (HISTORY_LENGTH,))]
        return {"serial": row[0], "version": row[1], "term": row[2], "pushed_at": row[3],
                "summary": json.loads(row[4]), "history": history}

    def current(self) -> dict[str, Any] | None:
        """The current bundle's version, serial and push time, for the partition's status."""
        serial = self.current_serial()
        row = self.store.one("SELECT version, serial, pushed_at FROM bundles WHERE serial = ?", (serial,)) if serial else None
        return {"version": row[0], "serial": row[1], "pushed_at": row[2]} if row else None
