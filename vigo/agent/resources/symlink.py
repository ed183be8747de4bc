"""`symlink`: a symbolic link pointing at ``target``, or its absence.

The link's own path is re-based under ``--root``; its target is written as given, because a
link is read on the host it lives on (re-basing the target would break it there).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from vigo.agent.resources._fs import kind, lstat_or_none
from vigo.agent.resources.base import CHANGED, FAILED, OK, Outcome, Resource, RunContext
from vigo.durable import replace_durably


class Symlink(Resource):
    type = "symlink"

    def apply(self, ctx: RunContext) -> Outcome:
        path = ctx.path(self.name)
        st = lstat_or_none(path)
        if self.attrs.get("state", "present") == "absent":
            if st is None:
                return Outcome(OK, "absent")
            if not stat.S_ISLNK(st.st_mode):
                return Outcome(FAILED, f"{path} is {kind(st)}, expected a symlink to remove")
            if ctx.noop:
                return Outcome(CHANGED, "would remove", changes=["removed"])
            return self._change(lambda: path.unlink(), "removed", path)

        target = self.attrs["target"]
        if st is not None and stat.S_ISLNK(st.st_mode):
            current = os.readlink(path)
            if current == target:
                return Outcome(OK, "in sync")
            change = f"target {current} -> {target}"
        elif st is None:
            change = f"created -> {target}"
        elif stat.S_ISDIR(st.st_mode):
            return Outcome(FAILED, f"{path} is a directory, expected a symlink (remove it first)")
        elif not self.attrs.get("force"):
            return Outcome(FAILED, f"{path} is {kind(st)}, expected a symlink; set force: true to replace it")
        else:
            change = f"replaced {kind(st)} with link -> {target}"
        if ctx.noop:
            return Outcome(CHANGED, "would change " + change, changes=[change])
        return self._change(lambda: _link_atomic(path, target), change, path)

    @staticmethod
    def _change(action, message: str, path: Path) -> Outcome:
        try:
            action()
        except OSError as exc:
            return Outcome(FAILED, f"cannot converge {path}: {exc.strerror or exc}")
        return Outcome(CHANGED, message, changes=[message])


def _link_atomic(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.vigo-tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    replace_durably(tmp, path)  # a link has no bytes to write: atomic_write does not apply, the rename does


RESOURCE = Symlink
