"""Loading and validating a stack: the operator's policy source folder.

    STACK/
      *.yaml | *.yml   one policy per file
      templates/       Jinja2 templates, all shipped in the bundle (so includes work)
      files/           files copied byte for byte; only those a resource references are shipped

Everything is checked before anything is signed: YAML and its schema, conditions, template
syntax, that referenced templates and files exist, that no path leaves the stack folder (by
``..``, an absolute path or a symlink), and that the resource graph has no cycle. Each error
names the file, the policy, the resource and what was expected.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vigo.errors import (
    ConditionSyntaxError,
    CycleError,
    PathEscapeError,
    StackError,
    TemplateError,
)
from vigo.policy import conditions, graph, templates
from vigo.policy.schema import SCHEMAS, TYPES, validate_resource

#: Upper bound on a stack's shipped content (templates + files); a bundle travels in one frame.
MAX_STACK_BYTES = 64 * 1024 * 1024
#: Upper bound on one policy file; a bigger YAML file is almost surely a mistake.
MAX_POLICY_FILE_BYTES = 4 * 1024 * 1024

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SECRET_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_POLICY_KEYS = ("name", "description", "when", "vars", "secrets", "resources")
#: Types a `notify` may target: the ones that do something when refreshed.
NOTIFIABLE = ("exec", "service")


@dataclass
class ResourceSpec:
    type: str
    name: str
    attrs: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.type}:{self.name}"


@dataclass
class PolicySpec:
    name: str
    file: str
    when: str | None = None
    description: str = ""
    vars: dict[str, Any] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    resources: list[ResourceSpec] = field(default_factory=list)


@dataclass
class Stack:
    root: Path
    name: str
    policies: list[PolicySpec]
    templates: dict[str, str]
    files: dict[str, bytes]

    def secret_names(self) -> list[str]:
        return sorted({s for p in self.policies for s in p.secrets})


def load_stack(path: Path | str) -> Stack:
    """Read and validate the stack folder ``path``; raise StackError on the first problem."""
    root = Path(path)
    if not root.is_dir():
        raise StackError(
            "cannot load stack", file=str(root), expected="a folder of *.yaml policies", got="no such folder"
        )
    root = root.resolve()
    template_map = _read_tree(root, "templates", text=True)
    policies = [_load_policy(root, p) for p in _policy_files(root)]
    if not policies:
        raise StackError(
            "the stack has no policies", file=str(root), expected="at least one *.yaml file", got="none"
        )
    _check_unique(policies)
    files = _collect_files(root, policies)
    env = templates.make_environment(template_map)
    for name in sorted(template_map):
        try:
            templates.check_template(env, name)
        except TemplateError as exc:
            raise StackError(str(exc), file=f"templates/{name}") from exc
    for policy in policies:
        for res in policy.resources:
            tpl = res.attrs.get("template") if res.type == "file" else None
            if tpl is not None and tpl not in template_map:
                raise StackError(
                    "template not found",
                    file=policy.file,
                    policy=policy.name,
                    resource=res.id,
                    expected=f"a file templates/{tpl} in the stack",
                    got="nothing there",
                )
    _check_graph(policies)
    size = sum(len(t.encode()) for t in template_map.values()) + sum(len(b) for b in files.values())
    if size > MAX_STACK_BYTES:
        raise StackError(
            "the stack's templates and files are too large to ship",
            file=str(root),
            expected=f"at most {MAX_STACK_BYTES} bytes",
            got=f"{size} bytes",
        )
    return Stack(root=root, name=root.name, policies=policies, templates=template_map, files=files)


def _policy_files(root: Path) -> list[Path]:
    found = [p for p in root.iterdir() if p.suffix in (".yaml", ".yml") and not p.name.startswith(".")]
    for p in found:
        _inside(root, p, file=p.name)
    return sorted(found)


def _load_policy(root: Path, path: Path) -> PolicySpec:
    rel = path.name
    if not path.is_file():
        raise StackError("a policy must be a regular file", file=rel, expected="a file", got="a folder")
    if path.stat().st_size > MAX_POLICY_FILE_BYTES:
        raise StackError(
            "policy file too large", file=rel, expected=f"<= {MAX_POLICY_FILE_BYTES} bytes", got=path.stat().st_size
        )
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise StackError("policy file is not UTF-8 text", file=rel, expected="UTF-8", got=str(exc)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise StackError(f"invalid YAML: {where}{problem}", file=rel) from exc
    if not isinstance(doc, dict):
        raise StackError("a policy file holds one mapping", file=rel, expected="a mapping with name/resources", got=type(doc).__name__)
    unknown = [k for k in doc if k not in _POLICY_KEYS]
    if unknown:
        raise StackError(f"unknown policy key {unknown[0]!r}", file=rel, expected=" | ".join(_POLICY_KEYS), got=unknown[0])

    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise StackError("bad policy name", file=rel, expected="letters, digits, '_', '.', '-' (max 128)", got=name)
    policy = PolicySpec(name=name, file=rel)

    def fail(message: str, expected: str | None = None, got: Any = None) -> StackError:
        return StackError(message, file=rel, policy=name, expected=expected, got=got)

    desc = doc.get("description", "")
    if not isinstance(desc, str):
        raise fail("description must be text", "a string", desc)
    policy.description = desc
    when = doc.get("when")
    if when is not None:
        policy.when = _check_condition(when, file=rel, policy=name, resource=None)
    vars_ = doc.get("vars") or {}
    if not isinstance(vars_, dict) or not all(isinstance(k, str) for k in vars_):
        raise fail("vars must be a mapping with string keys", "a mapping", vars_)
    policy.vars = vars_
    secrets = doc.get("secrets") or []
    if not isinstance(secrets, list) or not all(isinstance(s, str) and _SECRET_RE.match(s) for s in secrets):
        raise fail("secrets must be a list of secret names", "names like db_password", secrets)
    policy.secrets = sorted(set(secrets))
    resources = doc.get("resources") or []
    if not isinstance(resources, list):
        raise fail("resources must be a list", "a YAML list of resources", type(resources).__name__)
    for index, entry in enumerate(resources):
        policy.resources.append(_load_resource(root, entry, index, file=rel, policy=name))
    return policy


def _load_resource(root: Path, entry: Any, index: int, *, file: str, policy: str) -> ResourceSpec:
    where = f"resource #{index + 1}"
    if not isinstance(entry, dict):
        raise StackError(
            f"{where} must be a mapping", file=file, policy=policy, expected="e.g. `- file: /etc/motd`", got=entry
        )
    kinds = [k for k in entry if k in TYPES]
    if len(kinds) != 1:
        raise StackError(
            f"{where} must name exactly one resource type",
            file=file,
            policy=policy,
            expected=f"one key of {', '.join(TYPES)}",
            got=kinds or sorted(map(str, entry)),
        )
    rtype = kinds[0]
    name = entry[rtype]
    if not isinstance(name, str) or not name.strip():
        raise StackError(f"{where} ({rtype}) needs a name", file=file, policy=policy, expected="a non-empty string", got=name)
    attrs = validate_resource(
        rtype, name, {k: v for k, v in entry.items() if k != rtype}, file=file, policy=policy
    )
    rid = f"{rtype}:{name}"
    if attrs.get("when") is not None:
        attrs["when"] = _check_condition(attrs["when"], file=file, policy=policy, resource=rid)
    for key in ("template", "source"):
        if rtype == "file" and attrs.get(key) is not None:
            folder = "templates" if key == "template" else "files"
            rel = _clean_relpath(attrs[key], file=file, policy=policy, resource=rid, attr=key)
            target = root / folder / rel
            _inside(root, target, file=file, policy=policy, resource=rid)
            attrs[key] = rel
    return ResourceSpec(type=rtype, name=name, attrs=attrs)


def _check_condition(source: Any, *, file: str, policy: str, resource: str | None) -> str:
    if not isinstance(source, str):
        raise StackError("`when` must be an expression string", file=file, policy=policy, resource=resource, expected="a string such as os.family == \"debian\"", got=source)
    try:
        conditions.parse(source)
    except ConditionSyntaxError as exc:
        raise StackError(f"`when` does not parse: {exc}", file=file, policy=policy, resource=resource) from exc
    return source


def _clean_relpath(rel: str, *, file: str, policy: str, resource: str, attr: str) -> str:
    parts = rel.replace("\\", "/").split("/")
    if rel.startswith("/") or any(p == ".." for p in parts) or "\0" in rel or not rel.strip():
        raise PathEscapeError(
            f"{attr} path leaves its folder",
            file=file,
            policy=policy,
            resource=resource,
            expected=f"a relative path inside {'templates' if attr == 'template' else 'files'}/ without '..'",
            got=rel,
        )
    return "/".join(p for p in parts if p not in ("", "."))


def _inside(root: Path, path: Path, **where: Any) -> None:
    """Refuse a path whose real location (symlinks followed) is outside the stack."""
    real = Path(os.path.realpath(path))
    if real != root and root not in real.parents:
        raise PathEscapeError(
            "path escapes the stack folder",
            **where,
            expected=f"a location inside {root}",
            got=f"{path} -> {real}",
        )


def _read_tree(root: Path, folder: str, *, text: bool) -> dict[str, Any]:
    """Every regular file under ``root/folder``, keyed by its path relative to that folder."""
    base = root / folder
    if not base.exists():
        return {}
    _inside(root, base, file=folder)
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        dirnames.sort()  # walk order decides the bundle's bytes, and so its version
        for d in list(dirnames):
            if (here / d).is_symlink():
                _inside(root, here / d, file=str((here / d).relative_to(root)))
                dirnames.remove(d)  # symlinked folders inside the stack are not walked twice
        for name in sorted(filenames):
            path = here / name
            rel = str(path.relative_to(base))
            _inside(root, path, file=f"{folder}/{rel}")
            if text:
                try:
                    out[rel] = path.read_text(encoding="utf-8")
                except UnicodeDecodeError as exc:
                    raise StackError("template is not UTF-8 text", file=f"{folder}/{rel}", expected="UTF-8", got=str(exc)) from exc
            else:
                out[rel] = path.read_bytes()
    return out


def _collect_files(root: Path, policies: list[PolicySpec]) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for policy in policies:
        for res in policy.resources:
            src = res.attrs.get("source") if res.type == "file" else None
            if src is None or src in files:
                continue
            path = root / "files" / src
            if not path.is_file():
                raise StackError(
                    "source file not found",
                    file=policy.file,
                    policy=policy.name,
                    resource=res.id,
                    expected=f"a file files/{src} in the stack",
                    got="nothing there" if not path.exists() else "not a regular file",
                )
            files[src] = path.read_bytes()
    return files


def _check_unique(policies: list[PolicySpec]) -> None:
    names: dict[str, str] = {}
    ids: dict[str, str] = {}
    for policy in policies:
        if policy.name in names:
            raise StackError(
                "duplicate policy name", file=policy.file, policy=policy.name,
                expected="a name used once", got=f"also in {names[policy.name]}",
            )
        names[policy.name] = policy.file
        for res in policy.resources:
            if res.id in ids:
                raise StackError(
                    "duplicate resource", file=policy.file, policy=policy.name, resource=res.id,
                    expected="each type:name declared once in the stack", got=f"also declared in {ids[res.id]}",
                )
            ids[res.id] = f"{policy.file} (policy {policy.name!r})"


def _check_graph(policies: list[PolicySpec]) -> None:
    declared = {res.id: (policy, res) for policy in policies for res in policy.resources}
    for policy, res in declared.values():
        for key in ("requires", "notify"):
            for ref in res.attrs[key]:
                if ref not in declared:
                    raise StackError(
                        f"{key} names a resource that is not in the stack",
                        file=policy.file, policy=policy.name, resource=res.id,
                        expected="an id declared in some policy", got=ref,
                    )
                if key == "notify" and ref.split(":", 1)[0] not in NOTIFIABLE:
                    raise StackError(
                        "notify target cannot be refreshed",
                        file=policy.file, policy=policy.name, resource=res.id,
                        expected=f"a resource of type {' or '.join(NOTIFIABLE)}", got=ref,
                    )
    nodes = [graph.node_of(res.type, res.name, res.attrs) for _, res in declared.values()]
    try:
        graph.order(nodes)
    except CycleError as exc:
        policy, res = declared[exc.cycle[0]]
        raise StackError(
            str(exc), file=policy.file, policy=policy.name, resource=res.id,
            expected="requires/notify/parent-directory edges without a loop", got="a cycle",
        ) from exc


assert set(SCHEMAS) >= set(NOTIFIABLE)
