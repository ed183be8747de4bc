"""One error tree: every exception vigo raises derives from VigoError and is defined in
vigo/errors.py, the tree drawn in its docstring is the tree in the code, and the wire error
codes map to classes in one table shared by the envoy and the server."""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import vigo
from vigo import errors, protocol
from vigo.errors import (
    AdmissionError,
    CacheError,
    ConfigError,
    ConnectError,
    PathEscapeError,
    ProtocolError,
    RevokedError,
    SecretError,
    ServerError,
    StackError,
    StoreError,
    TokenError,
    TransportError,
    UnavailableError,
    VigoError,
    code_of,
    error_from_code,
)

ROOT = Path(vigo.__file__).parent

# Builtin exceptions raised on purpose, by (qualified name of the enclosing function, exception
# name as written). Anything else raised in vigo/ must derive from VigoError. An entry that no
# longer matches a raise fails the test too: the list only holds what is still true.
ALLOWED_RAISES: dict[tuple[str, str], str] = {
    # The callers' bugs: arguments that vigo's own code controls, checked like the stdlib does.
    ("full_jitter", "ValueError"): "a negative attempt count is a bug in the caller",
    ("Backoff.__init__", "ValueError"): "base and cap come from validated settings: a bug if wrong",
    ("flush_pause", "ValueError"): "max_reports is a constant: a bug if not positive",
    ("next_run_at", "ValueError"): "the interval is validated before the schedule exists",
    ("error_body", "ValueError"): "an error code outside ERROR_CODES is a bug in the sender",
    ("Member.inject_fault", "ValueError"): "a test hook asked for a fault it does not know",
    ("Simulation.__init__", "ValueError"): "the roster simulator (tests, benchmarks) misconfigured",
    ("Simulation.restart", "ValueError"): "the roster simulator (tests, benchmarks) misused",
    ("_plan_one", "TypeError"): "a settings class declared without a kind: fails at import, a bug",
    ("_check_kind", "AssertionError"): "a kind missing from the schema's own table: unreachable",
    # Protocols of the language and of libraries.
    ("Resource.apply", "NotImplementedError"): "abstract method of the resource base class",
    ("Provider.tools", "NotImplementedError"): "abstract member of a package provider",
    ("Provider.read", "NotImplementedError"): "abstract method of a package provider",
    ("Provider.install", "NotImplementedError"): "abstract method of a package provider",
    ("Provider.remove", "NotImplementedError"): "abstract method of a package provider",
    ("resource_class", "KeyError"): "a lookup by key, as a Mapping answers; the schema checks types first",
    ("_server_arg", "argparse.ArgumentTypeError"): "argparse's protocol for type= converters (usage, 64)",
    ("_fingerprint_arg", "argparse.ArgumentTypeError"): "argparse's protocol for type= converters",
    ("_seconds_arg.<locals>.parse", "argparse.ArgumentTypeError"): "argparse's protocol for type= converters",
    # Raised inside a try whose except clause translates it into a VigoError at once.
    ("RevocationSet.from_list", "TypeError"): "translated to AdmissionError by the enclosing try",
    ("read_header", "ValueError"): "translated to a BackupError by the enclosing try",
    ("read_header", "TypeError"): "translated to a BackupError by the enclosing try",
    ("_member_up.<locals>.probe", "RuntimeError"): "a probe's 'not yet': _until retries, then ConfigError",
    ("_gateway_up.<locals>.probe", "RuntimeError"): "a probe's 'not yet': _until retries, then ConfigError",
    # Foreign failures kept in their own kind, where the callers handle that kind.
    ("_hash_range", "OSError"): "a short read of a local file: handled with the other OSErrors",
    ("Topology.set_primary", "ValueError"): "control refuses a stale term across a Ray call; the "
    "callers catch ValueError, which Ray re-raises faithfully for builtins",
    ("RayBackend.resolve", "RuntimeError"): "behind the gateway: its catch-all answers `unavailable` "
    "with the type's name in the reason, which stays as it is on the wire",
    ("RayBackend._call", "RuntimeError"): "behind the gateway, as above",
    ("SpannerBackend.bundle_bytes", "RuntimeError"): "behind the gateway, as above",
}

# Exception classes defined outside vigo/errors.py on purpose, by "module.Class": none today.
ALLOWED_CLASSES: dict[str, str] = {}


@dataclass(frozen=True)
class Raise:
    module: str
    line: int
    scope: str  # qualified name of the enclosing function ("" at module level)
    written: str  # the raised expression's callee, as written
    resolved: Any  # the class it names, or None (a re-raise, a local, a factory we cannot see)


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found.append((name, path))
    return found


