"""`Gateway`: the async Ray actor that runs the TCP+TLS server (vigo.server.gateway) on its node.

The server runs on the actor's own event loop, started in ``__init__`` and never awaited
forever inside a method (that would hold a concurrency slot). Envoy batches and admin calls go
to the partition's primary through a ``RayBackend``; the primary's name comes from the control
actor, re-read when a call fails, so a promotion (a later issue) re-routes without a restart.
The endpoint is published through ``__repr__`` so `vigocli` finds it via the dashboard's State
API without importing Ray.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Any

import ray

from vigo import config as config_mod
from vigo.actors import NAMESPACE
from vigo.errors import NotPrimaryError
from vigo.raytoken import load_token
from vigo.server.admissions import cert_fingerprint
from vigo.server.gateway import GatewayServer

log = logging.getLogger("vigo.actors.gateway")

#: How often the gateway's counters are copied into Ray's metrics, seconds.
METRICS_INTERVAL_S = 5.0
#: Longest wait for the primary's answer to one call before re-reading the route, seconds. Above
#: replication.sync_timeout_s (a synchronous write may wait that long for its standby); a call
#: to a primary whose host died would otherwise wait for Ray's node-death detection.
CALL_TIMEOUT_S = 15.0
#: Calls tried (each after re-reading the route) before envoys are told `unavailable`.
CALL_ATTEMPTS = 3


class RayBackend:
    """The gateway's way to the partition's primary: the route from control, re-read when a
    call fails, times out, reaches a member that is no longer primary, or when told to
    (``reroute`` after a promotion, which also moves calls still waiting on the old primary)."""

    def __init__(self, partition: str) -> None:
        self.partition = partition
        self.control = ray.get_actor("control", namespace=NAMESPACE)
        self.primary: Any = None
        self.term = 0
        self.epoch = 0  # bumped by every reroute
        self._inflight: dict[asyncio.Future, int] = {}

    async def resolve(self) -> Any:
        route = await self.control.route.remote(self.partition)
        if not route:
            raise RuntimeError(f"control knows no primary for partition {self.partition}")
        self.primary = ray.get_actor(route["primary"], namespace=NAMESPACE)
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
            fut = asyncio.ensure_future(_awaited(getattr(primary, method).remote(*args)))
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
            except (ray.exceptions.RayActorError, ValueError, TimeoutError) as exc:
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


async def _awaited(ref: Any) -> Any:
    return await ref


class Gateway:
    async def __init__(self, name: str, partition: str, host: str, port: int) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.name = name
        control = ray.get_actor("control", namespace=NAMESPACE)
        spanner = (await control.get_topology.remote()).get("spanner")
        if spanner:
            # Spanner: every envoy to its owner bolt; the TLS material comes from any live bolt
            # (they share the fleet CA).
            from vigo.actors.spanner import SpannerBackend

            self.backend = SpannerBackend(spanner["bolts"], spanner.get("ownership") or {})
            await self.backend.start()
            primary = ray.get_actor((self.backend.live() or spanner["bolts"])[0], namespace=NAMESPACE)
        else:
            self.backend = RayBackend(partition)
            primary = await self.backend.resolve()
        node_ip = ray.util.get_node_ip_address()
        names = [socket.gethostname(), socket.getfqdn()] + ([host] if host not in ("0.0.0.0", "::", "") else [])
        ips = [node_ip] + ([host] if _is_ip(host) and host not in ("0.0.0.0", "::") else [])
        # A certificate naming this node, so envoys that reach this gateway by it verify it.
        material = await primary.gateway_material.remote([n for n in names if n and not _is_ip(n)], ips)
        cfg = config_mod.from_dict(material["config"])
        self.ca_fingerprint = material["ca_fingerprint"]
        # vigocli pins the gateway's own certificate by this digest, read from the dashboard.
        self.cert_fingerprint = cert_fingerprint(material["cert_pem"])
        self.server = GatewayServer(
            self.backend, ca_pem=material["ca_pem"], cert_pem=material["cert_pem"], key_pem=material["key_pem"],
            cfg=cfg.gateway, host=host, port=port, admin_token=load_token,
            revocations=material["revocations"], on_stack_pushed=self._notify_siblings,
        )
        self.advertise = host if host not in ("0.0.0.0", "::", "") else ray.util.get_node_ip_address()
        await self.server.start()
        await self.backend.control.register_gateway.remote(
            name, f"{self.advertise}:{self.server.port}", ray.get_runtime_context().get_node_id())
        self._metrics_task = asyncio.create_task(self._export_metrics())

    async def _notify_siblings(self) -> None:
        """After a push through this gateway, the envoys connected to the others converge too:
        every gateway control knows gets `notify_all` (this one already told its own)."""
        topology = await self.backend.control.get_topology.remote()
        for name in topology.get("gateways", {}):
            if name == self.name:
                continue
            try:
                sent = await ray.get_actor(name, namespace=NAMESPACE).notify_all.remote("bundle_changed")
                log.info("gateway %s notified %d envoys of the new bundle", name, sent)
            except Exception as exc:  # a sibling that is down converges its envoys at their next run
                log.warning("cannot notify gateway %s: %s", name, exc)

    async def _export_metrics(self) -> None:
        """Publish the server's counters where Ray users look (Prometheus endpoint, dashboard)."""
        from ray.util.metrics import Counter, Gauge

        tags = {"gateway": self.name}
        gauges = {key: Gauge(f"vigo_gateway_{key}", f"gateway {key.replace('_', ' ')}", tag_keys=("gateway",))
                  for key in ("connections", "queue", "mean_batch", "revoked")}
        counters = {key: Counter(f"vigo_gateway_{key}_total", f"gateway {key.replace('_', ' ')}", tag_keys=("gateway",))
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
        return {"name": self.name, "advertise": f"{self.advertise}:{self.server.port}", **self.server.status()}

    async def admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """The admin path without the TLS channel, for drivers on the cluster (tests, benchmarks)."""
        return await self.backend.admin(op, args)

    async def owners(self, envoy_ids: list[str]) -> dict[str, str | None]:
        """Spanner: which bolt serves each envoy now, in this gateway's view."""
        owner = getattr(self.backend, "owner", None)
        return {e: owner(e) if owner else None for e in envoy_ids}

    async def reroute(self) -> int:
        """After a promotion: send everything to the new primary now, including waiting calls."""
        if not hasattr(self.backend, "reroute"):
            return 0
        moved = await self.backend.reroute()
        log.info("gateway %s rerouted to the new primary (term %d); %d waiting calls moved", self.name,
                 self.backend.term, moved)
        return moved

    async def notify_all(self, reason: str) -> int:
        return await self.server.notify_all(reason)

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
