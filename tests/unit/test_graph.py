"""Ordering: requires, notify and parent-directory edges; declaration order among equals."""

import pytest

from vigo.errors import CycleError
from vigo.policy.graph import Node, dependents, order


def test_declaration_order_kept_without_edges():
    nodes = [Node("exec:c", "exec", "c"), Node("exec:a", "exec", "a"), Node("exec:b", "exec", "b")]
    assert order(nodes) == ["exec:c", "exec:a", "exec:b"]


def test_requires_notify_and_parent_edges():
    nodes = [
        Node("file:/srv/app/conf", "file", "/srv/app/conf", notify=("service:app",)),
        Node("service:app", "service", "app", requires=("package:app",)),
        Node("package:app", "package", "app"),
        Node("directory:/srv/app", "directory", "/srv/app"),
        Node("directory:/srv", "directory", "/srv"),
    ]
    got = order(nodes)
    assert got.index("directory:/srv") < got.index("directory:/srv/app") < got.index("file:/srv/app/conf")
    assert got.index("file:/srv/app/conf") < got.index("service:app")
    assert got.index("package:app") < got.index("service:app")
    assert dependents(nodes)["file:/srv/app/conf"] == {"service:app"}


def test_cycle_named():
    nodes = [Node("exec:a", "exec", "a", requires=("exec:b",)), Node("exec:b", "exec", "b", requires=("exec:a",))]
    with pytest.raises(CycleError) as info:
        order(nodes)
    assert info.value.cycle[0] == info.value.cycle[-1] and set(info.value.cycle) == {"exec:a", "exec:b"}


def test_missing_requirements_are_ignored_by_the_graph():
    assert order([Node("exec:a", "exec", "a", requires=("exec:zz",))]) == ["exec:a"]
