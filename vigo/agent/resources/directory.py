"""`directory`: a folder's existence, mode and ownership, or its absence.

Removing a non-empty folder needs ``recurse: true``: deleting a tree is never a side effect of
a typo in a path.
"""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

from vigo.agent.resources._fs import Wanted, kind, lstat_or_none
from vigo.agent.resources.base import CHANGED, FAILED, OK, Outcome, Resource, RunContext
from vigo.errors import ResourceError


class Directory(Resource):
    type = "directory"

    def apply(self, ctx: RunContext) -> Outcome:
        path = ctx.path(self.name)
        st = lstat_or_none(path)
        if self.attrs.get("state", "present") == "absent":
            return self._absent(path, st, ctx)
        if st is not None and not stat.S_ISDIR(st.st_mode):
            return Outcome(FAILED, f"{path} is {kind(st)}, expected a directory")
        try:
            wanted = Wanted.from_attrs(self.attrs)
        except ResourceError as exc:
            return Outcome(FAILED, str(exc))
        changes = (["created"] if st is None else []) + wanted.differences(st)
        if not changes:
            return Outcome(OK, "in sync")
        if ctx.noop:
            return Outcome(CHANGED, "would change " + ", ".join(changes), changes=changes)
        try:
            if st is None:
                path.mkdir(mode=0o755, parents=True)
            wanted.enforce(path)
        except OSError as exc:
            return Outcome(FAILED, f"cannot converge {path}: {exc.strerror or exc}")
        return Outcome(CHANGED, ", ".join(changes), changes=changes)

    def _absent(self, path: Path, st, ctx: RunContext) -> Outcome:
        if st is None:
            return Outcome(OK, "absent")
        if not stat.S_ISDIR(st.st_mode):
            return Outcome(FAILED, f"{path} is {kind(st)}, expected a directory to remove")
        empty = not any(path.iterdir())
        if not empty and not self.attrs.get("recurse"):
            return Outcome(FAILED, f"{path} is not empty; set recurse: true to remove it with its contents")
        if ctx.noop:
            return Outcome(CHANGED, "would remove", changes=["removed"])
        try:
            if empty:
                path.rmdir()
            else:
                shutil.rmtree(path)
        except OSError as exc:
            return Outcome(FAILED, f"cannot remove {path}: {exc.strerror or exc}")
        return Outcome(CHANGED, "removed", changes=["removed"])


RESOURCE = Directory
