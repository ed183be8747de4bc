"""`Gateway`: the async Ray actor that runs the TCP+TLS server (vigo.server.gateway) on its node.

The server runs on the actor's own event loop, started in ``__init__`` and never awaited
forever inside a method (that would hold a concurrency slot). Envoy batches and admin calls go
to the partition's primary through a ``RayBackend``; the primary's name comes from the control
actor, re-read when a call fails, so a promotion (a later issue) re-routes without a restart.
The endpoint is published through ``__repr__`` so `vigocli` finds it via the dashboard's State
API without importing Ray. Every Ray call goes through the runtime (vigo.actors.runtime).

No constructor failure can come from another actor: Ray gives up on an actor whose
constructor raises (``ActorUnavailableError`` from a control or primary that is restarting
too, after a head restart for instance), whatever ``max_restarts`` says. The constructor starts
a connect task that asks control for the topology, the primary for the TLS material, binds the
port and registers with control, each step retried with backoff until it succeeds, and never
raises. Until then ``status`` says ``starting`` with the last error.

Ray publishes ``__repr__`` (the endpoint and certificate digest vigocli discovers gateways by)
once, when the constructor returns. So the constructor waits for the connect task, at most
``INIT_WAIT_S``, then returns whatever happened: normally the gateway serves within a second
and its endpoint is published. If it was still connecting then (control or the primary took
longer to come back), it publishes ``starting``, serves as soon as it connects, and restarts
itself once at that moment so that Ray publishes the endpoint (the restart connects at once).

Once serving, the gateway reads control's list of live gateways every ``GATEWAYS_REFRESH_S``
(``Control.gateway_endpoints``) and its server puts it, with its own endpoint, in every
check-in answer: envoys learn every gateway, and drop one whose node Ray declared gone.

``listen.host: node-ip`` binds the address Ray knows this node by (``ray start
--node-ip-address``) instead of every interface.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from typing import Any

from vigo import config as config_mod
from vigo.actors.runtime import RAY, Runtime
from vigo.crypto.tls import cert_fingerprint
from vigo.errors import ActorLostError, NotPrimaryError, UnavailableError
from vigo.raytoken import load_token
from vigo.retry import Backoff
from vigo.server.gateway import GatewayServer
from vigo.server.topology import gateway_revision

log = logging.getLogger("vigo.actors.gateway")

#: How often the gateway's counters are copied into Ray's metrics, seconds.
METRICS_INTERVAL_S = 5.0
#: Longest wait for the primary's answer to one call before re-reading the route, seconds. Above
#: replication.sync_timeout_s (a synchronous write may wait that long for its standby); a call
#: to a primary whose host died would otherwise wait for Ray's node-death detection.
CALL_TIMEOUT_S = 15.0
#: Calls tried (each after re-reading the route) before envoys are told `unavailable`.
CALL_ATTEMPTS = 3
#: Longest wait for one answer while connecting (control's topology, the primary's material), s.
#: Above the member's START_WAIT_S: a primary still starting answers within it.
CONNECT_CALL_TIMEOUT_S = 15.0
#: Retry waits of the connect task: full jitter from 0.2 s up to 2 s, so a gateway restarted
#: with control and the primary serves within about a second of them.
CONNECT_RETRY_BASE_S = 0.2
CONNECT_RETRY_CAP_S = 2.0
#: Longest the constructor waits for the connect task before it returns anyway, seconds: longer
#: than control and the primary take to come back after a head restart (a few seconds).
INIT_WAIT_S = 30.0
#: After a late connect, how long the gateway serves before restarting to publish, seconds.
REPUBLISH_DELAY_S = 1.0
#: How long the constructor waits for a taken port (a predecessor still exiting frees it within
#: about 1.5 s, notes/ray.md section 5) before returning, seconds.
INIT_BIND_WAIT_S = 5.0
#: How often a serving gateway re-reads control's list of live gateways (what check-in answers
#: carry), seconds: control's node poll runs every 2 s too, so an envoy's next check-in names a
#: gateway within about 4 s of its registration.
GATEWAYS_REFRESH_S = 2.0
#: Longest wait for one gateway's counters in `server status`, seconds.
STATUS_CALL_TIMEOUT_S = 3.0
#: ``listen.host`` value that binds this node's Ray address instead of every interface.
NODE_IP = "node-ip"


def _connect_backoff() -> Backoff:
    """The connect task's retry waits. A cap below the base (tests lower it) bounds every
    wait: the same as base = cap."""
    return Backoff(min(CONNECT_RETRY_BASE_S, CONNECT_RETRY_CAP_S), CONNECT_RETRY_CAP_S)


class RayBackend:
    """The gateway's way to the partition's primary: the route from control, re-read when a
    call fails, times out, reaches a member that is no longer primary, or when told to
    (``reroute`` after a promotion, which also moves calls still waiting on the old primary)."""

    def __init__(self, partition: str, rt: Runtime = RAY) -> None:
        self.partition = partition
        self.rt = rt
        self.control: Any = None  # looked up at the first resolve: control may not be up yet
        self.primary: Any = None
        self.term = 0
        self.epoch = 0  # bumped by every reroute
        self._inflight: dict[asyncio.Future, int] = {}

    async def resolve(self) -> Any:
        if self.control is None:
            self.control = self.rt.actor("control")
        try:
            route = await self.rt.acall(self.control, "route", self.partition)
        except ActorLostError:
            self.control = None  # a control created again under the name has a new handle
            raise
        if not route:
            raise RuntimeError(f"control knows no primary for partition {self.partition}")
        self.primary = self.rt.actor(route["primary"])
        self.term = int(route.get("term", 0))
        return self.primary

    async def reroute(self) -> int:
        self.epoch += 1
        await self.resolve()
        moved = 0
        for fut, epoch in list(self._inflight.items()):
            if epoch != self.epoch and not fut.done():
                fut.cancel()  # its caller retries at the new primary (writes are idempotent)
                moved += 1
        return moved

    async def _call(self, method: str, *args: Any) -> Any:
        last: Exception | None = None
        for _ in range(CALL_ATTEMPTS):
            primary = self.primary or await self.resolve()
            epoch = self.epoch
            fut = asyncio.ensure_future(self.rt.acall(primary, method, *args))
            self._inflight[fut] = epoch
            try:
                return await asyncio.wait_for(fut, CALL_TIMEOUT_S)
            except asyncio.CancelledError:
                if self.epoch == epoch:
                    raise  # the gateway itself is stopping
                last = RuntimeError("rerouted to a new primary")
            except NotPrimaryError as exc:
                last = exc
                await asyncio.sleep(0.2)  # a promotion is being committed: give control a moment
                await self.resolve()
            except (ActorLostError, ValueError, TimeoutError) as exc:
                last = exc
                await self.resolve()  # the route may have changed (restart, promotion)
            finally:
                self._inflight.pop(fut, None)
        raise RuntimeError(f"no primary of {self.partition} answered {method} ({type(last).__name__}: {last})")

    async def handle_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await self._call("handle_batch", items)

    async def admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        return await self._call("admin", op, args)

    async def bundle_bytes(self, serial: int) -> bytes:
        return await self._call("bundle_bytes", serial)

    async def revocations(self) -> list[dict[str, Any]]:
        return await self._call("revocations")


async def placement_status(rt: Runtime) -> dict[str, Any]:
    """Control's placement view for `server status` (what waits for its node, which gateways
    run where), each gateway with its own counters (``connections``, ``serving_since``, or
    ``unreachable``); an error entry when control does not answer, never an exception."""
    try:
        view = await asyncio.wait_for(rt.acall(rt.actor("control"), "placement_status"), 5.0)
    except Exception as exc:
        return {"error": f"control did not answer ({type(exc).__name__})"}
    gateways = view.get("gateways") or {}

    async def counters(name: str) -> dict[str, Any]:
        try:
            status = await asyncio.wait_for(rt.acall(rt.actor(name), "status"), STATUS_CALL_TIMEOUT_S)
        except Exception as exc:
            return {"unreachable": f"{type(exc).__name__}"}
        return {"state": status.get("state"), "serving_since": status.get("serving_since"),
                "connections": status.get("connections")}

    answers = await asyncio.gather(*(counters(name) for name in gateways))
    for name, extra in zip(gateways, answers, strict=True):
        gateways[name] = {**gateways[name], **extra}
    return view


class _WithPlacement:
    """A backend (RayBackend or SpannerBackend) as the gateway's server sees it: the same, except
    that the `status` admin answer also carries control's placement view."""

    def __init__(self, backend: Any, rt: Runtime) -> None:
        self._backend = backend
        self._rt = rt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    async def admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        answer = await self._backend.admin(op, args)
        if op == "status" and isinstance(answer.get("ok"), dict):
            answer["ok"]["placement"] = await placement_status(self._rt)
        return answer


