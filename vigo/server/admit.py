"""Admissions as one partition keeps them: join tokens, joins, renewals and revocations.

``vigo.server.admissions`` holds the pure pieces (the fleet CA, token records, the revocation
set): records in, records out. This core applies them to the partition's tables (``tokens``,
``envoys``, ``certs``), inside the batch's transaction for envoy requests (``join``, ``renew``,
the per-request envoy check) and in a transaction of their own for admin operations.

With spanner on, a bolt's replicated roster (``vigo.server.spanner.bolt.BoltCore``) is set as
``hook``: it hears of every admission and revocation, and decides which envoys may be served.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import apsw

from vigo.config import ServerConfig
from vigo.errors import AdmissionError, ProtocolError, RevokedError, TokenError
from vigo.server.admissions import (
    FleetCA,
    RevocationSet,
    TokenRecord,
    csr_key_sha256,
    hash_token,
    issue_token,
    spend_token,
)
from vigo.server.fleet import FleetCore
from vigo.state.store import Store
from vigo.timefmt import iso

# The partition's one logger: operators follow one name for everything a partition does.
log = logging.getLogger("vigo.server.partition")

#: Longest free-text note on a join token, characters.
MAX_TOKEN_NOTE_CHARS = 200
#: Longest token id a sibling bolt may install (ours are 8 hex digits).
MAX_TOKEN_ID_CHARS = 64
#: An envoy id as issued at join: uuid4 hex. Spanner revokes such ids even where never served.
_ENVOY_ID_RE = re.compile(r"[0-9a-f]{32}")
_TOKEN_HASH_RE = re.compile(r"[0-9a-f]{64}")


class AdmissionsCore:
    """``ca`` is an attribute: a spanner bolt adopts the first bolt's CA at deploy
    (``Partition.adopt_fleet_material``) and sets it here. ``tree`` reads a file of the
    partition's trees (the CA certificate and the bundle-signing public key a join returns)."""

    def __init__(self, store: Store, cfg: ServerConfig, ca: FleetCA, fleet: FleetCore,
                 tree: Callable[[str, str], bytes], term: Callable[[], int]) -> None:
        self.store = store
        self.cfg = cfg
        self.ca = ca
        self.fleet = fleet
        self.tree = tree
        self.term = term
        #: Spanner: the bolt's roster (BoltCore) when this partition is a bolt, else None.
        self.hook: Any = None

    def revocations(self) -> RevocationSet:
        entries = [(r[0], int(r[1], 16) if r[1] else None) for r in self.store.query(
            "SELECT envoy_id, serial FROM certs WHERE revoked_at IS NOT NULL "
            "UNION SELECT id, NULL FROM envoys WHERE revoked_at IS NOT NULL")]
        if self.hook is not None:
            entries += [(envoy_id, None) for envoy_id in self.hook.revoked_ids()]
        return RevocationSet(entries)

    # --- envoy requests, inside the batch's transaction -----------------------------------

    def check_envoy(self, db: apsw.Connection, envoy_id: str, body: dict[str, Any], now: float) -> None:
        """Refuse a request from an envoy this partition must not serve (unknown, revoked, or
        speaking for another envoy than its certificate names)."""
        row = self.store.one("SELECT revoked_at FROM envoys WHERE id = ?", (envoy_id,))
        hook = self.hook
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
            raise RevokedError(f"envoy {envoy_id} was revoked at {iso(row[0])}")
        claimed = body.get("envoy_id")
        if claimed not in (None, envoy_id):
            raise ProtocolError("forbidden", f"message names envoy {claimed!r} but the certificate is {envoy_id!r}")

    def join(self, db: apsw.Connection, body: dict[str, Any], now: float) -> dict[str, Any]:
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
        if self.hook is not None:
            self.hook.admitted(envoy_id, issued.cert_pem, issued.not_after)
        log.info("envoy %s (%s) joined with token %s", envoy_id, hostname, spent.id)
        return {
            "envoy_id": envoy_id,
            "certificate_pem": issued.cert_pem,
            "ca_pem": self.tree("tls", "ca.pem"),
            "signing_key_pem": self.tree("secrets", "bundle-signing.pub"),
            "term": self.term(),
        }

    def renew(self, db: apsw.Connection, envoy_id: str, body: dict[str, Any], now: float,
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
        if self.hook is not None:
            self.hook.admitted(envoy_id, issued.cert_pem, issued.not_after)
        log.info("envoy %s renewed its certificate: serial %x valid until %s (was serial %s)", envoy_id,
                 issued.serial, iso(issued.not_after), item.get("cert_serial") or "?")
        return {"certificate_pem": issued.cert_pem, "not_after": issued.not_after}

    # --- admin operations (argument types checked by vigo/server/admin.py) ----------------

    def create_token(self, ttl_s: float | None, uses: int | None, note: str) -> dict[str, Any]:
        """A join token; None takes server.yaml's default. Only its hash is stored."""
        if ttl_s is not None and ttl_s <= 0:
            raise ProtocolError("bad_body", f"token ttl_s must be a positive number of seconds, got {ttl_s!r}")
        if uses is not None and uses < 1:
            raise ProtocolError("bad_body", f"token uses must be a whole number >= 1, got {uses!r}")
        if len(note) > MAX_TOKEN_NOTE_CHARS:
            raise ProtocolError("bad_body", f"token note must be text of at most {MAX_TOKEN_NOTE_CHARS} characters")
        now = time.time()
        token, rec = issue_token(now=now, ttl_s=self.cfg.admissions.token_ttl_s if ttl_s is None else ttl_s,
                                 uses=self.cfg.admissions.token_uses if uses is None else uses, note=note)
        with self.store.write() as db:
            db.execute("INSERT INTO tokens(id, hash, created_at, expires_at, uses_left, uses_total, note) "
                       "VALUES (?,?,?,?,?,?,?)",
                       (rec.id, rec.hash, rec.created_at, rec.expires_at, rec.uses_left, rec.uses_left, note))
        log.info("join token %s created (%d uses, expires %s)", rec.id, rec.uses_left, iso(rec.expires_at))
        return {"id": rec.id, "token": token, "expires_at": rec.expires_at, "uses": rec.uses_left}

    def install_token(self, id: str, hash: str, created_at: float, expires_at: float, uses: int,
                      note: str) -> dict[str, Any]:
        """Spanner: a token created at one bolt, installed at the others (by its hash only) so
        any bolt that owns the join can spend it. Uses are counted by the bolt that serves it."""
        if not (0 < len(id) <= MAX_TOKEN_ID_CHARS and _TOKEN_HASH_RE.fullmatch(hash) and uses >= 1
                and len(note) <= MAX_TOKEN_NOTE_CHARS):
            raise ProtocolError("bad_body", "token.install expects id (text), hash (64 hex digits), uses (>= 1), "
                                            "created_at and expires_at (seconds) and a note of at most 200 characters")
        with self.store.write() as db:
            db.execute("INSERT INTO tokens(id, hash, created_at, expires_at, uses_left, uses_total, note) "
                       "VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO NOTHING",
                       (id, hash, created_at, expires_at, uses, uses, note))
        return {"id": id}

    def tokens(self) -> list[dict[str, Any]]:
        return [{"id": r[0], "created_at": r[1], "expires_at": r[2], "uses_left": r[3], "uses_total": r[4], "note": r[5]}
                for r in self.store.query("SELECT id, created_at, expires_at, uses_left, uses_total, note "
                                          "FROM tokens ORDER BY created_at")]

    def revoke(self, envoy_id: str) -> dict[str, Any]:
        """Revoke an envoy by id or unambiguous prefix: its record and every certificate."""
        hook = self.hook
        try:
            target = self.fleet.show(envoy_id, runs=0)["id"]
        except ProtocolError:
            if hook is None or not _ENVOY_ID_RE.fullmatch(envoy_id):
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
