"""Durability helpers shared by every layer: the state's stream, the archive, restore, backups
and standbys use them today. A bottom-layer module (standard library only) so that the state
package below the snapshots, and the envoy, can share one copy."""

from __future__ import annotations

import os


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file, or a directory (which makes a rename or link in it durable), by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
