"""Resource ordering: explicit `requires`, `notify` (the notifier runs first) and the implicit
edge from a managed directory to every path resource inside it.

The same function orders the whole stack at build time (where a cycle is a build error naming
the cycle) and the active subset on the envoy (where the traits decided which policies apply).
Ties keep declaration order, so a run is predictable from reading the policy files.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vigo.errors import CycleError

PATH_TYPES = ("file", "directory", "symlink")


@dataclass(frozen=True)
class Node:
    id: str
    type: str
    name: str
    requires: tuple[str, ...] = ()
    notify: tuple[str, ...] = ()


def node_of(rtype: str, name: str, attrs: dict) -> Node:
    """The graph's view of one resource (path resources keyed by their normalised path)."""
    return Node(
        id=f"{rtype}:{name}",
        type=rtype,
        name=(name.rstrip("/") or "/") if rtype in PATH_TYPES else name,
        requires=tuple(attrs.get("requires") or ()),
        notify=tuple(attrs.get("notify") or ()),
    )


def edges(nodes: Sequence[Node]) -> dict[str, set[str]]:
    """``before[x]`` = ids that must converge before x (only ids present in ``nodes``)."""
    present = {n.id for n in nodes}
    before: dict[str, set[str]] = {n.id: set() for n in nodes}
    for n in nodes:
        before[n.id].update(r for r in n.requires if r in present)
        for target in n.notify:
            if target in present:
                before[target].add(n.id)
    directories = {n.name: n.id for n in nodes if n.type == "directory"}
    for n in nodes:
        if n.type in PATH_TYPES:
            parent = _nearest_managed_parent(n.name, directories)
            if parent is not None and parent != n.id:
                before[n.id].add(parent)
    return before


def _nearest_managed_parent(path: str, directories: dict[str, str]) -> str | None:
    current = path.rstrip("/")
    while "/" in current:
        current = current.rsplit("/", 1)[0]
        found = directories.get(current or "/")
        if found is not None:
            return found
        if not current:
            break
    return None


def order(nodes: Sequence[Node]) -> list[str]:
    """Topological order, declaration order among equals. Raises CycleError naming a cycle."""
    before = edges(nodes)
    position = {n.id: i for i, n in enumerate(nodes)}
    after: dict[str, list[str]] = {n.id: [] for n in nodes}
    waiting = {nid: len(deps) for nid, deps in before.items()}
    for nid, deps in before.items():
        for dep in deps:
            after[dep].append(nid)
    ready = [(position[nid], nid) for nid, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    result: list[str] = []
    while ready:
        _, nid = heapq.heappop(ready)
        result.append(nid)
        for nxt in after[nid]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, (position[nxt], nxt))
    if len(result) != len(nodes):
        raise CycleError(_find_cycle({k: v for k, v in before.items() if waiting[k] > 0}))
    return result


def _find_cycle(before: dict[str, set[str]]) -> list[str]:
    """Walk unfinished nodes backwards until one repeats: that loop is a cycle."""
    start = min(before)
    seen: dict[str, int] = {}
    path: list[str] = []
    current = start
    while current not in seen:
        seen[current] = len(path)
        path.append(current)
        current = min(d for d in before[current] if d in before)
    loop = path[seen[current]:]
    loop.reverse()  # read as "a must come before b"
    return [*loop, loop[0]]


def dependents(nodes: Iterable[Node]) -> dict[str, set[str]]:
    """``after[x]`` = ids that directly wait for x, for skipping what depends on a failure."""
    nodes = list(nodes)
    after: dict[str, set[str]] = {n.id: set() for n in nodes}
    for nid, deps in edges(nodes).items():
        for dep in deps:
            after[dep].add(nid)
    return after
