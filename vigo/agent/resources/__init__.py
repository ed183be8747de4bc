"""Resource types, one module each. ``resource_class("file")`` finds ``vigo.agent.resources.file.RESOURCE``.

Each module reads host state, then changes it (see ``base``); the attribute schema of every type
lives in ``vigo.policy.schema`` so the stack builder validates without importing resources.
"""

from __future__ import annotations

import importlib

from vigo.agent.resources.base import (
    CHANGED,
    FAILED,
    OK,
    SKIPPED,
    STATUSES,
    Outcome,
    Resource,
    RunContext,
)
from vigo.policy.schema import TYPES

__all__ = [
    "CHANGED",
    "FAILED",
    "OK",
    "SKIPPED",
    "STATUSES",
    "Outcome",
    "Resource",
    "RunContext",
    "resource_class",
]

_loaded: dict[str, type[Resource]] = {}


def resource_class(rtype: str) -> type[Resource]:
    """The class implementing resource type ``rtype`` (imported on first use)."""
    cls = _loaded.get(rtype)
    if cls is None:
        if rtype not in TYPES:
            raise KeyError(f"unknown resource type {rtype!r}; known: {', '.join(TYPES)}")
        module = importlib.import_module(f"vigo.agent.resources.{rtype}")
        cls = module.RESOURCE
        _loaded[rtype] = cls
    return cls
