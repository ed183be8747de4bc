"""`Member`: the actor that holds one member of a partition, whose role is primary or standby.

A thin shell over plain cores: ``vigo.server.partition.Partition`` when primary,
``vigo.server.peer.standby.StandbyCore`` when standby,
``vigo.server.peer.replication.ReplicationLog`` for the standbys a primary feeds, and
``vigo.server.spanner.bolt.BoltCore`` when the partition is a spanner bolt; what it does with
them that needs no other actor (which role a route gives, the data dir in each role, the upkeep
steps, what it reports) is ``vigo.server.peer.roles``. Every Ray call goes through the runtime
(vigo.actors.runtime).

The role is not fixed at birth: the control actor's topology decides it at every start (a
restarted old primary whose partition moved on comes back as a standby), ``promote`` turns a
standby into the primary at a higher term, and ``fence`` (or any message from a higher term)
turns a primary into a standby. Actor names are birth names (``primary-p0``,
``standby-p0-<host>``, ``bolt-<host>``) and stay so: control's topology, redeploys and operators
know members by them; `vigocli server status` shows who holds which role now.

The constructor never fails because of another actor (Ray gives up on an actor whose
constructor raises, whatever ``max_restarts`` says): a start thread asks control for the route,
retrying until control answers, and only then opens the database in its role; the constructor
waits for it at most ``INIT_WAIT_S`` and returns either way. Until the role is taken the member
answers ``ping`` with role ``starting`` and other calls wait for it (``START_WAIT_S``), then
fail as "not primary", which gateways and the sender retry. With no control actor at all (a
member started by hand) it starts in its birth role.

A sync actor on purpose: Ray runs one method at a time, the single-writer discipline the
database needs. Two threads help, neither touching the database outside the lock every method
takes: upkeep (checkpoints, scheduled snapshots) and the replication sender (messages to the
standbys, which need no lock; synchronous mode waits for its acknowledgements).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from vigo import config as config_mod
from vigo.actors.runtime import RAY, Runtime
from vigo.errors import NotPrimaryError, ProtocolError, RosterError, VigoError
from vigo.retry import Backoff
from vigo.server.partition import Partition, error_of
from vigo.server.peer import roles
from vigo.server.peer.replication import ReplicationLog, Work
from vigo.server.peer.standby import StandbyCore
from vigo.server.spanner.bolt import BoltCore, bolt_name
from vigo.server.topology import member_revision

log = logging.getLogger("vigo.actors.member")

#: Longest wait for control's answer to the start thread's route question, seconds.
ROUTE_TIMEOUT_S = 5.0
#: Retry waits of the start thread while control does not answer: full jitter, from 0.2 s up to
#: 5 s, so a member restarted with control is in its role within a few seconds of control.
START_RETRY_BASE_S = 0.2
START_RETRY_CAP_S = 5.0
#: How long a call waits for the start thread before it fails (the caller retries), seconds.
START_WAIT_S = 10.0
#: How long the constructor waits for the start thread before returning anyway, seconds.
INIT_WAIT_S = 5.0

#: How often envoy status counts are recomputed for the metrics, seconds.
STATUS_EXPORT_S = 30.0
#: How often the upkeep thread checks for a due checkpoint or snapshot, seconds.
UPKEEP_INTERVAL_S = 1.0
#: How long the sender waits for one standby's reply before counting the call failed, seconds.
REPLICATION_CALL_TIMEOUT_S = 10.0
#: Poll period of the sender when nothing is in flight (it is also woken by every commit), s.
SENDER_IDLE_S = 0.05
#: Spanner: how often a bolt's roster loop runs (pushes are further paced by the roster), s.
ROSTER_TICK_S = 0.02
#: Spanner: how often a bolt polls its peers' liveness, and how long it waits for an answer, s.
LIVENESS_POLL_S = 0.5


def _serialised(method):
    """Run an actor method under the member lock (shared with the upkeep thread), once the
    member is in its role."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        self._wait_started()
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Member:
    def __init__(self, data_dir: str, cfg: dict[str, Any] | None = None, name: str | None = None,
                 role: str = "primary", rt: Runtime = RAY) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.rt = rt
        self.cfg = config_mod.from_dict(cfg) if cfg is not None else None
        self.data_dir = data_dir
        self.name = name or f"primary-{self.cfg.partition if self.cfg else 'p0'}"
        self.partition_name = self.cfg.partition if self.cfg else "p0"
        self._lock = threading.RLock()
        self.partition: Partition | None = None
        self.standby: StandbyCore | None = None
        self.replication: ReplicationLog | None = None
        self.bolt: BoltCore | None = None  # spanner: when this member is a bolt's primary
        self._stop = threading.Event()
        self._sender_stop = threading.Event()
        # What defines this member: a redeploy whose wanted revision differs restarts it.
        self.revision = member_revision(data_dir, cfg, self.name)
        self._birth_role = role
        self._started = threading.Event()
        self.start_error: str | None = None
        # Metric names keep the "primary" of the days when this class was named so: dashboards
        # and alerts know them by these names.
        self._tags = {"partition": self.partition_name}
        self._requests = rt.counter("vigo_primary_requests_total", "envoy requests answered, by type",
                                    ("partition", "type"))
        self._batch = rt.histogram("vigo_primary_batch_size", "envoy requests per batch call",
                                   [1, 4, 16, 64, 256, 1024], ("partition",))
        self._envoys = rt.gauge("vigo_envoys", "envoys by derived status", ("partition", "status"))
        self._queued = rt.gauge("vigo_envoy_queued_reports", "reports envoys said they hold, summed", ("partition",))
        self._lag = rt.gauge("vigo_replication_lag_bytes", "WAL bytes a standby has not acknowledged",
                             ("partition", "standby"))
        self._archive_lag = rt.gauge("vigo_archive_lag_seconds", "age of the oldest commit not yet archived",
                                     ("partition",))
        self._next_status_export = 0.0
        threading.Thread(target=self._start, name="vigo-start", daemon=True).start()
        threading.Thread(target=self._upkeep, name="vigo-upkeep", daemon=True).start()
        # Only so that Ray's one-time repr of this actor names its role in the common case; the
        # constructor returns either way.
        self._started.wait(INIT_WAIT_S)

    # --- roles -----------------------------------------------------------------------------------

    def _route(self) -> dict[str, Any] | None:
        """Control's route for this partition; None when there is no control actor at all (a
        member started outside a deployment) or control knows no route yet (the first deploy).
        Raises while control exists but does not answer (it is restarting): the caller retries,
        since starting in the birth role then could make a second primary."""
        try:
            control = self.rt.actor("control")
        except ValueError:
            return None
        return self.rt.call(control, "route", self.partition_name, timeout_s=ROUTE_TIMEOUT_S)

    def _start(self) -> None:
        """The start thread: learn the role from control (retrying until it answers), then
        open the database in it (retrying a failure, which ``ping`` reports meanwhile)."""
        # A cap below the base (tests lower it) bounds every wait: the same as base = cap.
        backoff = Backoff(min(START_RETRY_BASE_S, START_RETRY_CAP_S), START_RETRY_CAP_S)
        while not self._stop.is_set():
            try:
                route = self._route()
                with self._lock:
                    self._take_role(route)
                self.start_error = None
                self._started.set()
                return
            except Exception as exc:
                lines = str(exc).strip().splitlines()
                self.start_error = f"{type(exc).__name__}: {lines[-1][:200] if lines else ''}"
                wait = backoff.delay()
                log.log(backoff.log_level(), "%s: not started yet (attempt %d: %s); retrying in %.1f s",
                        self.name, backoff.attempt, self.start_error, wait)
                self._stop.wait(wait)

    def _take_role(self, route: dict[str, Any] | None) -> None:
        if roles.role_for(self._birth_role, self.name, route) == "primary":
            self._become_primary(standbys=(route or {}).get("standbys"))
        else:
            self._become_standby(f"started as standby (primary: {(route or {}).get('primary', 'unknown')})")
            if route:  # fenced from the start: an old-term stream is refused before any arrives
                self.standby.observe_term(int(route.get("term", 0)))

    def _wait_started(self) -> None:
        if self._started.is_set():
            return
        if not self._started.wait(START_WAIT_S):
            raise NotPrimaryError(f"{self.name} is still starting (it learns its role from control first"
                                  f"{'; ' + self.start_error if self.start_error else ''}); retry")

    def _become_primary(self, *, standbys: list[str] | None = None, term: int | None = None) -> None:
        data_dir = Path(self.data_dir)
        if self.standby is not None or term is not None:  # promoted
            roles.start_new_generation(data_dir)
        self.standby = None
        names = [s for s in (standbys if standbys is not None else roles.configured_standbys(self.cfg))
                 if s != self.name]
        rlog = roles.replication_log(names, self.cfg)
        self.partition = Partition(data_dir, self.cfg, stream_consumers=[rlog] if rlog else None)
        if term is not None and term > self.partition.term:
            self.partition.set_term(term)
        self.partition.start_archive()
        if rlog is not None:
            self.replication = rlog
            if rlog.snapshot is None:  # an existing generation continues: start standbys from a known point
                self.partition.store.stream.snapshot()
            self._sender_stop = threading.Event()  # one per sender: an old one may still be winding down
            threading.Thread(target=self._send_loop, args=(self.replication, self._sender_stop),
                             name="vigo-replication", daemon=True).start()
        self._start_bolt()
        log.info("%s is primary of %s at term %d (standbys: %s)", self.name, self.partition_name,
                 self.partition.term, ", ".join(names) or "none")

    def _start_bolt(self) -> None:
        """Spanner: attach the admissions roster and start replicating it with the sibling bolts."""
        cfg = self.partition.cfg
        bolts = [bolt_name(h) for h in cfg.spanner.bolts]
        # A bolt is a partition: whichever member is its primary (the first one, or a promoted
        # standby) is that bolt in the roster, with a fresh incarnation.
        me = cfg.partition
        if me not in bolts:
            return
        self.bolt = BoltCore(self.partition, me, bolts, cfg.spanner)
        self._roster_stop = threading.Event()
        threading.Thread(target=self._roster_loop, args=(self.bolt, [b for b in bolts if b != me],
                                                         self._roster_stop), name="vigo-roster", daemon=True).start()

    def _become_standby(self, reason: str) -> None:
        self._sender_stop.set()
        if self.bolt is not None:
            self._roster_stop.set()
            self.bolt = None
        self.replication = None
        if self.partition is not None:
            self.partition.close()
            self.partition = None
        data_dir = Path(self.data_dir)
        roles.prepare_standby_dir(data_dir)
        self.standby = StandbyCore(data_dir, self.name)
        aside = roles.set_aside_fenced_database(data_dir, self.standby)
        if aside is not None:
            log.warning("%s: its database (possibly with writes after the fork) is set aside as %s; "
                        "resynchronising from the primary", self.name, aside)
        log.info("%s is a standby of %s: %s", self.name, self.partition_name, reason)

    def _require_primary(self) -> Partition:
        if self.partition is None:
            term = self.standby.term if self.standby else "?"
            raise NotPrimaryError(f"{self.name} is a standby of partition {self.partition_name} "
                                  f"(has seen term {term}); the gateway routes to the primary")
        return self.partition

    # --- threads ---------------------------------------------------------------------------------

    def _upkeep(self) -> None:
        while not self._stop.wait(UPKEEP_INTERVAL_S):
            self._upkeep_round()

    def _upkeep_round(self) -> None:
        """One upkeep round. Every step is guarded on its own: one that fails is logged (which
        step, the error) and the others still run, so a failing checkpoint cannot hold back the
        scheduled snapshot, the roster's save, the standbys' snapshot or the metrics."""
        with self._lock:
            partition, bolt, rlog = self.partition, self.bolt, self.replication
            if partition is not None:
                self._run_guarded(roles.upkeep_steps(partition, bolt, rlog))
        self._run_guarded([("metrics export", self._export_lag)])

    def _run_guarded(self, steps: list[tuple[str, Any]]) -> None:
        for what, step in steps:
            try:
                step()
            except Exception as exc:  # one failed step must skip neither the others nor the next round
                log.exception("%s upkeep: %s failed: %s: %s", self.name, what, type(exc).__name__, exc)

    def _send_loop(self, rlog: ReplicationLog, stop: threading.Event) -> None:
        """Feed every standby: at most one message in flight each, replies to the log."""
        rt = self.rt
        handles: dict[str, Any] = {}
        inflight: dict[Any, tuple[str, Work, float]] = {}
        busy: set[str] = set()
        while not stop.is_set():
            partition = self.partition
            term = partition.term if partition is not None else 0
            for name in rlog.tracks:
                if name in busy:
                    continue
                try:
                    work = rlog.work_for(name)
                    if work is None:
                        continue
                    handle = handles.get(name) or rt.actor(name)
                    handles[name] = handle
                    ref = self._submit(rt, handle, work, term)
                except Exception as exc:
                    handles.pop(name, None)
                    rlog.on_failure(name, f"cannot reach {name}: {type(exc).__name__}: {exc}")
                    continue
                inflight[ref] = (name, work, time.monotonic())
                busy.add(name)
            if not inflight:
                rlog.wait_for_work(SENDER_IDLE_S)
                continue
            ready, _ = rt.wait(list(inflight), num_returns=1, timeout_s=SENDER_IDLE_S)
            for ref in ready:
                name, work, _ = inflight.pop(ref)
                busy.discard(name)
                try:
                    reply = rt.result(ref)
                except Exception as exc:
                    handles.pop(name, None)
                    rlog.on_failure(name, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}")
                    continue
                rlog.on_reply(name, work, reply)
                if reply.get("status") == "fenced" and int(reply.get("term") or 0) > term:
                    threading.Thread(target=self.fence, args=(int(reply["term"]),), daemon=True).start()
            now = time.monotonic()
            for ref, (name, _work, sent) in list(inflight.items()):
                if now - sent > REPLICATION_CALL_TIMEOUT_S:
                    inflight.pop(ref)
                    busy.discard(name)
                    handles.pop(name, None)
                    rlog.on_failure(name, f"no reply within {REPLICATION_CALL_TIMEOUT_S:.0f} s")

    def _roster_loop(self, core: Any, peers: list[str], stop: threading.Event) -> None:
        """Spanner: poll peers' liveness, push roster deltas and digests, route the answers.
        Messages are fire-and-forget: the roster tolerates loss, duplication and reordering."""
        rt = self.rt
        handles: dict[str, Any] = {}
        inflight: dict[Any, str] = {}
        next_poll = 0.0

        def handle(peer: str) -> Any | None:
            """The member serving bolt ``peer`` now (control's route: a promoted standby after a
            failover), cached until a call to it fails."""
            if peer not in handles:
                try:
                    control = rt.actor("control")  # looked up here: control may be restarting
                    member = (rt.call(control, "route", peer, timeout_s=LIVENESS_POLL_S) or {}).get("primary", peer)
                    handles[peer] = rt.actor(member)
                except Exception:
                    return None
            return handles[peer]

        def route(out: list[tuple[str, bytes]]) -> None:
            while out:
                peer, data = out.pop()
                if peer == core.name:
                    out.extend(core.receive(data))
                    continue
                h = handle(peer)
                if h is not None and len(inflight) < 1000:
                    inflight[rt.submit(h, "roster_receive", data)] = peer

        while not stop.wait(ROSTER_TICK_S):
            try:
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + LIVENESS_POLL_S
                    pings = {rt.submit(h, "bolt_ping"): p for p in peers if (h := handle(p)) is not None}
                    ready, _ = rt.wait(list(pings), timeout_s=LIVENESS_POLL_S)
                    alive = [core.name]
                    for ref in ready:
                        try:
                            rt.result(ref)
                            alive.append(pings[ref])
                        except Exception:
                            handles.pop(pings[ref], None)
                    core.set_live(alive)
                route(core.tick())
                if inflight:
                    done, _ = rt.wait(list(inflight), timeout_s=0)
                    for ref in done:
                        peer = inflight.pop(ref)
                        try:
                            route(list(rt.result(ref)))
                        except Exception:
                            handles.pop(peer, None)  # lost: the roster resends or repairs
            except Exception:
                log.exception("%s roster loop round failed", self.name)

    def bolt_ping(self) -> dict[str, Any]:
        """Lock-free liveness answer for sibling bolts and gateways."""
        bolt = self.bolt
        return {"name": bolt.name if bolt else self.name, "member": self.name, "bolt": bolt is not None,
                "ready": bool(bolt and bolt.ready)}

    def roster_receive(self, data: bytes) -> list[tuple[str, bytes]]:
        """A roster message from a sibling; returns the messages it causes (acks, repairs)."""
        bolt = self.bolt
        if bolt is None:
            return []
        try:
            return bolt.receive(data)
        except RosterError as exc:  # junk or an unknown version: drop it, keep serving
            log.warning("%s dropped a roster message (%d bytes): %s", self.name, len(data), exc)
            return []

    @_serialised
    def bolt_info(self) -> dict[str, Any]:
        return roles.bolt_info(self.name, self.bolt, self.partition, self.replication)

    @_serialised
    def fleet_material(self) -> dict[str, bytes]:
        return self._require_primary().fleet_material()

    @_serialised
    def adopt_fleet_material(self, material: dict[str, bytes]) -> bool:
        return self._require_primary().adopt_fleet_material(material)

    @staticmethod
    def _submit(rt: Runtime, handle: Any, work: Work, term: int) -> Any:
        if work.kind == "probe":
            return rt.submit(handle, "standby_position")
        if work.kind == "segments":
            return rt.submit(handle, "receive_segments", work.segments, term)
        snap = work.snapshot
        assert snap is not None
        return rt.submit(
            handle, "receive_snapshot_chunk", generation=snap.generation, index=snap.index, offset=work.offset,
            data=work.data, size=snap.size, sha256=snap.sha256, term=term, created_at=snap.created_at)

    # --- synchronous mode ------------------------------------------------------------------------

    def _confirmed(self, position: tuple[str, int, int] | None) -> str | None:
        """In synchronous mode, None once a standby holds ``position`` (everything the caller
        committed), else why the caller must not be told its write is safe. Called without the
        member lock: other batches go on while this one waits for its standby."""
        return roles.unconfirmed(self.partition, self.replication, position)

    def _position(self) -> tuple[str, int, int] | None:
        return self.partition.store.stream.position() if self.partition is not None else None

    # --- the primary's API (what gateways call) -------------------------------------------------

    #: Envoy requests whose acknowledgement promises durability, so in synchronous mode they
    #: wait for a standby. A check-in only refreshes last-seen fields: it is answered at once.
    DURABLE_TYPES = frozenset({"results", "join", "renew"})

    def handle_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self._wait_started()
        with self._lock:
            partition = self._require_primary()
            answers = partition.handle_batch(items)
            position = self._position()
            self._batch.observe(len(items), tags=self._tags)
            counts: dict[str, int] = {}
            for item in items:
                counts[item["type"]] = counts.get(item["type"], 0) + 1
            for kind, n in counts.items():
                self._requests.inc(n, tags={**self._tags, "type": kind})
            self._export_status()
        if any(item.get("type") in self.DURABLE_TYPES for item in items):
            unconfirmed = self._confirmed(position)
            if unconfirmed is not None:
                answers = [{"error": {"code": "unavailable", "reason": unconfirmed}}
                           if item.get("type") in self.DURABLE_TYPES else answer
                           for item, answer in zip(items, answers, strict=True)]
        return answers

    def _export_status(self) -> None:
        """Envoy status counts for the dashboard, at most every STATUS_EXPORT_S (it reads
        every envoy row, so not on each batch)."""
        now = time.monotonic()
        if now < self._next_status_export or self.partition is None:
            return
        self._next_status_export = now + STATUS_EXPORT_S
        status = self.partition.admin("status", {})
        for name, n in status["status_counts"].items():
            self._envoys.set(n, tags={**self._tags, "status": name})
        self._queued.set(status["queued_reports"], tags=self._tags)

    def _export_lag(self) -> None:
        rlog, partition = self.replication, self.partition
        if rlog is not None:
            for s in rlog.status():
                self._lag.set(float(s["lag_bytes"]), tags={**self._tags, "standby": s["name"]})
        if partition is not None and partition.archiver is not None:
            self._archive_lag.set(float(partition.archiver.status()["lag_s"]), tags=self._tags)

    def admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Admin answers travel as {"ok": result} or {"error": {...}}: a user mistake is data,
        not an exception that Ray would wrap in a traceback."""
        try:
            self._wait_started()
            with self._lock:
                partition = self._require_primary()
                before = self._position()
                result = partition.admin(op, args)
                if op == "status":
                    result["replication"] = self.replication_status()
                    result["primary"] = self.name
                after = self._position()
            if after != before:  # it wrote: in synchronous mode a standby must hold it first
                unconfirmed = self._confirmed(after)
                if unconfirmed is not None:
                    return {"error": {"code": "unavailable", "reason": unconfirmed}}
            return {"ok": result}
        except (ProtocolError, VigoError) as exc:
            return {"error": error_of(exc)}
        except Exception as exc:  # a bug or a failing disk: the operator needs the traceback
            log.exception("admin %s failed", op)
            return {"error": error_of(exc)}

    @_serialised
    def gateway_material(self, hostnames: list[str] | None = None, ips: list[str] | None = None) -> dict[str, Any]:
        return self._require_primary().gateway_material(hostnames, ips)

    @_serialised
    def bundle_bytes(self, serial: int) -> bytes:
        return self._require_primary().bundle_bytes(serial)

    @_serialised
    def revocations(self) -> list[dict[str, Any]]:
        return self._require_primary().revocations().to_list()

    def ping(self) -> dict[str, Any]:
        # Lock-free on purpose: `server promote` asks members where they are with a short
        # timeout, and a member busy applying a large message must still answer.
        info = self.member_info()
        return {"partition": self.partition_name, **info, "revision": self.revision,
                **({"error": self.start_error} if self.start_error else {})}

    # --- the replication API (what the primary and `server promote` call) -------------------------

    def member_info(self) -> dict[str, Any]:
        return roles.member_info(self.name, os.getpid(), self.partition, self.replication, self.standby)

    @_serialised
    def standby_position(self) -> dict[str, Any]:
        if self.standby is None:
            return {"status": "fenced" if self.partition else "need_snapshot", "position": None,
                    "term": self.partition.term if self.partition else 0,
                    "reason": f"{self.name} is a primary, not a standby"}
        return self.standby.reply()

    @_serialised
    def inject_fault(self, kind: str, value: float) -> dict[str, Any]:
        """Fault injection for drills and tests. ``standby_apply_delay_s``: a standby sleeps this
        long before applying each message (a slow disk or link), so it falls behind on purpose."""
        if kind != "standby_apply_delay_s":
            raise ValueError(f"unknown fault {kind!r} (known: standby_apply_delay_s)")
        self._apply_delay_s = float(value)
        return {"fault": kind, "value": self._apply_delay_s}

    def receive_segments(self, segments: list[Any], term: int) -> dict[str, Any]:
        if getattr(self, "_apply_delay_s", 0.0) > 0:
            time.sleep(self._apply_delay_s)  # outside the lock: the member still answers pings
        return self._receive_segments(segments, term)

    @_serialised
    def _receive_segments(self, segments: list[Any], term: int) -> dict[str, Any]:
        if self.standby is None and not self._yield_to(term):
            return {"status": "fenced", "position": None, "term": self.partition.term,
                    "reason": f"{self.name} is primary at term {self.partition.term} >= {term}"}
        return self.standby.receive_segments(segments, term)

    @_serialised
    def receive_snapshot_chunk(self, **chunk: Any) -> dict[str, Any]:
        if self.standby is None and not self._yield_to(int(chunk["term"])):
            return {"status": "fenced", "position": None, "term": self.partition.term,
                    "reason": f"{self.name} is primary at term {self.partition.term}"}
        return self.standby.receive_snapshot_chunk(**chunk)

    def _yield_to(self, term: int) -> bool:
        """A primary hearing from a higher term was replaced while it was away: step down."""
        if self.partition is not None and term > self.partition.term:
            self._become_standby(f"fenced: replication at term {term} > own term {self.partition.term}")
            return True
        return False

    @_serialised
    def fence(self, term: int) -> dict[str, Any]:
        """A promotion elsewhere is at ``term``: a primary below it stops writing and becomes a
        standby; a standby records the term so it refuses the old primary's stream."""
        if self.partition is not None and term > self.partition.term:
            self._become_standby(f"fenced by a promotion to term {term}")
        if self.standby is not None:
            self.standby.observe_term(term)
        return self.member_info()

    @_serialised
    def promote(self, term: int, standbys: list[str]) -> dict[str, Any]:
        """Become the primary at ``term`` serving what this standby holds, feeding ``standbys``."""
        if self.partition is not None:
            if term > self.partition.term:
                self.partition.set_term(term)
            return self.member_info()
        started = time.monotonic()
        held = self.member_info()
        self.standby.observe_term(term)
        self._become_primary(standbys=standbys, term=term)
        info = self.member_info()
        info.update({"held": held, "promotion_s": round(time.monotonic() - started, 3)})
        return info

    def replication_status(self) -> dict[str, Any]:
        return roles.replication_status(self.partition, self.replication)

    def __repr__(self) -> str:
        if getattr(self, "partition", None) is not None:
            return f"vigo-primary[{self.partition_name} term {self.partition.term}]"
        if getattr(self, "standby", None) is not None:
            return f"vigo-standby[{self.partition_name} term {self.standby.term}]"
        return "vigo-member[starting]"