class _Resolver:
    """Names in one module: its globals, then any import in the file (lazy ones inside
    functions included), then nested function definitions' return annotations, then builtins."""

    def __init__(self, module_name: str, tree: ast.Module) -> None:
        self.module = importlib.import_module(module_name)
        self.imports: dict[str, tuple[str, str | None]] = {}
        self.local_defs: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    self.imports[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    self.imports[alias.asname or alias.name.split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0], None)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                self.local_defs.setdefault(node.name, node)

    def name(self, name: str) -> Any:
        if name in vars(self.module):
            return vars(self.module)[name]
        if name in self.imports:
            module, attr = self.imports[name]
            target = importlib.import_module(module)
            return getattr(target, attr) if attr else target
        if name in self.local_defs:
            return self.local_defs[name]
        return getattr(builtins, name, None)

    def expr(self, node: ast.expr, cls: Any) -> Any:
        chain: list[str] = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        obj = cls if node.id == "self" and cls is not None else self.name(node.id)
        for attr in chain:
            obj = getattr(obj, attr, None)
        return obj

    def returned(self, func: Any) -> list[Any]:
        """The classes a factory's return annotation names (``-> A | B``), if it has one."""
        if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.unparse(func.returns) if func.returns is not None else ""
            globals_ = vars(self.module)
        else:
            try:
                text = inspect.signature(func).return_annotation
            except (TypeError, ValueError):
                return []
            globals_ = getattr(inspect.unwrap(func), "__globals__", {})
            if not isinstance(text, str):
                text = getattr(text, "__name__", "")
        names = [part.strip() for part in text.split("|")] if text else []
        found = [globals_.get(n, getattr(builtins, n, None)) for n in names if n != "None"]
        return found if found and all(inspect.isclass(c) for c in found) else []


def _raises() -> list[Raise]:
    out: list[Raise] = []
    for module_name, path in _modules():
        tree = ast.parse(path.read_text(), str(path))
        resolver = _Resolver(module_name, tree)

        def visit(node: ast.AST, scope: list[str], cls: Any,
                  module_name: str = module_name, resolver: _Resolver = resolver) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.ClassDef):
                    owner = resolver.module if not scope else None
                    visit(child, [*scope, child.name], getattr(owner, child.name, None) if owner else None)
                elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    inner = [*scope, child.name, "<locals>"]
                    visit(child, inner, cls)
                elif isinstance(child, ast.Raise) and child.exc is not None:
                    callee = child.exc.func if isinstance(child.exc, ast.Call) else child.exc
                    where = ".".join(scope).removesuffix(".<locals>")
                    out.append(Raise(module_name, child.lineno, where, ast.unparse(callee),
                                     resolver.expr(callee, cls)))
                    visit(child, scope, cls)
                else:
                    visit(child, scope, cls)

        visit(tree, [], None)
    return out


def _problem(r: Raise, resolver_cache: dict[str, _Resolver]) -> str | None:
    obj = r.resolved
    if inspect.isclass(obj):
        classes = [obj]
    else:
        if obj is None:
            # Not a module-level name: a re-raise (`raise exc`), a local variable, a nested
            # factory. A capitalised name that resolves to nothing is a class we cannot find.
            head = r.written.split(".")[0]
            return f"cannot resolve {r.written}" if head[:1].isupper() else None
        if r.module not in resolver_cache:
            resolver_cache[r.module] = _Resolver(r.module, ast.parse(
                Path(inspect.getfile(importlib.import_module(r.module))).read_text()))
        classes = resolver_cache[r.module].returned(obj)
        if not classes:
            return None  # a factory without a return annotation naming classes
    bad = [c for c in classes if not issubclass(c, BaseException) or not issubclass(c, VigoError)]
    if not bad:
        return None
    if (r.scope, r.written) in ALLOWED_RAISES:
        return None
    return f"{r.written} ({', '.join(c.__name__ for c in bad)}) is not a VigoError"


def test_every_exception_raised_in_vigo_derives_from_the_root():
    raises = _raises()
    assert len(raises) > 500, "the walk found too few raises: is it looking at vigo/?"
    cache: dict[str, _Resolver] = {}
    problems = [f"{r.module}:{r.line} in {r.scope or '<module>'}: {why}"
                for r in raises if (why := _problem(r, cache)) is not None]
    assert not problems, "raise a class from vigo/errors.py (or allow-list it with a reason):\n" + "\n".join(problems)
    used = {(r.scope, r.written) for r in raises}
    stale = sorted(set(ALLOWED_RAISES) - used)
    assert not stale, f"allow-list entries that match no raise any more: {stale}"


