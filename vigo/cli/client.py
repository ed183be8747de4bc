"""How vigocli reaches the server: the Ray dashboard, then the gateway's admin channel.

1. ``GET {address}/api/v0/actors`` (the dashboard's read-only State API) with the Ray cluster
   token as bearer, filtered to alive gateway actors; each publishes
   ``vigo-gateway@HOST:PORT cert=SHA256`` through its ``__repr__``.
2. TLS to HOST:PORT, accepting exactly the certificate whose sha256 the dashboard reported
   (pinning: the dashboard answer was authenticated by the token, so a man in the middle
   cannot substitute his own gateway).
3. One ``admin`` frame carrying the same token; the gateway compares it with the cluster's.

No Ray import anywhere here: interactive commands stay fast (urllib + ssl + msgpack).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from vigo import protocol
from vigo.crypto.tls import cert_fingerprint, unverified_client_context
from vigo.errors import AdminAuthError, ConfigError, ConnectError, ServerError, UnavailableError
from vigo.raytoken import load_token, token_path

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_REPR = re.compile(r"^vigo-gateway@(?P<host>[^ ]+):(?P<port>\d+) cert=(?P<fp>[0-9a-f]{64})$")
#: Seconds to wait for the dashboard or a gateway before saying the server is unreachable.
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class GatewayEndpoint:
    name: str
    host: str
    port: int
    cert_sha256: str
    node_id: str = ""


def address_default() -> str:
    return os.environ.get("VIGO_ADDRESS") or os.environ.get("RAY_ADDRESS_DASHBOARD") or DEFAULT_ADDRESS


def cluster_token() -> str:
    token = load_token()
    if not token:
        raise AdminAuthError(
            f"no Ray cluster token: set RAY_AUTH_TOKEN or create {token_path()} "
            "(`ray get-auth-token --generate`); vigo admin requires Ray token authentication"
        )
    return token


def alive_actors(address: str, token: str) -> list[dict[str, Any]]:
    """Alive actors of namespace vigo as the dashboard's State API lists them (each with its
    ``repr_name``, which gateways and the console publish their endpoint through)."""
    query = urllib.parse.urlencode({
        "filter_keys": "state", "filter_predicates": "=", "filter_values": "ALIVE",
        "detail": "true", "limit": "1000",
    })
    url = address.rstrip("/") + "/api/v0/actors?" + query
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S) as response:
            data = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise AdminAuthError(f"the Ray dashboard at {address} refused the cluster token (HTTP {exc.code})") from exc
        raise UnavailableError("unavailable", f"the Ray dashboard at {address} answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UnavailableError(
            "unavailable", f"cannot reach the Ray dashboard at {address} ({reason}); is the server running? "
            "(`vigocli server start --dev`, or pass --address)") from exc
    except json.JSONDecodeError as exc:
        raise UnavailableError("unavailable", f"{address} did not answer like a Ray dashboard: {exc}") from exc
    return [a for a in data.get("data", {}).get("result", {}).get("result", [])
            if a.get("ray_namespace", "vigo") == "vigo"]


def find_gateways(address: str, token: str) -> list[GatewayEndpoint]:
    """Alive gateway actors, from the dashboard's State API."""
    found = []
    for actor in alive_actors(address, token):
        match = _REPR.match(actor.get("repr_name") or "")
        if match:
            found.append(GatewayEndpoint(actor.get("name") or "", match["host"], int(match["port"]), match["fp"],
                                         actor.get("node_id") or ""))
    if not found:
        raise UnavailableError(
            "unavailable", f"the Ray cluster at {address} runs no vigo gateway; deploy one with "
            "`vigocli server start --dev` or `vigocli server deploy`")
    return sorted(found, key=lambda g: g.name)


async def _admin_call(gw: GatewayEndpoint, token: str, op: str, args: dict[str, Any]) -> Any:
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(gw.host, gw.port, ssl=unverified_client_context()), CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise ConnectError("unavailable", f"cannot connect to gateway {gw.name} at {gw.host}:{gw.port}: {exc}") from exc
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    got = cert_fingerprint(der) if der else "none"
    if got != gw.cert_sha256:
        writer.close()
        raise AdminAuthError(
            f"gateway {gw.host}:{gw.port} presented certificate sha256 {got[:16]}..., but the dashboard "
            f"reports {gw.cert_sha256[:16]}...; refusing to send the cluster token")
    async with protocol.FrameConnection(reader, writer, request_timeout_s=600) as conn:
        reply = await conn.request("admin", {"token": token, "op": op, "args": args})
        return reply.body["result"]


def admin(address: str, op: str, args: dict[str, Any] | None = None) -> Any:
    """Run one admin operation against the first gateway that answers."""
    token = cluster_token()
    last: Exception | None = None
    for gw in find_gateways(address, token):
        try:
            return asyncio.run(_admin_call(gw, token, op, args or {}))
        except ConnectError as exc:
            # Only an operation that was never sent moves on to the next gateway: one whose
            # connection broke mid-way may have run, and running it twice is worse.
            last = exc
            continue
        except ServerError as exc:
            if exc.code == "bad_token":
                raise AdminAuthError(f"gateway {gw.name} refused the cluster token: {exc.reason}") from exc
            raise
    assert last is not None
    raise last


def check_address(address: str) -> str:
    if not re.match(r"^https?://[^/]+", address):
        raise ConfigError(f"--address must be the Ray dashboard URL like {DEFAULT_ADDRESS}, got {address!r}")
    return address
