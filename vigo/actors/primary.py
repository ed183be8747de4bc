"""`Primary`: the actor that owns one partition's database. A thin shell over
``vigo.server.partition.Partition``; every method is one call into it.

A sync actor on purpose: Ray runs one method at a time, which is the single-writer discipline
the database needs. One background thread does periodic upkeep (checkpoints, scheduled
snapshots); it takes the same lock as every method, so the partition still sees one caller at
a time. A restarted primary (max_restarts=-1) reopens its data dir and carries on.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from typing import Any

from vigo import config as config_mod
from vigo.errors import ProtocolError, VigoError
from vigo.server.partition import Partition, error_of

log = logging.getLogger("vigo.actors.primary")

#: How often envoy status counts are recomputed for the metrics, seconds.
STATUS_EXPORT_S = 30.0
#: How often the upkeep thread checks for a due checkpoint or snapshot, seconds.
UPKEEP_INTERVAL_S = 1.0


def _serialised(method):
    """Run an actor method under the partition lock (shared with the upkeep thread)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


class Primary:
    def __init__(self, data_dir: str, cfg: dict[str, Any] | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        parsed = config_mod.from_dict(cfg) if cfg is not None else None
        self._lock = threading.RLock()
        self.partition = Partition(data_dir, parsed)
        self.partition.start_archive()
        self._stop = threading.Event()
        threading.Thread(target=self._upkeep, name="vigo-upkeep", daemon=True).start()
        from ray.util.metrics import Counter, Gauge, Histogram

        tag = {"partition": self.partition.cfg.partition}
        self._tags = tag
        self._requests = Counter("vigo_primary_requests_total", "envoy requests answered, by type",
                                 tag_keys=("partition", "type"))
        self._batch = Histogram("vigo_primary_batch_size", "envoy requests per batch call",
                                boundaries=[1, 4, 16, 64, 256, 1024], tag_keys=("partition",))
        self._envoys = Gauge("vigo_envoys", "envoys by derived status", tag_keys=("partition", "status"))
        self._queued = Gauge("vigo_envoy_queued_reports", "reports envoys said they hold, summed",
                             tag_keys=("partition",))
        self._next_status_export = 0.0

    def _upkeep(self) -> None:
        while not self._stop.wait(UPKEEP_INTERVAL_S):
            try:
                with self._lock:
                    self.partition.tick()
            except Exception:  # one failed upkeep round must not end the thread
                log.exception("primary upkeep failed")

    @_serialised
    def handle_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        answers = self.partition.handle_batch(items)
        self._batch.observe(len(items), tags=self._tags)
        counts: dict[str, int] = {}
        for item in items:
            counts[item["type"]] = counts.get(item["type"], 0) + 1
        for kind, n in counts.items():
            self._requests.inc(n, tags={**self._tags, "type": kind})
        self._export_status()
        return answers

    def _export_status(self) -> None:
        """Envoy status counts for the dashboard, at most every STATUS_EXPORT_S (it reads
        every envoy row, so not on each batch)."""
        now = time.monotonic()
        if now < self._next_status_export:
            return
        self._next_status_export = now + STATUS_EXPORT_S
        status = self.partition.admin("status", {})
        for name, n in status["status_counts"].items():
            self._envoys.set(n, tags={**self._tags, "status": name})
        self._queued.set(status["queued_reports"], tags=self._tags)

    @_serialised
    def admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Admin answers travel as {"ok": result} or {"error": {...}}: a user mistake is data,
        not an exception that Ray would wrap in a traceback."""
        try:
            return {"ok": self.partition.admin(op, args)}
        except (ProtocolError, VigoError) as exc:
            return {"error": error_of(exc)}
        except Exception as exc:  # a bug or a failing disk: the operator needs the traceback
            log.exception("admin %s failed", op)
            return {"error": error_of(exc)}

    @_serialised
    def gateway_material(self, hostnames: list[str] | None = None, ips: list[str] | None = None) -> dict[str, Any]:
        return self.partition.gateway_material(hostnames, ips)

    @_serialised
    def bundle_bytes(self, serial: int) -> bytes:
        return self.partition.bundle_bytes(serial)

    @_serialised
    def revocations(self) -> list[dict[str, Any]]:
        return self.partition.revocations().to_list()

    @_serialised
    def ping(self) -> dict[str, Any]:
        return {"partition": self.partition.cfg.partition, "term": self.partition.term}

    def __repr__(self) -> str:
        p = getattr(self, "partition", None)
        return f"vigo-primary[{p.cfg.partition} term {p.term}]" if p else "vigo-primary[starting]"