def test_no_exception_class_is_defined_outside_errors_py():
    found = []
    for module_name, path in _modules():
        if module_name == "vigo.errors":
            continue
        tree = ast.parse(path.read_text(), str(path))
        resolver = _Resolver(module_name, tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [resolver.expr(base, None) for base in node.bases]
            top = vars(resolver.module).get(node.name)
            if inspect.isclass(top) and top.__module__ == module_name:
                bases.append(top)
            if any(inspect.isclass(b) and issubclass(b, BaseException) for b in bases):
                qualified = f"{module_name}.{node.name}"
                if qualified not in ALLOWED_CLASSES:
                    found.append(f"{qualified} (line {node.lineno})")
    assert not found, "define exception classes in vigo/errors.py: " + ", ".join(found)


# --- the drawing ------------------------------------------------------------------------------

_NODE = re.compile(r"^(?P<indent>[ │├└─]*)(?P<name>[A-Z]\w+)(?:\((?P<mixin>\w+)\))?(?:\s|$)")


def _drawn() -> list[tuple[int, str, str | None]]:
    doc = errors.__doc__ or ""
    lines = doc[doc.index("    VigoError"):].splitlines()
    out = []
    for line in lines:
        if not line.strip():
            break
        match = _NODE.match(line)
        if match and ("──" in match["indent"] or match["name"] == "VigoError"):
            out.append((len(match["indent"]), match["name"], match["mixin"]))
    return out


def test_the_tree_in_the_docstring_is_the_tree_in_the_code():
    drawn = _drawn()
    defined = {name for name, obj in vars(errors).items()
               if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == "vigo.errors"}
    assert {name for _, name, _ in drawn} == defined
    stack: list[tuple[int, str]] = []
    for column, name, mixin in drawn:
        while stack and stack[-1][0] >= column:
            stack.pop()
        cls = getattr(errors, name)
        if stack:
            parent = getattr(errors, stack[-1][1])
            assert cls.__bases__[0] is parent, f"{name} is drawn under {parent.__name__}"
        else:
            assert cls is VigoError
        if mixin:
            assert getattr(builtins, mixin) in cls.__bases__, f"{name} is drawn with {mixin}"
        else:
            assert len(cls.__bases__) == 1, f"{name} has mix-ins the drawing does not show"
        stack.append((column, name))


# --- the code table ---------------------------------------------------------------------------


def test_the_code_table_covers_exactly_the_wire_codes():
    assert set(errors.CODES) == set(protocol.ERROR_CODES)
    carried = {cls.__name__: cls.__dict__["code"] for cls in vars(errors).values()
               if inspect.isclass(cls) and issubclass(cls, VigoError) and "code" in cls.__dict__}
    assert carried == {"ConfigError": "bad_body", "StackError": "bad_body", "SecretError": "bad_body",
                       "AdmissionError": "forbidden", "TokenError": "bad_token", "RevokedError": "revoked",
                       "StoreError": "unavailable"}
    assert set(carried.values()) <= set(protocol.ERROR_CODES)


@pytest.mark.parametrize("code", list(protocol.ERROR_CODES))
def test_a_client_turns_each_code_into_its_class(code):
    error = error_from_code(code, "why", retry_after_s=1.5)
    assert (error.code, error.reason, error.retry_after_s) == (code, "why", 1.5)
    if code in ("overloaded", "unavailable"):  # nobody could serve it: retry later, exit 3
        assert type(error) is UnavailableError and isinstance(error, TransportError | ConnectionError)
        assert not isinstance(error, ServerError) and error.exit_code == 3
        assert str(error) == f"server unavailable ({code}): why (retry after 1.5 s)"
    else:  # the control plane's answer
        assert type(error) is ServerError and not isinstance(error, ConnectionError)
        assert error.exit_code == 1 and str(error) == f"server refused ({code}): why"


def test_an_unknown_code_is_a_server_answer_that_keeps_its_code():
    error = error_from_code("teapot", "short and stout")
    assert type(error) is ServerError and error.code == "teapot" and error.retry_after_s is None


@pytest.mark.parametrize(("exc", "code"), [
    (TokenError("x"), "bad_token"),
    (RevokedError("x"), "revoked"),
    (AdmissionError("x"), "forbidden"),
    (StackError("x"), "bad_body"),
    (PathEscapeError("x"), "bad_body"),
    (ConfigError("x"), "bad_body"),
    (SecretError("x"), "bad_body"),
    (StoreError("x"), "unavailable"),
    (ProtocolError("not_found", "x"), "not_found"),
    (CacheError("x"), "conflict"),  # any other VigoError
    (ServerError("not_found", "x"), "conflict"),  # an answer received is not re-sent as such
    (ValueError("x"), "internal"),  # not ours: a bug
])
def test_a_server_answers_each_error_with_its_code(exc, code):
    assert code_of(exc) == code


def test_transport_errors_are_not_server_answers():
    assert not issubclass(TransportError, ServerError) and not issubclass(ServerError, TransportError)
    assert issubclass(ConnectError, UnavailableError) and issubclass(UnavailableError, TransportError)
    error = ConnectError("unavailable", "cannot connect")
    assert isinstance(error, ConnectionError | OSError) and error.exit_code == 3
    assert str(error) == "server unavailable (unavailable): cannot connect"
