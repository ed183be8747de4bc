"""A fake of vigo's Ray wrapper (vigo.actors.runtime.Runtime) for unit tests: actors are plain
objects registered by name, calls run at once in this thread, and time is a counter.

- ``add(name, obj, host=...)`` makes ``obj`` the live actor ``name`` on host ``host``.
- ``hang(name)``: the actor is there but never answers (its host is cut off): a call to it stays
  pending, and waiting for it costs the whole deadline on ``clock``.
- ``kill_host(host)``: the host's node is gone (``host_labels`` no longer lists it) and its
  actors hang, as Ray's do until it declares them dead.
- ``lose(name)``: the actor died: calls fail with ActorLostError, as the real wrapper's do.
- ``calls`` records every call made, in order: ``(actor name, method, args)``.
- ``clock`` is the seconds the code under test would have spent waiting on deadlines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vigo.errors import ActorLostError

_PENDING = object()


@dataclass(frozen=True)
class FakeHandle:
    name: str


@dataclass(eq=False)  # refs are told apart by identity, and are dict keys
class FakeRef:
    name: str
    method: str
    value: Any = _PENDING
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.value is not _PENDING or self.error is not None


@dataclass
class FakeMetric:
    name: str
    values: list[tuple[str, float, dict[str, str] | None]] = field(default_factory=list)

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.values.append(("inc", value, tags))

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values.append(("set", value, tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.values.append(("observe", value, tags))


class FakeRuntime:
    def __init__(self) -> None:
        self.actors: dict[str, Any] = {}
        self.hosts: dict[str, str] = {}  # actor name -> host label
        self.alive_hosts: set[str] = set()
        self.hung: set[str] = set()
        self.lost: set[str] = set()
        self.calls: list[tuple[str, str, tuple[Any, ...]]] = []
        self.started: list[dict[str, Any]] = []
        self.killed: list[str] = []
        self.metrics: dict[str, FakeMetric] = {}
        self.clock = 0.0
        self.connected: str | None = None

    # --- arranging the scene ---------------------------------------------------------------------

    def add(self, name: str, obj: Any, host: str = "head") -> Any:
        self.actors[name] = obj
        self.hosts[name] = host
        self.alive_hosts.add(host)
        return obj

    def hang(self, name: str) -> None:
        self.hung.add(name)

    def lose(self, name: str) -> None:
        self.lost.add(name)

    def kill_host(self, host: str) -> None:
        self.alive_hosts.discard(host)
        self.hung.update(name for name, h in self.hosts.items() if h == host)

    def methods_called(self, method: str) -> list[str]:
        return [name for name, m, _ in self.calls if m == method]

    # --- the Runtime interface -------------------------------------------------------------------

    def connect(self, address: str = "auto") -> None:
        self.connected = address

    def disconnect(self) -> None:
        self.connected = None

    def actor(self, name: str) -> Any:
        if name not in self.actors:
            raise ValueError(f"Failed to look up actor with name '{name}'")
        return FakeHandle(name)

    def start(self, cls: type, name: str, *args: Any, host: str, max_concurrency: int | None = None) -> Any:
        self.started.append({"cls": cls.__name__, "name": name, "host": host, "max_concurrency": max_concurrency})
        if name not in self.actors:  # get_if_exists: an existing actor keeps its state
            self.add(name, cls(*args), host)
        return FakeHandle(name)

    def kill(self, handle: Any) -> None:
        self.actors.pop(handle.name, None)
        self.killed.append(handle.name)

    def submit(self, handle: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((handle.name, method, args + tuple(kwargs.items())))
        ref = FakeRef(handle.name, method)
        if handle.name in self.hung:
            return ref
        if handle.name in self.lost or handle.name not in self.actors:
            ref.error = ActorLostError(f"call {method}: the actor died or cannot be reached now (fake)")
            return ref
        try:
            ref.value = getattr(self.actors[handle.name], method)(*args, **kwargs)
        except Exception as exc:  # the method raised: the caller gets it, as from Ray
            ref.error = exc
        return ref

    def result(self, ref: Any, timeout_s: float | None = None) -> Any:
        if not ref.done:
            if timeout_s is None:
                raise AssertionError(f"{ref.name}.{ref.method} never answers and the caller waits forever")
            self.clock += timeout_s
            raise TimeoutError(f"{ref.name}.{ref.method} did not answer within {timeout_s} s")
        if ref.error is not None:
            raise ref.error
        return ref.value

    def call(self, handle: Any, method: str, *args: Any, timeout_s: float | None, **kwargs: Any) -> Any:
        return self.result(self.submit(handle, method, *args, **kwargs), timeout_s)

    def wait(self, refs: Sequence[Any], *, timeout_s: float, num_returns: int | None = None) -> tuple[list[Any], list[Any]]:
        refs = list(refs)
        want = len(refs) if num_returns is None else num_returns
        done = [r for r in refs if r.done]
        if len(done) < want:
            self.clock += timeout_s
        ready = done[:want]
        return ready, [r for r in refs if r not in ready]

    async def acall(self, handle: Any, method: str, *args: Any) -> Any:
        ref = self.submit(handle, method, *args)
        if not ref.done:
            await asyncio.Event().wait()  # never answers: the caller's deadline ends it
        result = self.result(ref, 0)
        if asyncio.iscoroutine(result):  # an async actor's method
            result = await result
        return result

    def host_labels(self) -> dict[str, str]:
        return {f"node-{host}": host for host in sorted(self.alive_hosts)}

    def node_ip(self) -> str:
        return "127.0.0.1"

    def node_id(self) -> str:
        return "node-head"

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> FakeMetric:
        return self.metrics.setdefault(name, FakeMetric(name))

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> FakeMetric:
        return self.metrics.setdefault(name, FakeMetric(name))

    def histogram(self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...]) -> FakeMetric:
        return self.metrics.setdefault(name, FakeMetric(name))
