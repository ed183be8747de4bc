"""Restore a partition's data dir from the archive: latest, or as of a point in time.

1. Pick the generation: the one named, else the newest (by its recorded creation time; with
   ``to_time``, the newest created at or before it). Restore never crosses generations.
2. Pick its newest snapshot taken at or before ``to_time`` (or the newest), then chain the WAL
   objects from that snapshot's index: each must start where the previous ended; an index's
   first segment says where the previous index ended. A hole is an error naming the range.
3. Download the snapshot (sha256 checked by the target), replay the segments in order with the
   same applier a standby uses (checksum chain verified), cutting at the last commit at or
   before ``to_time``. Downloads run ahead on a small pool; application is strictly in order.
4. ``PRAGMA integrity_check`` must say ok, the file size must match the last commit's page
   count; then the database moves into DATA_DIR atomically and the trees are written from it.

A server started on the restored data dir finds no stream state there, so it starts a new
generation with a fresh snapshot: it never appends to the chain it was restored from.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigo.durable import fsync_path, replace_durably
from vigo.errors import ConfigError, RestoreError, StreamGap
from vigo.snapshots.layout import (
    GenerationInfo,
    SnapInfo,
    WalInfo,
    list_generations,
    list_partitions,
)
from vigo.state.apply import Applier
from vigo.state.store import Store
from vigo.state.stream import decode_segment
from vigo.timefmt import iso, parse_iso

log = logging.getLogger("vigo.snapshots.restore")

#: Segments downloaded ahead of the one being applied.
PREFETCH = 8


@dataclass
class Plan:
    partition: str
    generation: GenerationInfo
    snapshot: SnapInfo
    segments: list[WalInfo]
    to_time: float | None


def plan_restore(target: Any, partition: str, *, to_time: float | None = None,
                 generation: str | None = None) -> Plan:
    gens = list_generations(target, partition)
    if not gens:
        raise RestoreError(f"no archived generation of partition {partition} at {target.url}")
    if generation is not None:
        chosen = [g for g in gens if g.generation == generation]
        if not chosen:
            raise RestoreError(f"generation {generation} of partition {partition} is not at {target.url} "
                               f"(found: {', '.join(g.generation for g in gens)})")
        gen = chosen[0]
    elif to_time is not None:
        eligible = [g for g in gens if g.created_at <= to_time]
        if not eligible:
            raise RestoreError(f"{iso(to_time, ms=True)} is before the oldest archived generation "
                               f"({gens[0].generation}, created {iso(gens[0].created_at, ms=True)})")
        gen = eligible[-1]
    else:
        gen = gens[-1]
    snaps = [s for s in gen.snapshots if to_time is None or s.created_at <= to_time]
    if not snaps:
        when = f" taken at or before {iso(to_time, ms=True)}" if to_time is not None else ""
        raise RestoreError(f"generation {gen.generation} has no snapshot{when} (restore cannot start without one)")
    snap = snaps[-1]
    return Plan(partition, gen, snap, _chain(gen, snap.index), to_time)


def _chain(gen: GenerationInfo, from_index: int) -> list[WalInfo]:
    """The WAL objects that continue a snapshot at ``from_index``, in order. Overlapping objects
    (re-uploaded after a crash) are fine; a hole inside an index is not."""
    out: list[WalInfo] = []
    by_index: dict[int, list[WalInfo]] = {}
    for w in gen.wal:
        if w.index >= from_index:
            by_index.setdefault(w.index, []).append(w)
    indexes = sorted(by_index)
    for expected, index in enumerate(indexes, start=from_index):
        if index != expected:
            raise RestoreError(f"generation {gen.generation}: WAL index {expected:08x} is missing "
                               f"(the archive jumps from index {expected - 1:08x} to {index:08x})")
        objs, pos = by_index[index], 0
        while True:
            covering = [w for w in objs if w.start <= pos < w.end]
            if not covering:
                later = [w.start for w in objs if w.start > pos]
                if later:
                    raise RestoreError(f"generation {gen.generation}: WAL index {index:08x} is missing "
                                       f"bytes {pos:#x}..{min(later):#x}")
                break
            best = max(covering, key=lambda w: w.end)
            out.append(best)
            pos = best.end
    return out


def restore(url: str, data_dir: Path | str, *, partition: str | None = None, to_time: float | None = None,
            generation: str | None = None, endpoint_url: str | None = None, force: bool = False,
            progress: Callable[[str], None] | None = None, target: Any = None) -> dict[str, Any]:
    """Rebuild DATA_DIR from the archive at ``url``. Returns what point it reached."""
    from vigo.snapshots.targets import open_target

    started = time.monotonic()
    target = target or open_target(url, endpoint_url=endpoint_url)
    partition = partition or _only_partition(target)
    data_dir = Path(data_dir)
    final_db = data_dir / "state.db"
    if final_db.exists() and not force:
        raise RestoreError(f"{final_db} exists; restore into an empty data dir (or pass --force to replace it)")
    plan = plan_restore(target, partition, to_time=to_time, generation=generation)
    say = progress or (lambda _msg: None)
    say(f"generation {plan.generation.generation}: snapshot {plan.snapshot.index:08x} "
        f"({plan.snapshot.size / 1e6:.1f} MB) + {len(plan.segments)} WAL objects")

    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    work = data_dir / ".restore"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(mode=0o700)
    try:
        snap_file = work / "snapshot.db"
        target.get_file(plan.snapshot.key, snap_file)
        applier = Applier(work / "state.db", work / "apply.json")
        applier.install_snapshot(snap_file, plan.generation.generation, plan.snapshot.index, move=True,
                                 created_at=plan.snapshot.created_at)
        reached_at = plan.snapshot.created_at
        applied = wal_bytes = 0
        stopped_early = False
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [pool.submit(target.get, w.key) for w in plan.segments[:PREFETCH]]
            for i, info in enumerate(plan.segments):
                raw = futures[i].result()
                if i + PREFETCH < len(plan.segments):
                    futures.append(pool.submit(target.get, plan.segments[i + PREFETCH].key))
                seg = decode_segment(raw, name=info.key)
                if to_time is not None and seg.commits[-1][2] > to_time:
                    keep = [c for c in seg.commits if c[2] <= to_time]
                    stopped_early = True
                    if not keep:
                        break
                    seg = seg.cut_at(keep[-1][0])
                try:
                    applier.accept(seg, durable=False)
                except StreamGap as exc:
                    raise RestoreError(f"WAL object {info.key} does not continue the restored chain: {exc}") from exc
                applied += 1
                wal_bytes += len(seg.data)
                reached_at = seg.commits[-1][2]
                if applied % 100 == 0:
                    say(f"applied {applied}/{len(plan.segments)} WAL objects ({wal_bytes / 1e6:.1f} MB)")
                if stopped_early:
                    break
            for fut in futures:
                fut.cancel()
        check_database(work / "state.db", applier)
        position = applier.position()
        fsync_path(work / "state.db")
        for suffix in ("-wal", "-shm"):
            Path(f"{final_db}{suffix}").unlink(missing_ok=True)
        replace_durably(work / "state.db", final_db)
        # Stream state of whatever lived here before must not survive: a new generation starts.
        shutil.rmtree(data_dir / "stream", ignore_errors=True)
        shutil.rmtree(data_dir / "archive-spool", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    trees = _materialise(data_dir)
    seconds = time.monotonic() - started
    size = final_db.stat().st_size
    result = {
        "partition": partition, "generation": plan.generation.generation, "snapshot_index": plan.snapshot.index,
        "position": list(position) if position else None, "wal_objects": applied, "reached_at": reached_at,
        "reached_at_iso": iso(reached_at, ms=True), "to_time": to_time, "database_bytes": size, "tree_files": trees,
        "seconds": round(seconds, 3), "mb_per_s": round(size / 1e6 / seconds, 1) if seconds else None,
        "data_dir": str(data_dir),
    }
    log.info("restored %s to %s (%s)", data_dir, result["reached_at_iso"], plan.generation.generation)
    return result


def _only_partition(target: Any) -> str:
    names = list_partitions(target)
    if len(names) == 1:
        return names[0]
    if not names:
        raise RestoreError(f"no archived partition at {target.url}")
    raise RestoreError(f"{target.url} holds several partitions ({', '.join(names)}): pass --partition")


def check_database(path: Path, applier: Applier) -> None:
    """A database written by the applier: its size matches the last applied commit and
    ``PRAGMA integrity_check`` passes; RestoreError naming what is wrong otherwise."""
    import apsw

    st = applier.state
    assert st is not None
    size = path.stat().st_size
    if st.page_size and st.db_pages and size != st.db_pages * st.page_size:
        raise RestoreError(f"restored database is {size} bytes, the last commit says "
                           f"{st.db_pages} pages of {st.page_size}")
    conn = apsw.Connection(str(path))
    try:
        result = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    except apsw.Error as exc:
        raise RestoreError(f"restored database cannot be opened: {exc}") from exc
    finally:
        conn.close()
    if result != ["ok"]:
        raise RestoreError(f"restored database fails PRAGMA integrity_check: {'; '.join(map(str, result[:5]))}")


def _materialise(data_dir: Path) -> int:
    store = Store(data_dir)
    try:
        return store.materialise_trees()
    finally:
        store.close()


def parse_time(text: str) -> float:
    """ISO 8601 (``2026-11-27T10:15:00Z``, with an offset, or naive = UTC) to epoch seconds."""
    try:
        return parse_iso(text)
    except ValueError as exc:
        raise ConfigError(f"--to-time {text!r} is not an ISO 8601 time (expected e.g. 2026-11-27T10:15:00Z)") from exc
