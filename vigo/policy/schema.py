"""What a resource may say in a policy: the attribute schema of every resource type.

The schema is data so that the stack builder validates a whole stack before signing it (every
error names the file, policy and resource), ``docs/stack.md`` documents the same table, and the
envoy's resources trust already-validated, default-filled attributes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from vigo.errors import StackError

STR = "string"
INT = "integer"
NUM = "number"
BOOL = "boolean"
STR_LIST = "list of strings"
STR_MAP = "map of string to string"
MODE = "octal mode string such as '0644'"
COMMAND = "string (run by /bin/sh) or list of strings (run directly)"

_MODE_RE = re.compile(r"^0?[0-7]{3,4}$")


@dataclass(frozen=True)
class Field:
    kind: str
    default: Any = None
    choices: tuple[str, ...] | None = None
    doc: str = ""


#: Attributes every resource accepts.
COMMON: dict[str, Field] = {
    "requires": Field(STR_LIST, (), doc="ids (`type:name`) of resources that must converge first"),
    "notify": Field(STR_LIST, (), doc="ids to refresh when this resource changes"),
    "when": Field(STR, None, doc="condition over traits; false -> skipped"),
}

SCHEMAS: dict[str, dict[str, Field]] = {
    "file": {
        "state": Field(STR, "present", ("present", "absent")),
        "content": Field(STR, None, doc="literal content"),
        "template": Field(STR, None, doc="path under templates/, rendered with traits, vars, secrets"),
        "source": Field(STR, None, doc="path under files/, copied byte for byte"),
        "mode": Field(MODE, None),
        "owner": Field(STR, None),
        "group": Field(STR, None),
    },
    "directory": {
        "state": Field(STR, "present", ("present", "absent")),
        "mode": Field(MODE, None),
        "owner": Field(STR, None),
        "group": Field(STR, None),
        "recurse": Field(BOOL, False, doc="with state absent: remove a non-empty directory"),
    },
    "symlink": {
        "state": Field(STR, "present", ("present", "absent")),
        "target": Field(STR, None, doc="what the link points to (not re-based under --root)"),
        "force": Field(BOOL, False, doc="replace a file that stands where the link goes"),
    },
    "exec": {
        "command": Field(COMMAND, None),
        "creates": Field(STR, None, doc="managed path; skip the command when it exists"),
        "unless": Field(COMMAND, None, doc="skip the command when this exits 0"),
        "onlyif": Field(COMMAND, None, doc="run the command only when this exits 0"),
        "cwd": Field(STR, None, doc="managed path to run in"),
        "env": Field(STR_MAP, None),
        "timeout": Field(NUM, 300, doc="seconds before the command is killed"),
        "refreshonly": Field(BOOL, False, doc="run only when notified"),
    },
    "package": {
        "state": Field(STR, "present", ("present", "absent")),
        "version": Field(STR, None, doc="exact version to install (state present)"),
        "provider": Field(STR, None, ("apt", "dnf", "apk", "pip"), doc="default: from os.family"),
        "python": Field(STR, None, doc="pip provider: the interpreter whose pip to use"),
    },
    "service": {
        "state": Field(STR, None, ("running", "stopped")),
        "enabled": Field(BOOL, None),
    },
}

#: The key naming a resource in YAML is its type: `- file: /etc/motd`.
TYPES = tuple(SCHEMAS)


def _check_kind(kind: str, value: Any) -> bool:
    if kind == STR:
        return isinstance(value, str)
    if kind == INT:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == NUM:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == BOOL:
        return isinstance(value, bool)
    if kind == STR_LIST:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == STR_MAP:
        return isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str | int | float) and not isinstance(v, bool)
            for k, v in value.items()
        )
    if kind == MODE:
        return isinstance(value, str) and bool(_MODE_RE.match(value))
    if kind == COMMAND:
        return (isinstance(value, str) and bool(value.strip())) or (
            isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
        )
    raise AssertionError(f"unknown schema kind {kind!r}")


def validate_resource(
    rtype: str, name: str, attrs: dict[str, Any], *, file: str, policy: str
) -> dict[str, Any]:
    """Check one resource's attributes; return them with defaults filled in.

    Raises StackError naming the file, policy, resource, the attribute and its expected form.
    """
    rid = f"{rtype}:{name}"

    def fail(message: str, expected: str | None = None, got: Any = None) -> StackError:
        return StackError(message, file=file, policy=policy, resource=rid, expected=expected, got=got)

    schema = SCHEMAS[rtype]
    allowed = {**COMMON, **schema}
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        spec = allowed.get(key)
        if spec is None:
            raise fail(f"unknown attribute {key!r}", f"one of {', '.join(sorted(allowed))}", key)
        if value is None:
            continue
        if key in ("env",) and isinstance(value, dict):
            value = {k: str(v) for k, v in value.items()} if _check_kind(STR_MAP, value) else value
        if not _check_kind(spec.kind, value):
            raise fail(f"attribute {key!r} has the wrong form", spec.kind, value)
        if spec.choices and value not in spec.choices:
            raise fail(f"attribute {key!r} has an unknown value", " | ".join(spec.choices), value)
        out[key] = value
    for key, spec in allowed.items():
        if key not in out:
            out[key] = list(spec.default) if isinstance(spec.default, tuple) else spec.default

    # Rules across attributes.
    if rtype in ("file", "directory", "symlink") and not name.startswith("/"):
        raise fail("the name of a path resource must be an absolute path", "a path like /etc/motd", name)
    if rtype in ("file", "directory", "symlink") and ("/../" in name + "/" or "\0" in name):
        raise fail("the path must not contain '..' or NUL", "a normalised absolute path", name)
    if rtype == "file":
        given = [k for k in ("content", "template", "source") if out[k] is not None]
        if len(given) > 1:
            raise fail("give at most one of content, template, source", "one", given)
        if out["state"] == "absent" and given:
            raise fail(f"state absent takes no {given[0]}", "no content attribute", given[0])
    if rtype == "symlink" and out["state"] == "present" and not out["target"]:
        raise fail("a present symlink needs a target", "target: <path>", None)
    if rtype == "exec":
        if out["command"] is None:
            raise fail("an exec needs a command", COMMAND, None)
        if out["creates"] is not None and not out["creates"].startswith("/"):
            raise fail("creates must be an absolute managed path", "/path", out["creates"])
        if out["cwd"] is not None and not out["cwd"].startswith("/"):
            raise fail("cwd must be an absolute managed path", "/path", out["cwd"])
        if out["timeout"] <= 0:
            raise fail("timeout must be positive", "seconds > 0", out["timeout"])
    if rtype == "package":
        if out["version"] is not None and out["state"] == "absent":
            raise fail("state absent takes no version", "no version", out["version"])
        if out["python"] is not None and out["provider"] != "pip":
            raise fail("python is only for provider pip", "provider: pip", out["provider"])
    if rtype == "service" and out["state"] is None and out["enabled"] is None:
        raise fail("a service needs state and/or enabled", "state: running|stopped, enabled: bool", None)
    for key in ("requires", "notify"):
        for ref in out[key]:
            rt, sep, rn = ref.partition(":")
            if not sep or rt not in SCHEMAS or not rn:
                raise fail(f"{key} entry is not a resource id", "type:name, e.g. package:nginx", ref)
    return out
