"""A real gateway (TLS on 127.0.0.1) over a real partition (SQLite in a temp dir), no Ray.

The backend calls the partition directly, as the primary actor would; everything else (TLS,
framing, batching, admission checks) is the production code path. Used by tests that need a
server but not a cluster; the Ray-backed path has its own end-to-end test.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vigo.config import GatewayConfig, ServerConfig
from vigo.server.gateway import GatewayServer
from vigo.server.partition import Partition, error_of

ADMIN_TOKEN = "test-admin-token"


class InProcessBackend:
    def __init__(self, partition: Partition) -> None:
        self.partition = partition
        self.lock = threading.Lock()  # the partition is single-writer, like the actor

    async def handle_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._locked, self.partition.handle_batch, items)

    async def admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"ok": await asyncio.to_thread(self._locked, self.partition.admin, op, args)}
        except Exception as exc:
            return {"error": error_of(exc)}

    async def bundle_bytes(self, serial: int) -> bytes:
        return await asyncio.to_thread(self._locked, self.partition.bundle_bytes, serial)

    async def revocations(self) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._locked, lambda: self.partition.revocations().to_list())

    def _locked(self, fn, *args):
        with self.lock:
            return fn(*args)


class RunningGateway:
    """A gateway served from a background thread's event loop."""

    def __init__(self, partition: Partition, gateway_cfg: GatewayConfig, port: int = 0) -> None:
        self.partition = partition
        self.backend = InProcessBackend(partition)
        material = partition.gateway_material()
        self.loop = asyncio.new_event_loop()
        self.server = GatewayServer(
            self.backend, ca_pem=material["ca_pem"], cert_pem=material["cert_pem"], key_pem=material["key_pem"],
            cfg=gateway_cfg, host="127.0.0.1", port=port, admin_token=lambda: ADMIN_TOKEN,
            revocations=material["revocations"])
        self.ca_pem = material["ca_pem"]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())
        self.port = self.server.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def stack_files(stack_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(stack_dir)): p.read_bytes() for p in sorted(stack_dir.rglob("*")) if p.is_file()}


@contextmanager
def running_gateway(data_dir: Path, **gateway_overrides: Any) -> Iterator[RunningGateway]:
    cfg = ServerConfig.local(data_dir, port=0)
    for key, value in gateway_overrides.items():
        setattr(cfg.gateway, key, value)
    partition = Partition(data_dir, cfg)
    gw = RunningGateway(partition, cfg.gateway)
    try:
        yield gw
    finally:
        gw.stop()
        partition.close()
