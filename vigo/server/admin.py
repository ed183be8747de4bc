"""The admin operations: one table of everything vigocli (through a gateway) may ask a partition.

Each row names the operation, the core method that answers it, its arguments (name, type,
default) and whether it changes the partition's state. ``Partition.admin`` dispatches through
``dispatch``: an operation that is not in the table is ``not_found``, and arguments are checked
against the row before the handler runs (unknown, missing or of the wrong type: ``bad_body``,
naming the operation, the argument, the expected type and what arrived). Handlers check values
(ranges, patterns), never types.

The table is static and this module imports nothing heavy, so `vigocli server ops` prints it
without a server and docs/protocol.md lists it (a unit test keeps the two equal).

``writes`` informs operators (and a unit test holds it true); the member actor does not rely
on it: it compares stream positions before and after an operation to decide whether a standby
must confirm it (vigo/actors/member.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vigo.errors import ProtocolError

if TYPE_CHECKING:
    from vigo.server.partition import Partition

__all__ = ["OPS", "Arg", "ArgType", "Op", "describe", "dispatch", "markdown"]


@dataclass(frozen=True)
class ArgType:
    name: str  # as operators read it in errors, `vigocli server ops` and the docs
    check: Callable[[Any], bool]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # True is an int to Python, not to us


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


TEXT = ArgType("text", lambda v: isinstance(v, str))
BYTES = ArgType("bytes", lambda v: isinstance(v, bytes))
TEXT_OR_BYTES = ArgType("text or bytes", lambda v: isinstance(v, str | bytes))
WHOLE = ArgType("whole number", _whole)
NUMBER = ArgType("number", _number)
MAP = ArgType("map", lambda v: isinstance(v, dict))
FILES = ArgType("map of path (text) to bytes", lambda v: isinstance(v, dict) and all(
    isinstance(path, str) and isinstance(data, bytes) for path, data in v.items()))

_REQUIRED: Any = object()


@dataclass(frozen=True)
class Arg:
    name: str
    type: ArgType
    #: Filled in when the argument is left out; a default of None also lets a caller send nil.
    default: Any = _REQUIRED

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def accepts(self, value: Any) -> bool:
        return self.type.check(value) or (value is None and self.default is None)

    def describe(self) -> str:
        if self.required:
            return f"{self.name}: {self.type.name}"
        if self.default is None:
            return f"{self.name}: {self.type.name} (optional)"
        return f"{self.name}: {self.type.name} = {json.dumps(self.default)}"


@dataclass(frozen=True)
class Op:
    name: str
    #: The partition's core method that answers, called with every argument by name.
    handler: Callable[[Partition], Callable[..., Any]]
    args: tuple[Arg, ...]
    writes: bool  # changes the partition's state (and so its stream)
    summary: str

    def bind(self, args: Any) -> dict[str, Any]:
        """The arguments by name, defaults filled in, or ProtocolError("bad_body")."""
        if args is None:
            args = {}
        if not isinstance(args, Mapping):
            raise ProtocolError("bad_body", f"{self.name}: arguments must be a map of name to value, "
                                            f"got {_show(args)}")
        known = {a.name: a for a in self.args}
        unknown = [name for name in args if name not in known]
        if unknown:
            takes = ", ".join(a.describe() for a in self.args) or "no arguments"
            raise ProtocolError("bad_body", f"{self.name} has no argument {unknown[0]!r:.40}; it takes {takes}")
        bound = {}
        for arg in self.args:
            if arg.name not in args:
                if arg.required:
                    raise ProtocolError("bad_body", f"{self.name} needs argument {arg.name} ({arg.type.name})")
                bound[arg.name] = arg.default
                continue
            value = args[arg.name]
            if not arg.accepts(value):
                nil = " or nil" if arg.default is None else ""
                raise ProtocolError("bad_body", f"{self.name} expects {arg.name} to be {arg.type.name}{nil}, "
                                                f"got {_show(value)}")
            bound[arg.name] = value
        return bound


_TABLE = (
    Op("status", lambda p: p.status, (), writes=False,
       summary="the partition: term, envoy counts by status, current bundle, stream and archive"),
    Op("envoys.list", lambda p: p.fleet.listing, (), writes=False,
       summary="every envoy with its derived status and last run"),
    Op("envoys.page", lambda p: p.fleet.page,
       (Arg("page", WHOLE, 1), Arg("per_page", WHOLE, 50), Arg("status", TEXT, None), Arg("hostname", TEXT, None),
        Arg("serial", WHOLE, None), Arg("trait", TEXT, None), Arg("sort", TEXT, "hostname"), Arg("order", TEXT, "asc")),
       writes=False,
       summary="one page (1..500 rows) of envoys, filtered (status, part of hostname, serial, trait PATH=VALUE) "
               "and sorted by the database, with the total that match"),
    Op("envoys.show", lambda p: p.fleet.show, (Arg("envoy_id", TEXT), Arg("runs", WHOLE, 10)), writes=False,
       summary="one envoy by id or unambiguous id prefix, with its newest runs (0..1000) in full"),
    Op("envoys.revoke", lambda p: p.admissions.revoke, (Arg("envoy_id", TEXT),), writes=True,
       summary="revoke an envoy and all its certificates"),
    Op("token.create", lambda p: p.admissions.create_token,
       (Arg("ttl_s", NUMBER, None), Arg("uses", WHOLE, None), Arg("note", TEXT, "")), writes=True,
       summary="a join token, shown once (only its hash is kept); ttl_s and uses default from server.yaml"),
    Op("token.list", lambda p: p.admissions.tokens, (), writes=False,
       summary="join tokens by id (never the token), uses left and expiry"),
    Op("token.install", lambda p: p.admissions.install_token,
       (Arg("id", TEXT), Arg("hash", TEXT), Arg("created_at", NUMBER), Arg("expires_at", NUMBER),
        Arg("uses", WHOLE), Arg("note", TEXT, "")), writes=True,
       summary="spanner: install a token made at a sibling bolt, by its hash"),
    Op("stack.push", lambda p: p.stack.push,
       (Arg("files", FILES), Arg("name", TEXT, "stack"), Arg("serial", WHOLE, None)), writes=True,
       summary="build, sign and store a stack; serial (spanner) fixes the serial at every bolt"),
    Op("stack.show", lambda p: p.stack.show, (), writes=False,
       summary="the current bundle's summary and the last pushes (nil before the first push)"),
    Op("secrets.set", lambda p: p.secrets.put, (Arg("name", TEXT), Arg("value", TEXT_OR_BYTES)), writes=True,
       summary="seal and store one secret (UTF-8 text, at most 64 KiB)"),
    Op("secrets.list", lambda p: p.secrets.listing, (), writes=False,
       summary="secret names and when each was set, never values"),
    Op("backup.create", lambda p: p.archive.create_backup,
       (Arg("out", TEXT), Arg("key", BYTES), Arg("salt", BYTES), Arg("kdf", MAP)), writes=False,
       summary="write an encrypted backup to a path or URL on the server's side (the key is derived by the CLI)"),
    Op("spanner.status", lambda p: p.spanner_status, (), writes=False,
       summary="spanner's bolts and slices (answered by the spanner router; a partition says how to turn spanner on)"),
)

#: Every admin operation by name, in the order operators read them.
OPS: dict[str, Op] = {op.name: op for op in _TABLE}


def dispatch(partition: Partition, op: Any, args: Any) -> Any:
    """Run one admin operation on ``partition``: look it up, check its arguments, call it."""
    spec = OPS.get(op) if isinstance(op, str) else None
    if spec is None:
        raise ProtocolError("not_found", f"unknown admin operation {op!r:.80} (`vigocli server ops` lists them)")
    return spec.handler(partition)(**spec.bind(args))


def describe() -> list[dict[str, Any]]:
    """The table as data (`vigocli server ops --json`)."""
    return [{
        "op": op.name,
        "args": [{"name": a.name, "type": a.type.name, "required": a.required,
                  **({} if a.required else {"default": a.default})} for a in op.args],
        "writes": op.writes,
        "summary": op.summary,
    } for op in _TABLE]


def markdown() -> str:
    """The table as docs/protocol.md lists it under "Admin operations"."""
    lines = ["| op | arguments | writes | what it does |", "|---|---|---|---|"]
    for op in _TABLE:
        args = "; ".join(f"`{a.describe()}`" for a in op.args) or "none"
        lines.append(f"| `{op.name}` | {args} | {'yes' if op.writes else 'no'} | {op.summary} |")
    return "\n".join(lines)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
