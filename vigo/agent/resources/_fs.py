"""Shared by the path resources (file, directory, symlink): mode and ownership, read then fix."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass

from vigo.errors import ResourceError


@dataclass(frozen=True)
class Wanted:
    """Mode and ownership as asked for; None means "not managed"."""

    mode: int | None
    uid: int | None
    gid: int | None

    @classmethod
    def from_attrs(cls, attrs: dict) -> Wanted:
        mode = int(attrs["mode"], 8) if attrs.get("mode") else None
        return cls(mode, _uid(attrs.get("owner")), _gid(attrs.get("group")))

    def differences(self, st: os.stat_result | None) -> list[str]:
        """What differs from ``st`` (None: the path does not exist yet, so every managed bit)."""
        out = []
        if self.mode is not None and (st is None or stat.S_IMODE(st.st_mode) != self.mode):
            have = "-" if st is None else f"{stat.S_IMODE(st.st_mode):04o}"
            out.append(f"mode {have} -> {self.mode:04o}")
        if self.uid is not None and (st is None or st.st_uid != self.uid):
            out.append(f"owner {'-' if st is None else st.st_uid} -> {self.uid}")
        if self.gid is not None and (st is None or st.st_gid != self.gid):
            out.append(f"group {'-' if st is None else st.st_gid} -> {self.gid}")
        return out

    def enforce(self, path: str | os.PathLike, *, fd: int | None = None) -> None:
        target = fd if fd is not None else path
        if self.uid is not None or self.gid is not None:
            os.chown(target, -1 if self.uid is None else self.uid, -1 if self.gid is None else self.gid)
        if self.mode is not None:
            os.chmod(target, self.mode)


def _uid(owner: str | None) -> int | None:
    if owner is None:
        return None
    if owner.isdigit():
        return int(owner)
    try:
        return pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ResourceError(f"owner {owner!r} is not a user on this host") from None


def _gid(group: str | None) -> int | None:
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ResourceError(f"group {group!r} is not a group on this host") from None


def lstat_or_none(path: str | os.PathLike) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def kind(st: os.stat_result) -> str:
    if stat.S_ISREG(st.st_mode):
        return "a regular file"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if stat.S_ISLNK(st.st_mode):
        return "a symlink"
    return "a special file"
