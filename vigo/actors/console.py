"""`Console`: the async Ray actor that serves the web console (vigo.console) on its node.

One console per deployment, named ``console``, placed on control's host by `server deploy` (and
`server start --dev`), detached and restarted by Ray like every vigo actor. It holds no state of
its own: sessions live in its memory (a restart logs everyone out, nothing else).

- **Data**: every page is one admin operation, asked of a gateway actor (``Gateway.admin``, the
  path vigocli's admin frames take after TLS) - the gateway on this node first, then the others
  control knows. So the console reads what vigocli reads, through the same table, and after a
  promotion it reads the new primary the way gateways do. The topology page also asks each
  gateway for its own counters (``Gateway.status``).
- **TLS**: a server certificate issued by the fleet CA for this node's names and address (the
  primary's ``gateway_material``, as a gateway gets its own), so an operator who trusts the fleet
  CA (``DATA_DIR/tls/ca.pem``) verifies the console like envoys verify gateways.
- **Discovery**: ``__repr__`` publishes ``vigo-console@HOST:PORT cert=SHA256``; `vigocli console`
  reads it from the dashboard's State API (as it finds gateways) and pins that certificate.

The constructor starts a connect task (control, the primary's material, bind) retried with
backoff until it serves, and waits for it at most ``INIT_WAIT_S`` (Ray publishes ``__repr__``
when the constructor returns; a console that connected later restarts itself once to publish,
like the gateway).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from typing import Any

from vigo.actors.runtime import RAY, Runtime
from vigo.console import ConsoleServer, Sessions
from vigo.crypto.tls import cert_fingerprint
from vigo.errors import UnavailableError
from vigo.raytoken import load_token
from vigo.retry import Backoff
from vigo.server.topology import gateway_name, revision

log = logging.getLogger("vigo.actors.console")

#: The console's actor name in namespace vigo (one per deployment).
NAME = "console"
#: Longest wait for one actor call (control, the primary, a gateway) while connecting, seconds.
CALL_TIMEOUT_S = 15.0
#: Longest the constructor waits for the console to serve before returning anyway, seconds.
INIT_WAIT_S = 30.0
#: How long the list of gateways read from control is reused, seconds.
TOPOLOGY_TTL_S = 5.0
#: Longest wait for one gateway's own status on the topology page, seconds.
GATEWAY_STATUS_TIMEOUT_S = 3.0
#: Concurrent calls into the console actor (an async actor: status and ping only).
CONCURRENCY = 100


def console_revision(host: str, listen_host: str, port: int, session_ttl_s: float) -> str:
    """What defines the console: a redeploy restarts it when this changes."""
    return revision("console", host, listen_host, int(port), float(session_ttl_s))


class GatewaySource:
    """The console's ``Source``: admin operations through a gateway actor, this node's first."""

    def __init__(self, rt: Runtime, host_label: str) -> None:
        self.rt = rt
        self.local = gateway_name(host_label)
        self._names: list[str] = []
        self._read_at = 0.0

    async def _gateway_names(self) -> list[str]:
        if not self._names or time.monotonic() - self._read_at > TOPOLOGY_TTL_S:
            topology = await asyncio.wait_for(self.rt.acall(self.rt.actor("control"), "get_topology"), CALL_TIMEOUT_S)
            names = sorted(topology.get("gateways") or {})
            self._names = sorted(names, key=lambda n: n != self.local)  # this node's gateway first
            self._read_at = time.monotonic()
        return self._names

    async def admin(self, op: str, args: dict[str, Any]) -> tuple[dict[str, Any], str]:
        last: Exception | None = None
        for name in await self._gateway_names():
            try:
                answer = await self.rt.acall(self.rt.actor(name), "admin", op, args)
            except Exception as exc:  # gone, restarting: the next gateway answers
                last = exc
                continue
            if (answer.get("error") or {}).get("code") == "unavailable" and "is starting" in str(answer["error"]):
                last = UnavailableError("unavailable", answer["error"]["reason"])
                continue
            return answer, name
        self._names = []  # read control again next time
        raise UnavailableError("unavailable", f"no gateway answered ({type(last).__name__}: {last})" if last
                               else "control knows no gateway")

    async def gateways(self) -> list[dict[str, Any]]:
        names = await self._gateway_names()

        async def one(name: str) -> dict[str, Any]:
            try:
                status = await asyncio.wait_for(self.rt.acall(self.rt.actor(name), "status"), GATEWAY_STATUS_TIMEOUT_S)
            except Exception as exc:
                return {"name": name, "state": f"not answering ({type(exc).__name__})"}
            keep = ("name", "state", "advertise", "error", "connections", "requests", "batches", "overloaded",
                    "protocol_errors", "queue", "serving_since")
            return {k: status[k] for k in keep if k in status}

        return list(await asyncio.gather(*(one(n) for n in names)))


class Console:
    async def __init__(self, host_label: str, listen_host: str, port: int, session_ttl_s: float,
                       rt: Runtime = RAY) -> None:
        self.host_label = host_label
        self.listen_host = listen_host
        self.port = port
        self.session_ttl_s = session_ttl_s
        self.rt = rt
        self.revision = console_revision(host_label, listen_host, port, session_ttl_s)
        self.server: ConsoleServer | None = None
        self.advertise = ""
        self.cert_fingerprint = ""
        self.last_error = ""
        self.created_at = time.time()
        self._task = asyncio.ensure_future(self._connect())
        try:
            await asyncio.wait_for(asyncio.shield(self._task), INIT_WAIT_S)
        except TimeoutError:
            log.warning("console still connecting after %.0f s: %s", INIT_WAIT_S, self.last_error)
            self._republish = asyncio.ensure_future(self._restart_when_connected())

    async def _connect(self) -> None:
        backoff = Backoff(0.2, 2.0)
        while self.server is None:
            try:
                await self._connect_once()
            except Exception as exc:  # control or the primary not up yet, the port still taken
                self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                wait = backoff.delay()
                log.log(backoff.log_level(), "console not serving yet (next try in %.1f s): %s", wait, self.last_error)
                await asyncio.sleep(wait)

    async def _restart_when_connected(self) -> None:
        """Ray published ``starting`` when the constructor returned: once connected, restart
        (a crash to Ray, so it is restarted; the restart connects at once) to publish."""
        await self._task
        log.warning("console connected after its constructor returned; restarting once to publish its endpoint")
        await asyncio.sleep(1.0)
        os._exit(1)

    async def _connect_once(self) -> None:
        rt = self.rt
        topology = await asyncio.wait_for(rt.acall(rt.actor("control"), "get_topology"), CALL_TIMEOUT_S)
        partitions = sorted(topology.get("partitions") or {})
        if not partitions:
            raise UnavailableError("unavailable", "control knows no partition yet")
        route = topology["partitions"][partitions[0]]
        primary = rt.actor(route["primary"])
        node_ip = rt.node_ip()
        bind = node_ip if self.listen_host == "node-ip" else self.listen_host
        names = [n for n in {socket.gethostname(), socket.getfqdn()} if n and not _is_ip(n)]
        ips = [node_ip] + ([bind] if _is_ip(bind) and bind not in ("0.0.0.0", "::") else [])
        material = await asyncio.wait_for(rt.acall(primary, "gateway_material", names, ips), CALL_TIMEOUT_S)
        server = ConsoleServer(GatewaySource(rt, self.host_label), Sessions(load_token, self.session_ttl_s),
                               host=bind, port=self.port, cert_pem=material["cert_pem"], key_pem=material["key_pem"])
        await server.start()
        self.cert_fingerprint = cert_fingerprint(material["cert_pem"])
        self.advertise = bind if bind not in ("0.0.0.0", "::", "") else node_ip
        self.server = server
        log.info("console serving on https://%s:%d/", self.advertise, server.port)

    async def status(self) -> dict[str, Any]:
        common = {"name": NAME, "revision": self.revision, "created_at": self.created_at, "pid": os.getpid()}
        if self.server is None:
            return {**common, "state": "starting", "error": self.last_error, "url": None}
        return {**common, "state": "serving", "url": f"https://{_host(self.advertise)}:{self.server.port}/",
                "cert_sha256": self.cert_fingerprint, "requests": self.server.requests}

    async def ping(self) -> str:
        return "ok"

    def __ray_shutdown__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None and server.runner is not None:
            for site in list(server.runner.sites):
                srv = getattr(site, "_server", None)
                if srv is not None:
                    srv.close()

    def __repr__(self) -> str:
        server = getattr(self, "server", None)
        if server is None:
            return "vigo-console[starting]"
        return f"vigo-console@{self.advertise}:{server.port} cert={self.cert_fingerprint}"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