class Gateway:
    async def __init__(self, name: str, partition: str, host: str, port: int,
                       settings: dict[str, Any] | None = None, rt: Runtime = RAY) -> None:
        # No call to another actor here: the connect task does that, with retries (see above).
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.name = name
        self.rt = rt
        self.partition = partition
        self.host = host
        self.port = port
        self.settings = settings  # the `gateway` section of server.yaml (None: the primary's)
        # What defines this gateway: a redeploy whose wanted revision differs restarts it.
        self.revision = gateway_revision(name, partition, host, port, settings)
        self.backend: Any = None
        self.material: dict[str, Any] | None = None
        self.server: GatewayServer | None = None
        self.advertise: str | None = None
        self.cert_fingerprint: str | None = None
        self.state = "starting"
        self.last_error: str | None = None
        self.bind_error_since: float | None = None
        self.created_at = time.time()
        self.serving_since: float | None = None
        self._metrics_task: asyncio.Task | None = None
        self._init_done = asyncio.Event()
        self._published = False
        self._connect_task = asyncio.create_task(self._connect())
        # Bounded, and the task never raises: the constructor returns whatever happens. A port
        # that stays taken is this node's problem, not a restarting actor's: no point waiting.
        deadline = time.monotonic() + INIT_WAIT_S
        while not self._connect_task.done() and self.server is None and time.monotonic() < deadline:
            await asyncio.wait({self._connect_task}, timeout=0.1)
            if self.bind_error_since and time.time() - self.bind_error_since > INIT_BIND_WAIT_S:
                break
        self._published = self.server is not None  # what Ray's repr of this actor will show
        self._init_done.set()

    def _control(self) -> Any:
        return self.rt.actor("control")

    async def _connect(self) -> None:
        """Connect with retries until serving, then register with control (retried too)."""
        backoff = _connect_backoff()
        while True:
            try:
                await self._connect_once()
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                lines = str(exc).strip().splitlines()
                self.last_error = f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"
                if isinstance(exc, OSError) and self.server is None and self.material is not None:
                    self.bind_error_since = self.bind_error_since or time.time()
                wait = backoff.delay()
                log.log(backoff.log_level(), "gateway %s not serving yet (attempt %d: %s); retrying in %.1f s",
                        self.name, backoff.attempt, self.last_error, wait)
                await asyncio.sleep(wait)
        self.state, self.serving_since = "serving", time.time()
        self.last_error = self.bind_error_since = None
        endpoint = f"{self.advertise}:{self.server.port}"
        log.info("gateway %s serving on %s, %.2f s after it was created", self.name, endpoint,
                 self.serving_since - self.created_at)
        self._metrics_task = asyncio.create_task(self._export_metrics())
        self._republish_task = asyncio.create_task(self._republish_if_late())
        self._gateways_task = asyncio.create_task(self._follow_gateways(endpoint))
        backoff = _connect_backoff()
        while True:
            try:
                await asyncio.wait_for(self.rt.acall(self._control(), "register_gateway", self.name, endpoint,
                                                     self.rt.node_id()), CONNECT_CALL_TIMEOUT_S)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("gateway %s cannot register with control yet (%s)", self.name, type(exc).__name__)
                await asyncio.sleep(backoff.delay())

    async def _follow_gateways(self, endpoint: str) -> None:
        """Keep the server's list of live gateways (what check-in answers carry) as control
        knows it, this gateway's own endpoint always in it. When control does not answer, the
        last list stands."""
        self.server.gateways = [endpoint]
        while True:
            try:
                known = await asyncio.wait_for(self.rt.acall(self._control(), "gateway_endpoints"),
                                               CONNECT_CALL_TIMEOUT_S)
                listed = sorted({*known, endpoint})
                if listed != self.server.gateways:
                    log.info("gateway %s: envoys now learn the gateways %s", self.name, ", ".join(listed))
                self.server.gateways = listed
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("gateway %s cannot read the gateway list from control (%s)", self.name, type(exc).__name__)
            await asyncio.sleep(GATEWAYS_REFRESH_S)

    async def _republish_if_late(self) -> None:
        """The constructor returned before this gateway served, so Ray published it as
        ``starting`` and vigocli cannot find it: exit, so that Ray restarts it and publishes
        the endpoint (its constructor connects at once now). Envoys reconnect."""
        await self._init_done.wait()
        if self._published:
            return
        log.warning("gateway %s connected after its constructor returned; restarting once in %.0f s so that Ray "
                    "publishes its endpoint", self.name, REPUBLISH_DELAY_S)
        await asyncio.sleep(REPUBLISH_DELAY_S)
        os._exit(1)  # a crash to Ray: restarted (max_restarts=-1), unlike an intended exit

    async def _connect_once(self) -> None:
        """One pass over the steps not done yet: backend, TLS material, bound server."""
        rt = self.rt
        if self.backend is None:
            topology = await asyncio.wait_for(rt.acall(self._control(), "get_topology"), CONNECT_CALL_TIMEOUT_S)
            spanner = topology.get("spanner")
            if self.partition == "spanner" and not spanner:  # placed before deploy registered the bolts
                raise UnavailableError("unavailable", "control knows no spanner bolts yet")
            if spanner:
                # Spanner: every envoy to its owner bolt; the TLS material comes from any live
                # bolt (they share the fleet CA).
                from vigo.actors.spanner import SpannerBackend

                backend = SpannerBackend(spanner["bolts"], spanner.get("ownership") or {}, rt=rt)
                await backend.start()
            else:
                backend = RayBackend(self.partition, rt=rt)
            self.backend = backend
        if self.material is None:
            if hasattr(self.backend, "live"):
                primary = rt.actor((self.backend.live() or self.backend.bolts)[0])
            else:
                primary = await asyncio.wait_for(self.backend.resolve(), CONNECT_CALL_TIMEOUT_S)
            node_ip = rt.node_ip()
            bind = self._bind_host(node_ip)
            names = [socket.gethostname(), socket.getfqdn()] + ([bind] if bind not in ("0.0.0.0", "::", "") else [])
            ips = [node_ip] + ([bind] if _is_ip(bind) and bind not in ("0.0.0.0", "::") else [])
            # A certificate naming this node, so envoys that reach this gateway by it verify it.
            self.material = await asyncio.wait_for(
                rt.acall(primary, "gateway_material", [n for n in names if n and not _is_ip(n)], ips),
                CONNECT_CALL_TIMEOUT_S)
        if self.server is None:
            material = self.material
            settings = (config_mod.from_dict({"gateway": self.settings}).gateway if self.settings is not None
                        else config_mod.from_dict(material["config"]).gateway)
            bind = self._bind_host(rt.node_ip())
            server = GatewayServer(
                _WithPlacement(self.backend, rt), ca_pem=material["ca_pem"], cert_pem=material["cert_pem"], key_pem=material["key_pem"],
                cfg=settings, host=bind, port=self.port, admin_token=load_token,
                revocations=material["revocations"], on_stack_pushed=self._notify_siblings,
            )
            await server.start()  # binds: OSError while the port is taken (a predecessor still exiting)
            self.ca_fingerprint = material["ca_fingerprint"]
            # vigocli pins the gateway's own certificate by this digest, read from the dashboard.
            self.cert_fingerprint = cert_fingerprint(material["cert_pem"])
            self.advertise = bind if bind not in ("0.0.0.0", "::", "") else rt.node_ip()
            self.server = server

    def _bind_host(self, node_ip: str) -> str:
        return node_ip if self.host == NODE_IP else self.host

    async def _notify_siblings(self) -> None:
        """After a push through this gateway, the envoys connected to the others converge too:
        every gateway control knows gets `notify_all` (this one already told its own)."""
        topology = await self.rt.acall(self._control(), "get_topology")
        for name in topology.get("gateways", {}):
            if name == self.name:
                continue
            try:
                sent = await self.rt.acall(self.rt.actor(name), "notify_all", "bundle_changed")
                log.info("gateway %s notified %d envoys of the new bundle", name, sent)
            except Exception as exc:  # a sibling that is down converges its envoys at their next run
                log.warning("cannot notify gateway %s: %s", name, exc)

    async def _export_metrics(self) -> None:
        """Publish the server's counters where Ray users look (Prometheus endpoint, dashboard)."""
        tags = {"gateway": self.name}
        gauges = {key: self.rt.gauge(f"vigo_gateway_{key}", f"gateway {key.replace('_', ' ')}", ("gateway",))
                  for key in ("connections", "queue", "mean_batch", "revoked")}
        counters = {key: self.rt.counter(f"vigo_gateway_{key}_total", f"gateway {key.replace('_', ' ')}", ("gateway",))
                    for key in ("requests", "batches", "overloaded", "protocol_errors")}
        last = dict.fromkeys(counters, 0)
        while True:
            status = self.server.status()
            for key, gauge in gauges.items():
                gauge.set(float(status[key]), tags=tags)
            for key, counter in counters.items():
                delta = status[key] - last[key]
                if delta > 0:
                    counter.inc(delta, tags=tags)
                last[key] = status[key]
            await asyncio.sleep(METRICS_INTERVAL_S)

    async def status(self) -> dict[str, Any]:
        """``state``: ``starting`` (with ``error``, the last failure, and ``bind_error_s``, how
        long the port has been taken) or ``serving`` (with the server's counters)."""
        common = {"name": self.name, "state": self.state, "revision": self.revision, "created_at": self.created_at,
                  "serving_since": self.serving_since, "pid": os.getpid()}
        if self.server is None:
            return {**common, "advertise": None, "error": self.last_error,
                    "bind_error_s": time.time() - self.bind_error_since if self.bind_error_since else 0.0}
        return {**common, "advertise": f"{self.advertise}:{self.server.port}", **self.server.status()}

    async def admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """The admin path without the TLS channel, for drivers on the cluster (tests, benchmarks)."""
        if self.server is None:
            return {"error": {"code": "unavailable", "reason": f"gateway {self.name} is starting ({self.last_error})"}}
        return await self.server.backend.admin(op, args)

    async def owners(self, envoy_ids: list[str]) -> dict[str, str | None]:
        """Spanner: which bolt serves each envoy now, in this gateway's view."""
        owner = getattr(self.backend, "owner", None)
        return {e: owner(e) if owner else None for e in envoy_ids}

    async def reroute(self) -> int:
        """After a promotion: send everything to the new primary now, including waiting calls."""
        if self.backend is None or not hasattr(self.backend, "reroute"):
            return 0  # still connecting: it reads the new route when it resolves
        moved = await self.backend.reroute()
        log.info("gateway %s rerouted to the new primary (term %d); %d waiting calls moved", self.name,
                 self.backend.term, moved)
        return moved

    async def notify_all(self, reason: str) -> int:
        return await self.server.notify_all(reason) if self.server is not None else 0

    async def ping(self) -> str:
        return "ok"

    def __ray_shutdown__(self) -> None:
        # Called synchronously by Ray on graceful exit: stop accepting, let the port go.
        server = getattr(self, "server", None)
        if server is not None and server._server is not None:
            server._server.close()

    def __repr__(self) -> str:
        server = getattr(self, "server", None)
        if server is None:
            return "vigo-gateway[starting]"
        return f"vigo-gateway@{self.advertise}:{server.port} cert={self.cert_fingerprint}"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
