"""The layers of docs/ARCHITECTURE.md, enforced.

Every `import` in vigo/ (top-level and the lazy ones inside functions alike: a lazy import is
still an arrow in the design) must point down the layer table below or stay inside its own
package; no two modules may import each other through any path; and the Ray-free packages must
not load Ray. A new module that does not fit the table fails `test_every_module_has_a_layer`, so
the table (and the architecture page) is updated in the same change that adds it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import vigo

ROOT = Path(vigo.__file__).parent

# package (or top-level module) -> layer. Imports go to a strictly lower layer, or stay inside
# the importing package. The agent sits beside the server, not above it: it reaches only the
# policy layer and below, and never the server, state, snapshots, roster or actors.
LAYERS: dict[str, int] = {
    # bottom: the error tree and small helpers that know nothing of vigo's roles
    "vigo": 0,  # vigo/__init__.py: the version only
    "vigo.errors": 0,
    "vigo.durable": 1,
    "vigo.hostaddr": 1,
    "vigo.timefmt": 1,
    "vigo.retry": 1,
    "vigo.fields": 1,
    # the shared vocabulary of both sides
    "vigo.crypto": 2,
    "vigo.protocol": 2,
    "vigo.config": 2,
    "vigo.raytoken": 2,
    # the state and the things built on plain data
    "vigo.state": 3,
    "vigo.policy": 3,
    "vigo.roster": 3,
    "vigo.snapshots": 4,
    # the two roles' cores
    "vigo.agent": 5,
    "vigo.server": 5,
    "vigo.console": 5,  # the web console's core: knows the fleet only through admin answers
    # Ray shells over the server's cores
    "vigo.actors": 6,
    # the operator's command line
    "vigo.cli": 7,
    "vigo.examples": 0,  # data only
}

# Packages that may never be imported by the one named on the left, whatever the layers say.
FORBIDDEN: dict[str, set[str]] = {
    "vigo.agent": {"vigo.server", "vigo.state", "vigo.snapshots", "vigo.roster", "vigo.actors", "vigo.cli",
                   "vigo.config", "vigo.raytoken"},
    "vigo.server": {"vigo.agent"},
    # The console reads what vigocli reads (admin operations), never the cores or the database.
    "vigo.console": {"vigo.server", "vigo.agent", "vigo.state", "vigo.snapshots", "vigo.roster", "vigo.policy"},
}

RAY_FREE = ["vigo.errors", "vigo.crypto", "vigo.protocol", "vigo.config", "vigo.state", "vigo.policy",
            "vigo.roster", "vigo.snapshots", "vigo.server", "vigo.agent", "vigo.console"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every vigo module this module imports, resolved to a module that exists (a `from pkg
    import name` names the submodule when there is one, else the package)."""
    tree = ast.parse(path.read_text(), str(path))
    modules = _modules_cache
    out: set[str] = set()
    type_checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking.update(id(n) for n in ast.walk(node))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue  # annotations only: no arrow at run time
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("vigo") and target != name:
                out.add(target)
    return out


_modules_cache = _modules()


def _layer_key(module: str) -> str | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            # vigo.X.Y belongs to vigo.X's entry; "vigo" itself only to the root module
            if key == "vigo" and module != "vigo":
                continue
            return key
    return None


GRAPH = {name: _imports(name, path) for name, path in _modules_cache.items()}


def test_every_module_has_a_layer():
    missing = sorted(m for m in GRAPH if _layer_key(m) is None)
    assert not missing, f"modules with no layer in {__name__}.LAYERS (add them, and to docs/ARCHITECTURE.md): {missing}"


def test_imports_point_down():
    upward = []
    for module, targets in GRAPH.items():
        src = _layer_key(module)
        for target in targets:
            dst = _layer_key(target)
            if src is None or dst is None or src == dst:
                continue
            if LAYERS[dst] >= LAYERS[src] or dst in FORBIDDEN.get(src, set()):
                upward.append(f"{module} ({src}, layer {LAYERS[src]}) imports {target} ({dst}, layer {LAYERS[dst]})")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_agent_reaches_only_what_the_design_allows():
    for module, targets in GRAPH.items():
        if _layer_key(module) != "vigo.agent":
            continue
        bad = {t for t in targets if _layer_key(t) in FORBIDDEN["vigo.agent"]}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_no_import_cycles():
    """Tarjan's strongly connected components over the module graph: any component with more
    than one module is a cycle, printed with its members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in GRAPH:
        if v not in index:
            visit(v)
    # A package's __init__ that re-exports its submodules, which in turn import a sibling through
    # the package, is not a design cycle; only cycles between distinct non-__init__ modules are.
    real = [c for c in cycles if len([m for m in c if not _is_package(m)]) > 1]
    assert not real, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in real)


def _is_package(module: str) -> bool:
    return _modules_cache[module].name == "__init__.py"


@pytest.mark.parametrize("package", RAY_FREE)
def test_ray_free_packages_do_not_load_ray(package):
    names = sorted(m for m in GRAPH if m == package or m.startswith(package + "."))
    probe = ("import importlib, sys\n"
             f"for name in {names!r}:\n"
             "    importlib.import_module(name)\n"
             "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
             "print('RAY ' + ' '.join(loaded[:5]) if loaded else 'CLEAN')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "CLEAN", f"{package}: {out.stdout.strip()}"


def test_ray_is_called_from_one_module_only():
    """Every Ray API call lives behind the actors' wrapper; the rest of vigo/actors and the CLI
    go through it (so the logic can be tested with its fake)."""
    callers = sorted(
        str(path.relative_to(ROOT.parent)) for path in ROOT.rglob("*.py")
        if any(line.lstrip().startswith(("import ray", "from ray")) for line in path.read_text().splitlines()))
    assert len(callers) == 1, f"modules importing Ray directly: {callers}"
