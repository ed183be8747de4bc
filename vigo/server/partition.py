"""The primary's core: one partition's state and every operation on it. No Ray here.

The primary actor (vigo/actors/primary.py) is a thin shell over one ``Partition``. Envoy
requests arrive in batches (``handle_batch``: one actor call carries many envoys), and each
batch is one database transaction, so a results batch is acknowledged only after it committed.
Admin operations arrive one by one (``admin``).

First start bootstraps the partition: term 1, the fleet CA, the gateway's server certificate,
the bundle-signing key and the secrets master key, each recorded in the database's trees (so
they travel in the one stream with everything else) and materialised under DATA_DIR.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import socket
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import apsw
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vigo import config as config_mod
from vigo.errors import (
    AdmissionError,
    ConfigError,
    ProtocolError,
    RevokedError,
    SecretError,
    StackError,
    StoreError,
    TokenError,
    VigoError,
)
from vigo.policy import bundle as bundle_mod
from vigo.policy.keys import key_id, public_pem
from vigo.policy.stack import load_stack
from vigo.server import fleet
from vigo.server.admissions import (
    FleetCA,
    RevocationSet,
    TokenRecord,
    csr_key_sha256,
    hash_token,
    issue_token,
    spend_token,
)
from vigo.server.secrets import SecretBox
from vigo.server.store import Store

log = logging.getLogger("vigo.server.partition")

#: Admin operation names: a group and a verb, lower case (`envoys.revoke`).
_OP_RE = re.compile(r"^[a-z]+(\.[a-z]+)?$")
#: A pushed stack's name: a folder name, never a path.
_STACK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: Room left in a check-in answer's frame for everything but the bundle, bytes.
FRAME_HEADROOM_BYTES = 64 * 1024

#: Largest stack push accepted (all files together), bytes.
MAX_STACK_PUSH_BYTES = 64 * 1024 * 1024


class Partition:
    def __init__(self, data_dir: Path | str, cfg: config_mod.ServerConfig | None = None,
                 stream_consumers: list[Any] | None = None) -> None:
        self.store = Store(data_dir)
        # Consumers attached before the first write see the generation's opening snapshot, so
        # nobody needs a second copy of the database (a promoted standby feeding its standbys).
        self.store.stream.consumers.extend(stream_consumers or [])
        self.cfg = cfg or self._stored_config() or config_mod.ServerConfig.local(data_dir)
        self._bootstrap()
        self.store.materialise_trees()
        self.term = int(self.store.get_meta("term", 1))
        self.store.stream.term = lambda: self.term
        self.archiver = None  # set by start_archive(): the primary actor runs it, unit tests need not
        self.archive_error: str | None = None
        #: Spanner: the bolt's roster (vigo.server.bolt.BoltCore) when this partition is a bolt.
        self.admissions_hook: Any = None
        self.ca = FleetCA(self._tree("tls", "ca.key"), self._tree("tls", "ca.pem"))
        self.signing_key = serialization.load_pem_private_key(self._tree("secrets", "bundle-signing.key"), None)
        self.secrets = SecretBox(self._tree("secrets", "master.key"))
        self._bundle_cache: dict[int, bytes] = {}
        log.info("partition %s open in %s, term %d", self.cfg.partition, data_dir, self.term)

    # --- bootstrap ----------------------------------------------------------------------

    def _stored_config(self) -> config_mod.ServerConfig | None:
        raw = self.store.get_file("server.yaml", "server.yaml")
        if raw is None:
            return None
        import yaml

        return config_mod.from_dict(yaml.safe_load(raw))

    def _tree(self, tree: str, path: str) -> bytes:
        data = self.store.get_file(tree, path)
        if data is None:
            raise ConfigError(f"partition state is missing {tree}/{path}; the data dir is incomplete")
        return data

    def _bootstrap(self) -> None:
        store = self.store
        with store.write() as db:
            wanted = config_mod.dump(self.cfg).encode()
            if store.get_file("server.yaml", "server.yaml") != wanted:
                # The settings this partition runs with are part of its state (and its stream).
                store.put_file(db, "server.yaml", "server.yaml", wanted)
            if store.get_file("tls", "ca.pem") is None:
                ca = FleetCA.generate()
                store.put_file(db, "tls", "ca.key", ca.key_pem)
                store.put_file(db, "tls", "ca.pem", ca.cert_pem, mode=0o644)
                hosts = sorted({"localhost", socket.gethostname()})
                ips = sorted({"127.0.0.1", *_local_ips()})
                key_pem, cert_pem = ca.issue_server_cert(hosts, ips)
                store.put_file(db, "tls", "server.key", key_pem)
                store.put_file(db, "tls", "server.pem", cert_pem, mode=0o644)
                log.info("generated the fleet CA %s and the gateway certificate", ca.fingerprint()[:16])
            if store.get_file("secrets", "bundle-signing.key") is None:
                key = Ed25519PrivateKey.generate()
                store.put_file(db, "secrets", "bundle-signing.key", key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
                store.put_file(db, "secrets", "bundle-signing.pub", public_pem(key.public_key()), mode=0o644)
            if store.get_file("secrets", "master.key") is None:
                import os

                store.put_file(db, "secrets", "master.key", os.urandom(32))

    # --- what the gateway needs ---------------------------------------------------------

    def gateway_material(self, hostnames: list[str] | None = None, ips: list[str] | None = None) -> dict[str, Any]:
        """TLS material and settings a gateway needs to serve this partition.

        A gateway on another node names its own host: it gets a certificate of its own (issued
        now, never stored: the CA can issue another at its next start), so envoys that reach it
        by that name or address verify it. Without names, the partition's stored certificate.
        """
        if hostnames or ips:
            key_pem, cert_pem = self.ca.issue_server_cert(
                sorted({"localhost", *(hostnames or [])}), sorted({"127.0.0.1", *(ips or [])}))
        else:
            key_pem, cert_pem = self._tree("tls", "server.key"), self._tree("tls", "server.pem")
        return {
            "partition": self.cfg.partition,
            "ca_pem": self._tree("tls", "ca.pem"),
            "cert_pem": cert_pem,
            "key_pem": key_pem,
            "ca_fingerprint": self.ca.fingerprint(),
            "term": self.term,
            "revocations": self.revocations().to_list(),
            "config": self.cfg.to_dict(),
        }

    def revocations(self) -> RevocationSet:
        entries = [(r[0], int(r[1], 16) if r[1] else None) for r in self.store.query(
            "SELECT envoy_id, serial FROM certs WHERE revoked_at IS NOT NULL "
            "UNION SELECT id, NULL FROM envoys WHERE revoked_at IS NOT NULL")]
        if self.admissions_hook is not None:
            entries += [(envoy_id, None) for envoy_id in self.admissions_hook.revoked_ids()]
        return RevocationSet(entries)

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
        import msgpack

        outer = msgpack.unpackb(bytes(row[0]), raw=False)
        raw_secrets = self.secrets.open("bundle_secrets", bytes(row[1])) if row[1] is not None else None
        data = bundle_mod.encode(outer["body"], outer["signature"], outer["key_id"], raw_secrets)
        self._bundle_cache = {serial: data}  # only the newest matters; keep memory flat
        return data

    # --- envoy requests, batched --------------------------------------------------------

    def handle_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answer many envoy requests in one transaction. Each item: {"type", "envoy_id"
        (from its verified certificate, or None before admission), "body"}. Each answer:
        {"ok": body} or {"error": {"code", "reason"}}; one bad item never fails the others."""
        now = time.time()
        answers: list[dict[str, Any]] = []
        current = self.current_serial()
        touched: set[str] = set()
        with self.store.write() as db:
            for item in items:
                try:
                    with db:  # a savepoint per item: a failing item leaves no half-write
                        answers.append({"ok": self._one(db, item, now, current, touched)})
                except (ProtocolError, VigoError) as exc:
                    answers.append({"error": error_of(exc)})
                except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as exc:
                    # A body that passed the schema but carries values the store cannot take
                    # (a 2**63 serial, bytes map keys in traits, ...): that request fails alone.
                    answers.append({"error": {"code": "bad_body",
                                              "reason": f"{item.get('type')} body has a value of the wrong form: {type(exc).__name__}: {exc}"}})
                except Exception as exc:  # a constraint, I/O error or bug: that item fails, logged
                    log.exception("batch item %s failed", item.get("type"))
                    answers.append({"error": {"code": "internal", "reason": f"the server failed on this request ({type(exc).__name__})"}})
            for envoy_id in touched:
                fleet.apply_retention(db, envoy_id, keep=self.cfg.retention.runs_per_envoy,
                                      max_age_s=self.cfg.retention.max_age_days * 86400, now=now)
        self.store.checkpoint()
        return answers

    def _one(self, db: apsw.Connection, item: dict[str, Any], now: float, current: int | None,
             touched: set[str]) -> dict[str, Any]:
        kind, body, envoy_id = item["type"], item["body"], item.get("envoy_id")
        if kind == "join":
            return self._join(db, body, now)
        if envoy_id is None:
            raise ProtocolError("unauthenticated", f"{kind} needs a client certificate from `vigo-envoy join`")
        self._check_envoy(db, envoy_id, body, now)
        if kind == "checkin":
            interval = self.cfg.checkin.interval_s
            fleet.record_checkin(db, envoy_id, body, interval_s=interval, now=now)
            # Only an envoy behind gets the bundle: one ahead (say, after a restore) would refuse
            # an older serial every time, so sending it would only waste the link.
            stale = current is not None and int(body.get("serial") or 0) < current
            return {
                "term": self.term,
                "interval_s": interval,
                "splay_s": fleet.splay_for(envoy_id, self.cfg.checkin.splay_s),
                "bundle_serial": current if stale else None,
                "serial": current or 0,
            }
        if kind == "results":
            acked, offline_stored = fleet.store_reports(db, envoy_id, body.get("reports") or [], now=now)
            if offline_stored:
                # The check-in counted them as queued offline runs; now they have arrived (or
                # arrived before, and the ack was lost: the check-in since counted them again).
                db.execute("UPDATE envoys SET offline_runs = MAX(0, offline_runs - ?) WHERE id = ?",
                           (offline_stored, envoy_id))
            fleet.note_latest_run(db, envoy_id, body.get("reports") or [])
            touched.add(envoy_id)
            return {"acked": list(dict.fromkeys(acked)), "term": self.term}
        if kind == "renew":
            return self._renew(db, envoy_id, body, now, item)
        raise ProtocolError("unknown_type", f"the primary does not handle {kind!r}")

    def _check_envoy(self, db: apsw.Connection, envoy_id: str, body: dict[str, Any], now: float) -> None:
        row = self.store.one("SELECT revoked_at FROM envoys WHERE id = ?", (envoy_id,))
        hook = self.admissions_hook
        if hook is not None:
            # Spanner: the replicated roster decides. A revocation made at any bolt counts here;
            # an envoy admitted at a sibling is served here without re-joining.
            from vigo.roster import State

            state = hook.status(envoy_id)
            if state is State.REVOKED:
                raise RevokedError(f"envoy {envoy_id} was revoked (admissions roster)")
            if row is None:
                if state is not State.ADMITTED:
                    raise AdmissionError(f"envoy {envoy_id} is not in the admissions roster of {self.cfg.partition} "
                                         f"(state {state.value}); retry shortly if it just joined elsewhere")
                traits = body.get("traits") if isinstance(body.get("traits"), dict) else {}
                hostname = str(traits.get("hostname") or envoy_id)[:253]
                db.execute("INSERT INTO envoys(id, hostname, joined_at, token_id, traits) VALUES (?,?,?,?,?)",
                           (envoy_id, hostname, now, None, json.dumps(traits, sort_keys=True, default=str)))
                log.info("envoy %s (admitted at a sibling bolt) is served here from now on", envoy_id)
                row = (None,)
        if row is None:
            raise AdmissionError(f"envoy {envoy_id} is not known to partition {self.cfg.partition}")
        if row[0] is not None:
            raise RevokedError(f"envoy {envoy_id} was revoked at {_iso(row[0])}")
        claimed = body.get("envoy_id")
        if claimed not in (None, envoy_id):
            raise ProtocolError("forbidden", f"message names envoy {claimed!r} but the certificate is {envoy_id!r}")

    def _join(self, db: apsw.Connection, body: dict[str, Any], now: float) -> dict[str, Any]:
        token = body.get("token")
        if not isinstance(token, str):
            raise TokenError("join token not recognised")
        row = self.store.one(
            "SELECT id, hash, created_at, expires_at, uses_left, uses_total, note FROM tokens WHERE hash = ?",
            (hash_token(token),))
        record = None if row is None else TokenRecord(
            id=row[0], hash=row[1], created_at=row[2], expires_at=row[3], uses_left=row[4], note=row[6],
            uses_allowed=row[5])
        spent = spend_token(record, now=now, token=token)
        # Compare-and-set: two joins racing for a token's last use cannot both win.
        db.execute("UPDATE tokens SET uses_left = ? WHERE id = ? AND uses_left = ?",
                   (spent.uses_left, spent.id, spent.uses_left + 1))
        if db.changes() != 1:
            raise TokenError("join token has no uses left")
        envoy_id = uuid.uuid4().hex
        issued = self.ca.sign_envoy_csr(body["csr_pem"], envoy_id, now=now,
                                        lifetime_s=int(self.cfg.admissions.envoy_cert_lifetime_s))
        hostname = str(body.get("hostname") or "")[:253] or envoy_id
        db.execute("INSERT INTO envoys(id, hostname, joined_at, token_id, traits) VALUES (?,?,?,?,?)",
                   (envoy_id, hostname, now, spent.id, json.dumps(body.get("traits") or {}, sort_keys=True)))
        db.execute("INSERT INTO certs(serial, envoy_id, issued_at, not_after) VALUES (?,?,?,?)",
                   (format(issued.serial, "x"), envoy_id, now, issued.not_after))
        if self.admissions_hook is not None:
            self.admissions_hook.admitted(envoy_id, issued.cert_pem, issued.not_after)
        log.info("envoy %s (%s) joined with token %s", envoy_id, hostname, spent.id)
        return {
            "envoy_id": envoy_id,
            "certificate_pem": issued.cert_pem,
            "ca_pem": self._tree("tls", "ca.pem"),
            "signing_key_pem": self._tree("secrets", "bundle-signing.pub"),
            "term": self.term,
        }

    def _renew(self, db: apsw.Connection, envoy_id: str, body: dict[str, Any], now: float,
               item: dict[str, Any]) -> dict[str, Any]:
        """A new certificate for the envoy's new key (the envoy was checked like a check-in).

        The certificate the envoy presented is not revoked: it expires on its own. So a renewal
        whose answer was lost leaves the envoy with a valid pair, and it renews again later.
        Rows of this envoy's certificates that have expired are dropped here (nothing checks an
        expired certificate against the table: TLS and the gateway refuse it first), so the
        table holds the certificates that are still valid, whatever the envoy's age.
        """
        csr_pem = body["csr_pem"]
        try:
            new_key = csr_key_sha256(csr_pem)
        except AdmissionError as exc:
            raise ProtocolError("bad_body", f"renew: {exc}") from exc
        presented = item.get("cert_key_sha256")
        if presented is not None and new_key == presented:
            raise ProtocolError("conflict", "renew needs a new key: the request's public key is the key of the "
                                            "certificate this connection presented")
        try:
            issued = self.ca.sign_envoy_csr(csr_pem, envoy_id, now=now,
                                            lifetime_s=int(self.cfg.admissions.envoy_cert_lifetime_s))
        except AdmissionError as exc:
            raise ProtocolError("bad_body", f"renew: {exc}") from exc
        db.execute("DELETE FROM certs WHERE envoy_id = ? AND revoked_at IS NULL AND not_after < ?", (envoy_id, now))
        db.execute("INSERT INTO certs(serial, envoy_id, issued_at, not_after) VALUES (?,?,?,?)",
                   (format(issued.serial, "x"), envoy_id, now, issued.not_after))
        if self.admissions_hook is not None:
            self.admissions_hook.admitted(envoy_id, issued.cert_pem, issued.not_after)
        log.info("envoy %s renewed its certificate: serial %x valid until %s (was serial %s)", envoy_id,
                 issued.serial, _iso(issued.not_after), item.get("cert_serial") or "?")
        return {"certificate_pem": issued.cert_pem, "not_after": issued.not_after}

    # --- admin --------------------------------------------------------------------------

    def admin(self, op: str, args: dict[str, Any]) -> Any:
        """Run one admin operation. Only canonical names (`envoys.list`) reach a handler, and the
        arguments must fit its signature and the types checked inside it."""
        handler = getattr(self, "_admin_" + op.replace(".", "_"), None) if _OP_RE.match(op) else None
        if handler is None:
            raise ProtocolError("not_found", f"unknown admin operation {op!r}")
        try:
            bound = inspect.signature(handler).bind(**(args or {}))
        except TypeError as exc:
            raise ProtocolError("bad_body", f"{op}: {exc}") from exc
        return handler(*bound.args, **bound.kwargs)

    def _admin_status(self) -> dict[str, Any]:
        now = time.time()
        current = self.current_serial()
        envoys = fleet.envoy_rows(self.store)
        counts = dict.fromkeys((*fleet.STATUSES, "revoked"), 0)
        for e in envoys:
            counts[self._status(e, now, current)] += 1
        bundle = self.store.one("SELECT version, serial, pushed_at FROM bundles WHERE serial = ?", (current,)) if current else None
        return {
            "partition": self.cfg.partition,
            "term": self.term,
            "data_dir": str(self.store.data_dir),
            "envoys": len(envoys),
            "status_counts": counts,
            "bundle": {"version": bundle[0], "serial": bundle[1], "pushed_at": bundle[2]} if bundle else None,
            "runs_stored": self.store.one("SELECT COUNT(*) FROM runs")[0],
            "queued_reports": sum(e.get("queue_depth") or 0 for e in envoys),
            "wal_pages": self.store.wal_pages(),
            "stream": self.stream_status(),
            "ca_fingerprint": self.ca.fingerprint(),
            "signing_key_id": key_id(self.signing_key.public_key()),
        }

    def _admin_stack_push(self, files: dict[str, bytes], name: str = "stack", serial: int | None = None) -> dict[str, Any]:
        """Build, sign and store the pushed stack. ``serial`` (spanner) is the serial the push
        gets at every bolt, so one serial always means one stack wherever an envoy is served."""
        if not isinstance(name, str) or not _STACK_NAME_RE.match(name):
            raise ProtocolError("bad_body", f"stack name must be a folder name (letters, digits, . _ -), got {name!r:.80}")
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, bytes) for k, v in files.items()):
            raise ProtocolError("bad_body", "stack.push files must map relative paths (text) to contents (bytes)")
        size = sum(len(v) for v in files.values())
        if size > MAX_STACK_PUSH_BYTES:
            raise StackError("stack too large to push", expected=f"<= {MAX_STACK_PUSH_BYTES} bytes", got=size)
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
            secrets = self._secret_values(stack.secret_names())
            next_serial = (self.current_serial() or 0) + 1
            if serial is not None and (not isinstance(serial, int) or serial < next_serial):
                raise ProtocolError("conflict", f"stack.push serial {serial!r} is not above this partition's {next_serial - 1}")
            serial = serial or next_serial
            built = bundle_mod.build(stack, signing_key=self.signing_key, serial=serial, term=self.term, secrets=secrets)
        limit = self.cfg.gateway.max_frame_bytes - FRAME_HEADROOM_BYTES
        if len(built.encode()) > limit:
            raise StackError("the built bundle would not fit in one check-in answer",
                             expected=f"<= {limit} bytes (gateway.max_frame_bytes minus headroom)",
                             got=f"{len(built.encode())} bytes")
        summary = {**built.summary(), "secrets": sorted(built.secrets), "files": sorted(files)}
        current = self.store.one("SELECT version, term FROM bundles ORDER BY serial DESC LIMIT 1")
        # Same content, same term: envoys already have it; a new serial would only churn. The
        # pushed source is still kept (it may differ in files no policy references).
        unchanged = current is not None and tuple(current) == (built.version, self.term)
        sealed = self.secrets.seal("bundle_secrets", built.raw_secrets) if built.raw_secrets else None
        with self.store.write() as db:
            self.store.delete_tree(db, "stack")
            for rel, data in sorted(files.items()):
                self.store.put_file(db, "stack", rel, data, mode=0o644)
            if unchanged:
                return {**summary, "serial": self.current_serial(), "unchanged": True}
            db.execute("INSERT INTO bundles(serial, version, term, pushed_at, summary, bundle, secrets_sealed) "
                       "VALUES (?,?,?,?,?,?,?)",
                       (serial, built.version, self.term, time.time(), json.dumps(summary),
                        bundle_mod.encode(built.raw_body, built.raw_signature, built.key_id, None), sealed))
        log.info("stack pushed: bundle %s serial %d term %d", built.version, serial, self.term)
        return summary

    def _admin_stack_show(self) -> dict[str, Any] | None:
        row = self.store.one("SELECT serial, version, term, pushed_at, summary FROM bundles ORDER BY serial DESC LIMIT 1")
        if row is None:
            return None
        history = [{"serial": r[0], "version": r[1], "pushed_at": r[2]} for r in self.store.query(
            "SELECT serial, version, pushed_at FROM bundles ORDER BY serial DESC LIMIT 10")]
        return {"serial": row[0], "version": row[1], "term": row[2], "pushed_at": row[3],
                "summary": json.loads(row[4]), "history": history}

    def _admin_token_create(self, ttl_s: float | None = None, uses: int | None = None, note: str = "") -> dict[str, Any]:
        if ttl_s is not None and (not isinstance(ttl_s, int | float) or isinstance(ttl_s, bool) or ttl_s <= 0):
            raise ProtocolError("bad_body", f"token ttl_s must be a positive number of seconds, got {ttl_s!r}")
        if uses is not None and (not isinstance(uses, int) or isinstance(uses, bool) or uses < 1):
            raise ProtocolError("bad_body", f"token uses must be a whole number >= 1, got {uses!r}")
        if not isinstance(note, str) or len(note) > 200:
            raise ProtocolError("bad_body", "token note must be text of at most 200 characters")
        now = time.time()
        token, rec = issue_token(now=now, ttl_s=self.cfg.admissions.token_ttl_s if ttl_s is None else ttl_s,
                                 uses=self.cfg.admissions.token_uses if uses is None else uses, note=note)
        with self.store.write() as db:
            db.execute("INSERT INTO tokens(id, hash, created_at, expires_at, uses_left, uses_total, note) "
                       "VALUES (?,?,?,?,?,?,?)",
                       (rec.id, rec.hash, rec.created_at, rec.expires_at, rec.uses_left, rec.uses_left, note))
        log.info("join token %s created (%d uses, expires %s)", rec.id, rec.uses_left, _iso(rec.expires_at))
        return {"id": rec.id, "token": token, "expires_at": rec.expires_at, "uses": rec.uses_left}

    def _admin_spanner_status(self) -> dict[str, Any]:
        # Answered by the gateway when spanner is on; reaching a partition means it is off.
        raise ConfigError(f"spanner is not on for partition {self.cfg.partition}: list the bolts' hosts in "
                          "spanner.bolts in server.yaml and deploy again (docs/spanner.md)")

    def _admin_token_install(self, id: str, hash: str, created_at: float, expires_at: float, uses: int,
                             note: str = "") -> dict[str, Any]:
        """Spanner: a token created at one bolt, installed at the others (by its hash only) so
        any bolt that owns the join can spend it. Uses are counted by the bolt that serves it."""
        if not (isinstance(id, str) and 0 < len(id) <= 64 and isinstance(hash, str) and re.fullmatch(r"[0-9a-f]{64}", hash)
                and isinstance(uses, int) and not isinstance(uses, bool) and uses >= 1
                and isinstance(expires_at, int | float) and isinstance(created_at, int | float)
                and isinstance(note, str) and len(note) <= 200):
            raise ProtocolError("bad_body", "token.install expects id (text), hash (64 hex digits), uses (>= 1), "
                                            "created_at and expires_at (seconds) and a note of at most 200 characters")
        with self.store.write() as db:
            db.execute("INSERT INTO tokens(id, hash, created_at, expires_at, uses_left, uses_total, note) "
                       "VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO NOTHING",
                       (id, hash, created_at, expires_at, uses, uses, note))
        return {"id": id}

    def fleet_material(self) -> dict[str, bytes]:
        """The fleet CA and bundle-signing keys, for the other bolts at deploy (never an admin op)."""
        return {path: self._tree(tree, path) for tree, path in (
            ("tls", "ca.key"), ("tls", "ca.pem"), ("secrets", "bundle-signing.key"), ("secrets", "bundle-signing.pub"))}

    def adopt_fleet_material(self, material: dict[str, bytes]) -> bool:
        """Take the first bolt's CA and signing key (deploy, once): only while this bolt has
        admitted nobody and pushed nothing, so no certificate or bundle of its own exists."""
        trees = {"ca.key": "tls", "ca.pem": "tls", "bundle-signing.key": "secrets", "bundle-signing.pub": "secrets"}
        if all(self.store.get_file(trees[p], p) == data for p, data in material.items()):
            return False
        envoys = self.store.one("SELECT COUNT(*) FROM envoys")[0]
        bundles = self.store.one("SELECT COUNT(*) FROM bundles")[0]
        if envoys or bundles:
            raise ConfigError(f"bolt {self.cfg.partition} already has {envoys} envoys and {bundles} bundles under its "
                              "own CA; it cannot adopt another fleet CA (start it from an empty data dir)")
        ca = FleetCA(material["ca.key"], material["ca.pem"])
        key_pem, cert_pem = ca.issue_server_cert(sorted({"localhost", socket.gethostname()}),
                                                 sorted({"127.0.0.1", *_local_ips()}))
        with self.store.write() as db:
            for path, data in material.items():
                self.store.put_file(db, trees[path], path, data, mode=0o644 if path.endswith((".pem", ".pub")) else 0o600)
            self.store.put_file(db, "tls", "server.key", key_pem)
            self.store.put_file(db, "tls", "server.pem", cert_pem, mode=0o644)
        self.ca = ca
        self.signing_key = serialization.load_pem_private_key(material["bundle-signing.key"], None)
        log.info("bolt %s adopted the fleet CA %s", self.cfg.partition, ca.fingerprint()[:16])
        return True

    def _admin_token_list(self) -> list[dict[str, Any]]:
        return [{"id": r[0], "created_at": r[1], "expires_at": r[2], "uses_left": r[3], "uses_total": r[4], "note": r[5]}
                for r in self.store.query("SELECT id, created_at, expires_at, uses_left, uses_total, note FROM tokens ORDER BY created_at")]

    def _status(self, envoy: dict[str, Any], now: float, current_serial: int | None) -> str:
        if envoy.get("revoked_at"):
            return "revoked"
        return fleet.derive_status(envoy, now=now, current_serial=current_serial,
                                   offline_after_intervals=self.cfg.checkin.offline_after_intervals,
                                   default_interval_s=self.cfg.checkin.interval_s)

    def _admin_envoys_list(self) -> list[dict[str, Any]]:
        now, current = time.time(), self.current_serial()  # once, not once per envoy
        out = []
        for e in fleet.envoy_rows(self.store):
            out.append({
                "id": e["id"], "hostname": e["hostname"], "status": self._status(e, now, current),
                "last_seen": e["last_seen"], "serial": e["serial"], "bundle_version": e["bundle_version"],
                "queue_depth": e["queue_depth"], "oldest_queued_at": e["oldest_queued_at"],
                "offline_runs": e["offline_runs"],
                "last_run": e["last_run"],
            })
        return out

    def _admin_envoys_show(self, envoy_id: str, runs: int = 10) -> dict[str, Any]:
        if not isinstance(envoy_id, str) or not envoy_id:
            raise ProtocolError("bad_body", f"envoy id must be a non-empty string, got {envoy_id!r:.80}")
        if not isinstance(runs, int) or isinstance(runs, bool) or not 0 <= runs <= 1000:
            raise ProtocolError("bad_body", f"runs must be a whole number in 0..1000, got {runs!r}")
        rows = fleet.envoy_rows(self.store, envoy_id)
        if not rows:
            raise ProtocolError("not_found", f"no envoy with id (or id prefix) {envoy_id!r}")
        if len(rows) > 1 and rows[0]["id"] != envoy_id:
            raise ProtocolError("conflict", f"id prefix {envoy_id!r} matches {len(rows)} envoys; give more characters")
        e = rows[0]
        e["status"] = self._status(e, time.time(), self.current_serial())
        e["runs"] = fleet.recent_runs(self.store, e["id"], limit=runs, full=True)
        e["run_count"] = self.store.one("SELECT COUNT(*) FROM runs WHERE envoy_id = ?", (e["id"],))[0]
        return e

    def _admin_envoys_revoke(self, envoy_id: str) -> dict[str, Any]:
        hook = self.admissions_hook
        try:
            target = self._admin_envoys_show(envoy_id, runs=0)["id"]
        except ProtocolError:
            if hook is None or not re.fullmatch(r"[0-9a-f]{32}", envoy_id):
                raise
            target = envoy_id  # spanner: an envoy this bolt never served is revoked in the roster
        if hook is not None:
            hook.revoked(target)
        now = time.time()
        with self.store.write() as db:
            db.execute("UPDATE envoys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?", (now, target))
            db.execute("UPDATE certs SET revoked_at = COALESCE(revoked_at, ?) WHERE envoy_id = ?", (now, target))
        log.info("envoy %s revoked", target)
        return {"id": target, "revoked_at": now, "revocations": self.revocations().to_list()}

    def _admin_secrets_set(self, name: str, value: bytes | str) -> dict[str, Any]:
        if not isinstance(value, str | bytes):
            raise ProtocolError("bad_body", f"secret value must be text or bytes, got {type(value).__name__}")
        data = value.encode() if isinstance(value, str) else value
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("bad_body", f"secret {name!r} is not UTF-8 text; templates need text "
                                            "(base64-encode binary values)") from None
        sealed = self.secrets.seal(name, data)
        with self.store.write() as db:
            self.store.put_file(db, "secrets", f"values/{name}.sealed", sealed)
        log.info("secret %s set (%d bytes, sealed)", name, len(data))
        return {"name": name, "bytes": len(data)}

    def _admin_secrets_list(self) -> list[dict[str, Any]]:
        rows = self.store.query("SELECT path, updated_at FROM trees WHERE tree = 'secrets' AND path LIKE 'values/%' ORDER BY path")
        return [{"name": r[0][len("values/"):-len(".sealed")], "updated_at": r[1]} for r in rows]

    def _admin_backup_create(self, out: str, key: bytes, salt: bytes, kdf: dict) -> dict[str, Any]:
        """An encrypted backup unit (vigo/snapshots/backup.py) at ``out``: an absolute path on
        this host or a file:// / s3:// URL (on the archive's S3 endpoint, if one is set). The
        key arrives derived by the CLI, so the passphrase never reaches the server. The primary
        runs one method at a time, so envoy batches wait while this runs: about 0.9 s for a
        200 MB database (measured on a 2-core VM)."""
        from vigo.snapshots import backup

        if not isinstance(out, str) or not out:
            raise ProtocolError("bad_body", f"backup out must be a path or URL (text), got {out!r:.80}")
        result = backup.create_backup_at(self.store.db, out, backup.BackupKey.from_derived(key, salt, kdf),
                                         partition=self.cfg.partition, work_dir=self.store.data_dir,
                                         endpoint_url=self.cfg.archive.endpoint_url or None)
        log.info("backup written to %s (%d bytes, %d entries, %.1f s)", result["path"], result["size"],
                 result["entries"], result["seconds"])
        return result

    def _secret_values(self, names: list[str]) -> dict[str, str]:
        values = {}
        for name in names:
            sealed = self.store.get_file("secrets", f"values/{name}.sealed")
            if sealed is None:
                raise StackError(f"secret {name!r} is referenced by the stack but not set",
                                 expected=f"`vigocli secrets set {name}` first", got="no such secret")
            values[name] = self.secrets.open(name, sealed).decode()
        return values

    # --- the archive and periodic upkeep ------------------------------------------------------

    def start_archive(self) -> dict[str, Any] | None:
        """Ship the state stream to ``archive.url`` (no-op without one). Starts with a snapshot,
        so the archive can always be restored from what this process sends: a new generation
        when continuity with the last run cannot be proven, else a new index of the same one."""
        cfg = self.cfg.archive
        if not cfg.url or self.archiver is not None:
            return None
        from vigo.snapshots.archiver import Archiver
        from vigo.snapshots.targets import open_target

        try:
            target = open_target(cfg.url, endpoint_url=cfg.endpoint_url or None)
        except VigoError as exc:
            # Serving never stops for the archive: say it loudly, show it in `server status`.
            log.error("ARCHIVE OFF: cannot use archive.url %s: %s", cfg.url, exc)
            self.archive_error = str(exc)
            return None
        self.archiver = Archiver(
            target, self.store.data_dir / "archive-spool", partition=self.cfg.partition,
            sync_interval_s=cfg.sync_interval_s, snapshot_interval_s=cfg.snapshot_interval_s,
            retention_s=cfg.retention_s, retention_check_s=cfg.retention_check_s, spool_max_bytes=cfg.spool_max_bytes)
        self.store.stream.consumers.append(self.archiver)
        stream, last = self.store.stream, self.store.stream.last_snapshot
        if (last is not None and stream.state is not None and not stream.reason_for_new_generation
                and (last.generation, last.index) == (stream.state.generation, stream.state.index)
                and stream.state.offset == 0 and last.path.exists()):
            self.archiver.on_snapshot(last)  # nothing committed since: that copy is current
        else:
            stream.snapshot()
        self.archiver.start()
        log.info("archiving partition %s to %s every %.1f s", self.cfg.partition, target.url, cfg.sync_interval_s)
        return self.archiver.status()

    def set_term(self, term: int) -> None:
        """Adopt a higher term (at promotion): from now on every answer and bundle carries it."""
        if term <= self.term:
            raise StoreError(f"term {term} is not above the current term {self.term}")
        with self.store.write() as db:
            self.store.set_meta(db, "term", term)
        log.info("partition %s now at term %d (was %d)", self.cfg.partition, term, self.term)
        self.term = term

    def tick(self) -> None:
        """Periodic upkeep from the primary's loop: checkpoint when the WAL is long, snapshot
        when the archive's schedule says so."""
        self.store.checkpoint()
        if self.archiver is not None and self.archiver.snapshot_due():
            self.store.stream.snapshot()

    def stream_status(self) -> dict[str, Any]:
        stream = self.store.stream
        return {
            "position": list(stream.position()) if stream.position() else None,
            "archive": self.archiver.status() if self.archiver is not None else None,
            "archive_error": self.archive_error,
        }

    def close(self) -> None:
        if self.archiver is not None:
            self.archiver.stop()
        self.store.close()


def error_of(exc: Exception) -> dict[str, Any]:
    """The error-frame body for an exception raised while answering one request."""
    if isinstance(exc, ProtocolError):
        return {"code": exc.code, "reason": exc.reason}
    for cls, code in ((TokenError, "bad_token"), (RevokedError, "revoked"), (AdmissionError, "forbidden"),
                      (StackError, "bad_body"), (ConfigError, "bad_body"), (SecretError, "bad_body"),
                      (StoreError, "unavailable")):
        if isinstance(exc, cls):
            return {"code": code, "reason": str(exc)}
    return {"code": "conflict" if isinstance(exc, VigoError) else "internal", "reason": str(exc)}


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _local_ips() -> list[str]:
    try:
        from vigo.agent.traits import collect

        return [ip for ip in collect(None).get("ips", []) if ":" not in ip]
    except Exception:
        return []
