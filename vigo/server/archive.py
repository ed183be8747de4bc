"""The partition's copies off the host: the continuous archive and on-demand backups.

The archive ships the state stream (vigo/state/stream.py) to ``archive.url`` through an
``Archiver`` (vigo/snapshots/archiver.py) that the primary actor starts; a backup is one
encrypted unit of the live database and its trees (vigo/snapshots/backup.py). Serving never
stops for either: an archive that cannot start says so in the log and in `server status`.

Plain Python over the store, no Ray; ``Partition`` wires it (vigo/server/partition.py).
"""

from __future__ import annotations

import logging
from typing import Any

from vigo.config import ServerConfig
from vigo.errors import ProtocolError, VigoError
from vigo.state.store import Store

# The partition's one logger: operators follow one name for everything a partition does.
log = logging.getLogger("vigo.server.partition")


class ArchiveCore:
    def __init__(self, store: Store, cfg: ServerConfig) -> None:
        self.store = store
        self.cfg = cfg
        #: The running Archiver, once start() made one: the primary actor runs it, unit tests need not.
        self.archiver: Any = None
        #: Why the archive is off although archive.url is set (shown by `server status`).
        self.error: str | None = None

    def start(self) -> dict[str, Any] | None:
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
            self.error = str(exc)
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

    def snapshot_if_due(self) -> None:
        """A new snapshot when the archive's schedule says so (from the partition's upkeep)."""
        if self.archiver is not None and self.archiver.snapshot_due():
            self.store.stream.snapshot()

    def status(self) -> dict[str, Any]:
        stream = self.store.stream
        return {
            "position": list(stream.position()) if stream.position() else None,
            "archive": self.archiver.status() if self.archiver is not None else None,
            "archive_error": self.error,
        }

    def create_backup(self, out: str, key: bytes, salt: bytes, kdf: dict[str, Any]) -> dict[str, Any]:
        """An encrypted backup unit (vigo/snapshots/backup.py) at ``out``: an absolute path on
        this host or a file:// / s3:// URL (on the archive's S3 endpoint, if one is set). The
        key arrives derived by the CLI, so the passphrase never reaches the server. The primary
        runs one method at a time, so envoy batches wait while this runs: about 0.9 s for a
        200 MB database (measured on a 2-core VM)."""
        from vigo.snapshots import backup

        if not out:
            raise ProtocolError("bad_body", f"backup out must be a path or URL (text), got {out!r:.80}")
        result = backup.create_backup_at(self.store.db, out, backup.BackupKey.from_derived(key, salt, kdf),
                                         partition=self.cfg.partition, work_dir=self.store.data_dir,
                                         endpoint_url=self.cfg.archive.endpoint_url or None)
        log.info("backup written to %s (%d bytes, %d entries, %.1f s)", result["path"], result["size"],
                 result["entries"], result["seconds"])
        return result

    def close(self) -> None:
        if self.archiver is not None:
            self.archiver.stop()
