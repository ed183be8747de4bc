"""`vigocli restore`: rebuild a data dir from the archive, to the latest point or to a time.

Runs where the new data dir will live and talks to the archive directly (file or S3): no server
needs to be running, which is the point when every server host is gone.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from vigo.cli import output
from vigo.cli.options import JsonFlag


def restore(
    from_url: Annotated[str, typer.Option("--from", help="the archive: file:///path or s3://bucket/prefix (as archive.url in server.yaml)")],
    data_dir: Annotated[Path, typer.Option("--data-dir", help="data dir to create (must not hold a database unless --force)")],
    to_time: Annotated[str | None, typer.Option("--to-time", help="restore as of this ISO 8601 time (UTC if no offset), e.g. 2026-11-27T10:15:00Z; default: the latest archived commit")] = None,
    generation: Annotated[str | None, typer.Option("--generation", help="restore from this generation only (default: the newest, or the newest created before --to-time)")] = None,
    partition: Annotated[str | None, typer.Option("--partition", help="partition to restore (default: the only one in the archive)")] = None,
    endpoint_url: Annotated[str | None, typer.Option("--endpoint-url", envvar="VIGO_S3_ENDPOINT", help="S3-compatible endpoint (MinIO, Ceph, ...); default AWS")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace a database already in --data-dir")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Rebuild DATA_DIR from the archive: the newest snapshot at or before the chosen point, then
    every WAL segment after it, checked (sha256, the WAL checksum chain, PRAGMA integrity_check)
    and written atomically. Prints the point in time reached. A server started on the result
    starts a new archive generation and serves the fleet; envoys reconnect and flush."""
    from vigo.snapshots.restore import parse_time
    from vigo.snapshots.restore import restore as run_restore

    when = parse_time(to_time) if to_time else None

    def progress(message: str) -> None:
        print(f"restore: {message}", file=sys.stderr, flush=True)

    result = run_restore(from_url, data_dir, partition=partition, to_time=when, generation=generation,
                         endpoint_url=endpoint_url, force=force, progress=progress)
    if as_json:
        output.emit_json(result)
        return
    pos = result["position"]
    typer.echo(output.kv([
        ("restored", result["data_dir"]),
        ("partition", result["partition"]),
        ("generation", result["generation"]),
        ("reached", f"{result['reached_at_iso']} (last commit applied)"),
        ("position", f"index {pos[1]:08x} offset {pos[2]}" if pos else "-"),
        ("from", f"snapshot {result['snapshot_index']:08x} + {result['wal_objects']} WAL objects"),
        ("database", f"{result['database_bytes']} bytes, integrity ok, {result['tree_files']} tree files written"),
        ("took", f"{result['seconds']} s ({result['mb_per_s']} MB/s)"),
    ]))
