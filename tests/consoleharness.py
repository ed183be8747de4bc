"""A real console (aiohttp over TLS on 127.0.0.1) over a real partition (SQLite in a temp dir),
no Ray: the console's ``Source`` calls the partition's admin operations directly, as the
gateway's path to the primary would. Used by the console's unit tests and its benchmark.

    with running_console(data_dir) as c:      # c.url, c.partition, c.token, c.session()
        ...
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

from vigo.config import ServerConfig
from vigo.console import ConsoleServer, Sessions
from vigo.server.partition import Partition, error_of

TOKEN = "console-test-cluster-token-0123456789abcdef"


class PartitionSource:
    """The console's Source over a partition in this process (one call at a time, like the
    member actor)."""

    def __init__(self, partition: Partition) -> None:
        self.partition = partition
        self.lock = threading.Lock()

    def _admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            try:
                result = self.partition.admin(op, args)
                if op == "status":
                    result = {**result, "primary": "primary-" + self.partition.cfg.partition,
                              "replication": {"mode": "none", "standbys": []}, "placement": {"pending": []}}
                return {"ok": result}
            except Exception as exc:
                return {"error": error_of(exc)}

    async def admin(self, op: str, args: dict[str, Any]) -> tuple[dict[str, Any], str]:
        return await asyncio.to_thread(self._admin, op, args), "gateway-test"

    async def gateways(self) -> list[dict[str, Any]]:
        return [{"name": "gateway-test", "state": "serving", "advertise": "127.0.0.1:7700", "connections": 0,
                 "requests": 0, "overloaded": 0}]


class RunningConsole:
    def __init__(self, partition: Partition, clock: Any = None, ttl_s: float = 3600.0) -> None:
        import time

        self.partition = partition
        self.clock = clock or time.time
        material = partition.gateway_material(["localhost"], ["127.0.0.1"])
        self.ca_pem = material["ca_pem"]
        self.sessions = Sessions(lambda: TOKEN, ttl_s, clock=self.clock)
        self.server = ConsoleServer(PartitionSource(partition), self.sessions, host="127.0.0.1", port=0,
                                    cert_pem=material["cert_pem"], key_pem=material["key_pem"], clock=self.clock)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)
        self.url = f"https://127.0.0.1:{self.server.port}"

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cadata=self.ca_pem.decode())
        return ctx

    def opener(self, cookies: CookieJar | None = None) -> urllib.request.OpenerDirector:
        """A client that verifies the console against the fleet CA and never follows redirects."""

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None

        handlers: list[Any] = [urllib.request.HTTPSHandler(context=self.ssl_context()), NoRedirect()]
        if cookies is not None:
            handlers.append(urllib.request.HTTPCookieProcessor(cookies))
        return urllib.request.build_opener(*handlers)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def running_console(data_dir: Path, **kw: Any) -> Iterator[RunningConsole]:
    cfg = ServerConfig.local(data_dir, port=0)
    cfg.archive.url = ""
    partition = Partition(data_dir, cfg)
    console = RunningConsole(partition, **kw)
    try:
        yield console
    finally:
        console.stop()
        partition.close()
