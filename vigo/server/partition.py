"""The partition: bootstrap, the batch path, and the cores that hold its state. No Ray here.

The member actor (vigo/actors/member.py) is a thin shell over one ``Partition`` while it is
primary. Envoy requests arrive in batches (``handle_batch``: one actor call carries many
envoys), and each batch is one database transaction, so a results batch is acknowledged only
after it committed. Admin operations arrive one by one (``admin``) and are dispatched through
the table in vigo/server/admin.py.

The state is kept by plain cores over the one store, wired here:

    fleet        vigo/server/fleet.py     check-ins, reports, retention, envoy listings
    admissions   vigo/server/admit.py     join tokens, joins, renewals, revocations
    stack        vigo/server/stack.py     pushes, bundles, the current serial
    secrets      vigo/server/secrets.py   sealed secret values
    archive      vigo/server/archive.py   the continuous archive, backups

First start bootstraps the partition: term 1, the fleet CA, the gateway's server certificate,
the bundle-signing key and the secrets master key, each recorded in the database's trees (so
they travel in the one stream with everything else) and materialised under DATA_DIR.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vigo import config as config_mod
from vigo.crypto.keys import key_id, public_pem
from vigo.errors import ConfigError, ProtocolError, StoreError, VigoError, code_of
from vigo.hostaddr import local_addresses
from vigo.server import admin as admin_ops
from vigo.server.admissions import FleetCA, RevocationSet
from vigo.server.admit import AdmissionsCore
from vigo.server.archive import ArchiveCore
from vigo.server.fleet import FleetCore
from vigo.server.secrets import SecretBox, SecretsCore
from vigo.server.stack import StackCore
from vigo.state.store import Store

log = logging.getLogger("vigo.server.partition")


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
        # The cores share the store and the settings; the term is read when used, because a
        # promotion raises it while the partition runs.
        self.secrets = SecretsCore(self.store, SecretBox(self._tree("secrets", "master.key")))
        self.stack = StackCore(
            self.store, self.cfg, self.secrets,
            serialization.load_pem_private_key(self._tree("secrets", "bundle-signing.key"), None),
            term=lambda: self.term)
        self.fleet = FleetCore(self.store, self.cfg, current_serial=self.stack.current_serial)
        self.admissions = AdmissionsCore(
            self.store, self.cfg, FleetCA(self._tree("tls", "ca.key"), self._tree("tls", "ca.pem")),
            self.fleet, tree=self._tree, term=lambda: self.term)
        self.archive = ArchiveCore(self.store, self.cfg)
        log.info("partition %s open in %s, term %d", self.cfg.partition, data_dir, self.term)

    # --- names the actors, the spanner bolt and the tests use -----------------------------

    @property
    def ca(self) -> FleetCA:
        return self.admissions.ca

    @property
    def archiver(self) -> Any:
        """The running Archiver once start_archive() made one, else None."""
        return self.archive.archiver

    @property
    def admissions_hook(self) -> Any:
        """Spanner: the bolt's roster (vigo.server.spanner.bolt.BoltCore), set by the bolt."""
        return self.admissions.hook

    @admissions_hook.setter
    def admissions_hook(self, hook: Any) -> None:
        self.admissions.hook = hook

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
        return self.admissions.revocations()

    def current_serial(self) -> int | None:
        return self.stack.current_serial()

    def bundle_bytes(self, serial: int) -> bytes:
        """The full bundle (secrets included) an envoy receives for ``serial``."""
        return self.stack.bundle_bytes(serial)

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
            self.fleet.retain(db, touched, now=now)
        self.store.checkpoint()
        return answers

    def _one(self, db: apsw.Connection, item: dict[str, Any], now: float, current: int | None,
             touched: set[str]) -> dict[str, Any]:
        kind, body, envoy_id = item["type"], item["body"], item.get("envoy_id")
        if kind == "join":
            return self.admissions.join(db, body, now)
        if envoy_id is None:
            raise ProtocolError("unauthenticated", f"{kind} needs a client certificate from `vigo-envoy join`")
        self.admissions.check_envoy(db, envoy_id, body, now)
        if kind == "checkin":
            return self.fleet.checkin(db, envoy_id, body, now=now, current=current, term=self.term)
        if kind == "results":
            answer = self.fleet.results(db, envoy_id, body, now=now, term=self.term)
            touched.add(envoy_id)
            return answer
        if kind == "renew":
            return self.admissions.renew(db, envoy_id, body, now, item)
        raise ProtocolError("unknown_type", f"the primary does not handle {kind!r}")

    # --- admin --------------------------------------------------------------------------

    def admin(self, op: str, args: dict[str, Any]) -> Any:
        """Run one admin operation of the table in vigo/server/admin.py, which refuses unknown
        operations and checks the arguments' names and types before a core runs it."""
        return admin_ops.dispatch(self, op, args)

    def status(self) -> dict[str, Any]:
        fleet = self.fleet.summary()
        return {
            "partition": self.cfg.partition,
            "term": self.term,
            "data_dir": str(self.store.data_dir),
            "envoys": fleet["envoys"],
            "status_counts": fleet["status_counts"],
            "bundle": self.stack.current(),
            "runs_stored": fleet["runs_stored"],
            "queued_reports": fleet["queued_reports"],
            "wal_pages": self.store.wal_pages(),
            "stream": self.stream_status(),
            "ca_fingerprint": self.admissions.ca.fingerprint(),
            "signing_key_id": key_id(self.stack.signing_key.public_key()),
        }

    def spanner_status(self) -> dict[str, Any]:
        # Answered by the gateway when spanner is on; reaching a partition means it is off.
        raise ConfigError(f"spanner is not on for partition {self.cfg.partition}: list the bolts' hosts in "
                          "spanner.bolts in server.yaml and deploy again (docs/spanner.md)")

    # --- spanner: one fleet CA and signing key for every bolt ---------------------------

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
        self.admissions.ca = ca
        self.stack.signing_key = serialization.load_pem_private_key(material["bundle-signing.key"], None)
        log.info("bolt %s adopted the fleet CA %s", self.cfg.partition, ca.fingerprint()[:16])
        return True

    # --- the archive, the term and periodic upkeep ---------------------------------------

    def start_archive(self) -> dict[str, Any] | None:
        return self.archive.start()

    def set_term(self, term: int) -> None:
        """Adopt a higher term (at promotion): from now on every answer and bundle carries it."""
        if term <= self.term:
            raise StoreError(f"term {term} is not above the current term {self.term}")
        with self.store.write() as db:
            self.store.set_meta(db, "term", term)
        log.info("partition %s now at term %d (was %d)", self.cfg.partition, term, self.term)
        self.term = term

    def upkeep_steps(self) -> list[tuple[str, Callable[[], object]]]:
        """Periodic upkeep, step by step (named for the log): checkpoint when the WAL is long,
        snapshot when the archive's schedule says so. The member runs each on its own guard."""
        return [("checkpoint", self.store.checkpoint), ("scheduled snapshot", self.archive.snapshot_if_due)]

    def tick(self) -> None:
        """Every upkeep step, in order (the first error stops the round: callers that must
        keep going run ``upkeep_steps`` one by one, as the member does)."""
        for _name, step in self.upkeep_steps():
            step()

    def stream_status(self) -> dict[str, Any]:
        return self.archive.status()

    def close(self) -> None:
        self.archive.close()
        self.store.close()


def error_of(exc: Exception) -> dict[str, Any]:
    """The error-frame body for an exception raised while answering one request; the code is
    ``errors.code_of`` (the one table of codes, shared with the envoy)."""
    return {"code": code_of(exc), "reason": exc.reason if isinstance(exc, ProtocolError) else str(exc)}


def _local_ips() -> list[str]:
    try:
        return [ip for ip in local_addresses() if ":" not in ip]
    except Exception:  # the certificate still names 127.0.0.1: a bootstrap never fails on this
        return []
