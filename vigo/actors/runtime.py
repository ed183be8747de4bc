"""Every Ray call vigo makes, behind one small interface (``Runtime``), so the logic above it
(promotion, deploy, the gateway's routing, the member's sender) reads without Ray and is unit
tested with a fake (tests/fakeruntime.py), the way Ray Serve's controller keeps all Ray API calls
in one replica wrapper.

What the real implementation (``RayRuntime``, the shared ``RAY``) applies, once, for everyone:

- **Names.** Every actor is named in namespace ``vigo`` (``NAMESPACE``); a handle is looked up
  by name each time it is needed and never outlives a failed call.
- **Lifetimes.** ``start`` creates an actor detached, with ``max_restarts=-1`` (a restarted
  actor reruns its constructor and rebuilds itself from its own disk) and ``get_if_exists``
  (redeploying is idempotent; an existing actor keeps its state and ignores the arguments).
  ``max_task_retries`` stays 0, Ray's default: state-changing calls are at most once, and
  vigo's own protocols (run ids, sequence numbers, terms) make a resend safe when vigo decides
  to resend.
- **Placement.** A stateful actor is pinned to its host by the ``vigo-host`` node label
  (``ray start --labels vigo-host=<name>``), never by a node id (a restarted raylet gets a new
  id; a label survives), with a small CPU request so it is scheduled where asked
  (notes/ray.md section 2). A node without the label leaves the actor RESTARTING, visibly,
  instead of starting it elsewhere without its data.
- **Errors.** An actor that died or cannot be reached surfaces as ``ActorLostError`` (Ray's
  ``RayActorError``, chained); an unknown name as ``ValueError`` (Ray's own contract); a call
  that did not answer in time as ``TimeoutError``. An exception raised by the actor's method
  reaches the caller as that exception.

Ray is imported on first use, not with this module: vigocli imports the constants and the
interface without paying for Ray, and ``connect`` sets the token mode before Ray is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol

from vigo.errors import ActorLostError, UnavailableError

#: Ray namespace of every vigo actor and driver (names are unique per namespace).
NAMESPACE = "vigo"
#: Node label that pins stateful actors to a host: ``ray start --labels vigo-host=<name>``.
HOST_LABEL = "vigo-host"
#: CPU request of a pinned actor: without one, a zero-resource actor may land on the head.
PINNED_CPUS = 0.01
#: Ray's switch that keeps a node (and a driver) on 127.0.0.1: with it "0", Ray takes loopback
#: as the node address instead of the host's routed one (its name says Windows/OSX; on Linux it
#: only turns off joining more nodes). The dev head runs with it; so must its drivers.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    return host == "localhost" or host.startswith("127.") or host == "::1"


class Metric(Protocol):
    """What vigo uses of a ``ray.util.metrics`` Counter, Gauge or Histogram."""

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None: ...
    def set(self, value: float, tags: dict[str, str] | None = None) -> None: ...
    def observe(self, value: float, tags: dict[str, str] | None = None) -> None: ...


class Runtime(Protocol):
    """The interface. Handles and refs are opaque: only the runtime that made them uses them."""

    # --- drivers (vigocli, tests, benchmarks) ----------------------------------------------------
    def connect(self, address: str = "auto") -> None:
        """Join the cluster at ``address`` in namespace vigo, with token auth; no-op if joined.
        Raises UnavailableError when there is no cluster there."""

    def disconnect(self) -> None: ...

    # --- actors ----------------------------------------------------------------------------------
    def actor(self, name: str) -> Any:
        """The handle of the live actor ``name``; ValueError if there is none."""

    def start(self, cls: type, name: str, *args: Any, host: str, max_concurrency: int | None = None) -> Any:
        """Create (or find) ``cls`` as actor ``name``: detached, restarted forever, pinned to
        the node labelled ``host``. Returns the handle at once; the actor may still be starting."""

    def kill(self, handle: Any) -> None:
        """Kill an actor for good (no restart) and free its name."""

    # --- calls -----------------------------------------------------------------------------------
    def submit(self, handle: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``handle.method(*args, **kwargs)``; returns a ref for ``wait``/``result``."""

    def result(self, ref: Any, timeout_s: float | None = None) -> Any:
        """The value of ``ref``: waits up to ``timeout_s`` (None: as long as it takes, 0: only if
        ready), TimeoutError if it is not ready by then."""

    def call(self, handle: Any, method: str, *args: Any, timeout_s: float | None, **kwargs: Any) -> Any:
        """``submit`` then ``result``: one call with a deadline (None: none, say why)."""

    def wait(self, refs: Sequence[Any], *, timeout_s: float, num_returns: int | None = None) -> tuple[list[Any], list[Any]]:
        """Wait until ``num_returns`` (default: all) of ``refs`` are done or ``timeout_s``
        passed; returns (done, pending). Never raises for a failed call: ``result`` does."""

    async def acall(self, handle: Any, method: str, *args: Any) -> Any:
        """Await ``handle.method(*args)`` from an async actor; deadlines are the caller's
        (``asyncio.wait_for``), so a reroute can cancel a waiting call."""

    # --- nodes -----------------------------------------------------------------------------------
    def host_labels(self) -> dict[str, str]:
        """node id -> vigo-host label, for alive nodes that carry one."""

    def node_ip(self) -> str:
        """This process's node's IP address."""

    def node_id(self) -> str:
        """This process's node id."""

    # --- metrics (they reach Ray's Prometheus endpoint and dashboard) ----------------------------
    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Metric: ...
    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Metric: ...
    def histogram(self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...]) -> Metric: ...


