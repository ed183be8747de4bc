"""Settings declared once: each field's kind, default and allowed range sit next to the field,
and one engine reads a file's mapping against them.

    @dataclass
    class ListenConfig:
        #: TCP port of the gateway (TLS).
        port: int = field(7700, min=1, max=65535)

The kind comes from the annotation (``bool``, ``int``, ``float``, ``str``, ``list[str]``; ``X |
None`` is X) unless ``kind=`` names one (``Kind``: what a value must be, what it becomes); a field
whose annotation is another dataclass is a nested ``section`` (keys ``section.key``).

``from_mapping(cls, data, where)`` builds ``cls`` from plain data (a parsed YAML mapping). An
unknown key, a value of the wrong kind or out of range is a ``ConfigError`` naming the key, what
was expected and what arrived (``gateway.batch_max: 0 is out of range (allowed 1..100000)``).
Checks run in a fixed order, so the first error of a file is always the same one: unknown keys
(first by name), then each value's kind in the file's order (a section checked whole when it is
reached), then the ranges in declaration order. Checks across fields stay with their config.

Bottom layer, imported by the envoy: the standard library and ``vigo.errors`` only.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vigo.errors import ConfigError

__all__ = ["BOOL", "FLOAT", "INT", "NAMES", "STR", "Kind", "Spec", "Wording", "field", "from_mapping",
           "section", "specs"]

_META = "vigo.fields"


def _same(value: Any) -> Any:
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class Kind:
    """What a value must be (``accepts``; ``expect`` says it in an error: "expected a number,
    got 'soon'") and what it becomes (``convert``, which may refuse with a ``ConfigError`` of its
    own that the engine prefixes with the key)."""

    expect: str
    accepts: Callable[[Any], bool]
    convert: Callable[[Any], Any] = _same


BOOL = Kind("true or false", lambda v: isinstance(v, bool))
INT = Kind("a whole number", lambda v: isinstance(v, int) and not isinstance(v, bool))
FLOAT = Kind("a number", _is_number, float)
STR = Kind("a string", lambda v: isinstance(v, str))
NAMES = Kind("a list of names", lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v), list)

_BY_ANNOTATION: dict[Any, Kind] = {bool: BOOL, int: INT, float: FLOAT, str: STR, list[str]: NAMES}


@dataclass(frozen=True)
class Spec:
    """One field's declaration: its kind (None: from the annotation) and its allowed range."""

    kind: Kind | None = None
    min: float | None = None
    max: float | None = None

    def allows(self, value: Any) -> bool:
        return not ((self.min is not None and value < self.min) or (self.max is not None and value > self.max))

    def allowed(self) -> str:
        """The range as errors and docs write it: ``1..65535``, ``>= 0.1``, ``<= 16``."""
        if self.min is not None and self.max is not None:
            return f"{self.min}..{self.max}"
        return f">= {self.min}" if self.min is not None else f"<= {self.max}"


def field(default: Any, *, kind: Kind | None = None, min: float | None = None, max: float | None = None) -> Any:
    """A dataclass field with its default, kind and range in one place. A list default is
    copied for every instance."""
    spec = Spec(kind, min, max)
    if isinstance(default, list):
        return dataclasses.field(default_factory=default.copy, metadata={_META: spec})
    return dataclasses.field(default=default, metadata={_META: spec})


def section(cls: type) -> Any:
    """A nested section: a field holding another settings dataclass, all defaults by default."""
    return dataclasses.field(default_factory=cls)


@dataclass(frozen=True)
class Wording:
    """How one file words two of its refusals. server.yaml and envoy.yaml grew up apart and
    tests and docs quote both, so each keeps its words.

    ``mapping``: what a section that is not a mapping was expected to be. ``below_minimum``:
    a value under a field's ``min`` reads "V is below the smallest allowed value MIN" (V as
    written) instead of "V is out of range (allowed MIN..MAX)" (V as converted)."""

    mapping: str = "a mapping"
    below_minimum: bool = False


SERVER_WORDING = Wording()


@dataclass(frozen=True)
class _Plan:
    name: str
    kind: Kind | None  # None: a section
    spec: Spec
    section: type | None


_PLANS: dict[type, tuple[_Plan, ...]] = {}


def _plan(cls: type) -> tuple[_Plan, ...]:
    plan = _PLANS.get(cls)
    if plan is None:
        hints = typing.get_type_hints(cls)
        plan = tuple(_plan_one(cls, f, hints[f.name]) for f in dataclasses.fields(cls))
        _PLANS[cls] = plan
    return plan


def _plan_one(cls: type, f: dataclasses.Field, hint: Any) -> _Plan:
    spec: Spec = f.metadata.get(_META, Spec())
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = options[0] if len(options) == 1 else hint
    if dataclasses.is_dataclass(hint):
        return _Plan(f.name, None, spec, hint)
    kind = spec.kind or _BY_ANNOTATION.get(hint)
    if kind is None:
        raise TypeError(f"{cls.__name__}.{f.name}: no kind for {hint!r}; declare it with field(..., kind=)")
    return _Plan(f.name, kind, spec, None)


def specs(cls: type, prefix: str = "") -> dict[str, tuple[Any, Spec]]:
    """Every leaf setting of ``cls`` by dotted key: (default, spec). For docs and their tests."""
    out: dict[str, tuple[Any, Spec]] = {}
    defaults = cls()
    for plan in _plan(cls):
        if plan.section is not None:
            out.update(specs(plan.section, f"{prefix}{plan.name}."))
        else:
            out[f"{prefix}{plan.name}"] = (getattr(defaults, plan.name), plan.spec)
    return out


def from_mapping(cls: type, data: Any, where: str = "", *, name: str = "", null_is_unset: bool = False,
                 wording: Wording = SERVER_WORDING) -> Any:
    """``cls`` built from ``data``, every key and value checked; ``ConfigError`` otherwise.

    ``where`` prefixes every key in messages (``"gateway."``, ``"/etc/vigo-envoy/envoy.yaml: "``);
    ``name`` names the whole document when it is not a mapping and ``where`` is empty.
    ``null_is_unset``: a key set to null keeps its default (else null is a wrong kind). A
    section set to null is an empty section either way.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        label = where.removesuffix(": ") or name
        raise ConfigError(f"{label}: expected {wording.mapping}, got {type(data).__name__}")
    plans = _plan(cls)
    by_name = {p.name: p for p in plans}
    unknown = sorted((k for k in data if k not in by_name), key=str)
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown setting (expected one of {', '.join(sorted(by_name))})")
    values: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for key, value in data.items():
        plan = by_name[key]
        if plan.section is not None:
            values[key] = from_mapping(plan.section, value, f"{where}{key}.", name=name,
                                       null_is_unset=null_is_unset, wording=wording)
            continue
        if value is None and null_is_unset:
            continue
        kind = plan.kind
        assert kind is not None
        if not kind.accepts(value):
            raise ConfigError(f"{where}{key}: expected {kind.expect}, got {value!r}")
        try:
            values[key] = kind.convert(value)
        except ConfigError as exc:
            raise ConfigError(f"{where}{key}: {exc}") from None
        raw[key] = value
    for plan in plans:
        if plan.name not in raw or plan.spec.allows(values[plan.name]):
            continue
        spec = plan.spec
        if wording.below_minimum and spec.min is not None and values[plan.name] < spec.min:
            raise ConfigError(f"{where}{plan.name}: {raw[plan.name]!r} is below the smallest allowed value {spec.min}")
        raise ConfigError(f"{where}{plan.name}: {values[plan.name]!r} is out of range (allowed {spec.allowed()})")
    return cls(**values)
