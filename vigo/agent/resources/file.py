"""`file`: a regular file's content, mode and ownership, or its absence.

The engine hands over the desired bytes in ``attrs["content"]`` (literal, rendered template, or
a shipped source file, already resolved). Writes go to a temporary file in the same folder
that gets mode and ownership first, then is renamed over the target
(``vigo.durable.atomic_file``): a reader sees the old file or the new one, never a half-written
one with the wrong permissions. Not fsynced, on purpose: a run may write thousands of files, a
sync each would multiply its time, and a change lost in a crash is made again by the next run.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import stat
from pathlib import Path

from vigo.agent.resources._fs import Wanted, kind, lstat_or_none
from vigo.agent.resources.base import CHANGED, FAILED, OK, Outcome, Resource, RunContext
from vigo.durable import atomic_file
from vigo.errors import ResourceError

#: Diffs longer than this are cut; a report carries what changed, not the whole file.
MAX_DIFF_BYTES = 64 * 1024
#: Files larger than this are compared by hash only (no text diff).
MAX_DIFF_INPUT_BYTES = 1024 * 1024


class File(Resource):
    type = "file"

    def apply(self, ctx: RunContext) -> Outcome:
        path = ctx.path(self.name)
        try:
            wanted = Wanted.from_attrs(self.attrs)
        except ResourceError as exc:
            return Outcome(FAILED, str(exc))
        if self.attrs.get("state", "present") == "absent":
            return self._absent(path, ctx)
        return self._present(path, wanted, ctx)

    # -- read ------------------------------------------------------------------------

    def _desired(self) -> bytes | None:
        content = self.attrs.get("content")
        if content is None:
            return None
        return content.encode() if isinstance(content, str) else bytes(content)

    # -- change ----------------------------------------------------------------------

    def _present(self, path: Path, wanted: Wanted, ctx: RunContext) -> Outcome:
        st = lstat_or_none(path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            return Outcome(FAILED, f"{path} is {kind(st)}, expected a regular file (remove it or manage it as such)")
        desired = self._desired()
        current = _read(path) if st is not None and desired is not None else None
        changes: list[str] = []
        diff = None
        if st is None:
            changes.append("created")
        if desired is not None and current != desired:
            if st is not None:
                changes.append("content")
            # A new file's whole content is a diff only worth its size when asked (--noop);
            # otherwise the report says how big it is and stays small.
            if st is not None or ctx.noop:
                diff = ctx.redact(_diff(current or b"", desired, self.name))
            else:
                changes[0] = f"created ({len(desired)} bytes)"
        changes += wanted.differences(st)
        if not changes:
            return Outcome(OK, "in sync")
        if ctx.noop:
            return Outcome(CHANGED, "would change " + ", ".join(changes), diff, changes)
        try:
            if desired is None and st is None:
                desired = b""  # content unmanaged: create an empty file
            if desired is not None and (st is None or current != desired):
                made = _ensure_parent(path)
                _write_atomic(path, desired, wanted, st)
                if made:
                    changes.append(f"created parent folders {', '.join(made)}")
            else:
                wanted.enforce(path)
        except OSError as exc:
            return Outcome(FAILED, f"cannot write {path}: {exc.strerror or exc}", diff)
        return Outcome(CHANGED, ", ".join(changes), diff, changes)

    def _absent(self, path: Path, ctx: RunContext) -> Outcome:
        st = lstat_or_none(path)
        if st is None:
            return Outcome(OK, "absent")
        if stat.S_ISDIR(st.st_mode):
            return Outcome(FAILED, f"{path} is a directory, expected a file to remove (use a directory resource)")
        if ctx.noop:
            return Outcome(CHANGED, "would remove", changes=["removed"])
        try:
            path.unlink()
        except OSError as exc:
            return Outcome(FAILED, f"cannot remove {path}: {exc.strerror or exc}")
        return Outcome(CHANGED, "removed", changes=["removed"])


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _ensure_parent(path: Path) -> list[str]:
    made = []
    parent = path.parent
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o755, exist_ok=True)
        made.append(str(folder))
    return made


def _write_atomic(path: Path, data: bytes, wanted: Wanted, st: os.stat_result | None) -> None:
    tmp = path.with_name(f".{path.name}.vigo-tmp")
    with atomic_file(path, mode=0o644 if st is None else stat.S_IMODE(st.st_mode), tmp=tmp, fsync=False) as out:
        out.write(data)
        out.flush()  # every byte written before owner and mode are set, as they always were
        if st is not None:
            # Keep what the policy does not manage as it was on the old file.
            os.fchown(out.fileno(), st.st_uid if wanted.uid is None else wanted.uid,
                      st.st_gid if wanted.gid is None else wanted.gid)
        wanted.enforce(tmp, fd=out.fileno())


def _diff(old: bytes, new: bytes, name: str) -> str:
    if len(old) > MAX_DIFF_INPUT_BYTES or len(new) > MAX_DIFF_INPUT_BYTES or b"\0" in old or b"\0" in new:
        return _hash_line(old, new)
    try:
        a, b = old.decode(), new.decode()
    except UnicodeDecodeError:
        return _hash_line(old, new)
    text = "".join(
        difflib.unified_diff(a.splitlines(True), b.splitlines(True), f"{name} (current)", f"{name} (desired)")
    )
    if len(text) > MAX_DIFF_BYTES:
        text = text[:MAX_DIFF_BYTES] + f"\n... diff cut at {MAX_DIFF_BYTES} bytes\n"
    return text


def _hash_line(old: bytes, new: bytes) -> str:
    return (
        f"binary or large content: sha256 {hashlib.sha256(old).hexdigest()[:16]} ({len(old)} bytes) "
        f"-> {hashlib.sha256(new).hexdigest()[:16]} ({len(new)} bytes)\n"
    )


RESOURCE = File