def _lost(exc: Exception, what: str) -> ActorLostError:
    lines = str(exc).strip().splitlines()  # Ray's messages run to a traceback: keep the last line
    detail = f": {lines[-1][:200]}" if lines else ""
    return ActorLostError(f"{what}: the actor died or cannot be reached now ({type(exc).__name__}{detail})")


def route_ray_prints_to_stderr() -> None:
    """Send the cluster events Ray's driver prints (``(raylet) The node with node id ... has
    been marked dead``) to stderr. Ray prints them to stdout from a background thread
    (ray/_private/worker.py: listen_error_messages -> print_to_stdstream, looked up by name at
    each call), and a process that connects here answers on stdout: `vigocli ... --json` is
    read by scripts, and one such line in it breaks them. Idempotent."""
    from ray._private import worker

    original = worker.print_to_stdstream
    if getattr(original, "_vigo_stderr", False):
        return

    def to_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        original({**data, "is_err": True}, ignore_prefix)

    to_stderr._vigo_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


class RayRuntime:
    """``Runtime`` on Ray. One instance (``RAY``) serves a whole process."""

    def connect(self, address: str = "auto") -> None:
        # Before Ray is imported: a client given an explicit address does not turn token auth
        # on by itself (notes/ray.md section 7).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if _is_loopback(address):
            # A cluster on loopback (a dev head binds only 127.0.0.1): Ray would otherwise turn
            # 127.0.0.1 into this host's routed address and never reach it (ray's
            # services.resolve_ip_for_localhost). Read by Ray at import, hence here.
            os.environ.setdefault(LOOPBACK_ENV, "0")
        import ray

        if ray.is_initialized():
            return
        try:
            ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        except (ConnectionError, RuntimeError) as exc:
            raise UnavailableError("unavailable", f"cannot connect to the Ray cluster at {address}: {exc}") from exc
        route_ray_prints_to_stderr()

    def disconnect(self) -> None:
        import ray

        ray.shutdown()

    def actor(self, name: str) -> Any:
        import ray

        return ray.get_actor(name, namespace=NAMESPACE)

    def start(self, cls: type, name: str, *args: Any, host: str, max_concurrency: int | None = None) -> Any:
        import ray

        options: dict[str, Any] = {
            "name": name, "namespace": NAMESPACE, "lifetime": "detached", "max_restarts": -1,
            "get_if_exists": True, "num_cpus": PINNED_CPUS, "label_selector": {HOST_LABEL: host},
        }
        if max_concurrency is not None:
            options["max_concurrency"] = max_concurrency
        return ray.remote(cls).options(**options).remote(*args)

    def kill(self, handle: Any) -> None:
        import ray

        ray.kill(handle, no_restart=True)

    def submit(self, handle: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(handle, method).remote(*args, **kwargs)

    def result(self, ref: Any, timeout_s: float | None = None) -> Any:
        import ray

        try:
            return ray.get(ref, timeout=timeout_s)
        except ray.exceptions.RayActorError as exc:
            raise _lost(exc, "a call") from exc

    def call(self, handle: Any, method: str, *args: Any, timeout_s: float | None, **kwargs: Any) -> Any:
        import ray

        try:
            return ray.get(getattr(handle, method).remote(*args, **kwargs), timeout=timeout_s)
        except ray.exceptions.RayActorError as exc:
            raise _lost(exc, f"call {method}") from exc

    def wait(self, refs: Sequence[Any], *, timeout_s: float, num_returns: int | None = None) -> tuple[list[Any], list[Any]]:
        import ray

        refs = list(refs)
        if not refs:
            return [], []
        return ray.wait(refs, num_returns=len(refs) if num_returns is None else num_returns, timeout=timeout_s)

    async def acall(self, handle: Any, method: str, *args: Any) -> Any:
        import ray

        try:
            return await getattr(handle, method).remote(*args)
        except ray.exceptions.RayActorError as exc:
            raise _lost(exc, f"call {method}") from exc

    def host_labels(self) -> dict[str, str]:
        import ray

        out = {}
        for node in ray.nodes():
            if node.get("Alive") and (label := (node.get("Labels") or {}).get(HOST_LABEL)):
                out[node["NodeID"]] = label
        return out

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def counter(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Metric:
        from ray.util.metrics import Counter

        return Counter(name, description, tag_keys=tag_keys)

    def gauge(self, name: str, description: str, tag_keys: tuple[str, ...]) -> Metric:
        from ray.util.metrics import Gauge

        return Gauge(name, description, tag_keys=tag_keys)

    def histogram(self, name: str, description: str, boundaries: list[float], tag_keys: tuple[str, ...]) -> Metric:
        from ray.util.metrics import Histogram

        return Histogram(name, description, boundaries=boundaries, tag_keys=tag_keys)


#: The runtime of this process; code takes ``rt: Runtime = RAY`` so tests can pass a fake.
RAY: Runtime = RayRuntime()
