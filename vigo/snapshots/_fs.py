"""The one durability helper the stream, archive, restore, backups and standbys share."""

from __future__ import annotations

import os


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file, or a directory (which makes a rename or link in it durable), by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
