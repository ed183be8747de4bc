"""`vigocli console`: where the web console is, and a one-time login link to it.

The console actor publishes ``vigo-console@HOST:PORT cert=SHA256`` through its ``__repr__``;
the dashboard's State API (authenticated by the cluster token) lists it, as it lists gateways.
For the login link vigocli connects to the console, checks that it presents exactly that
certificate, and only then sends the cluster token (``POST /api/login-link``): the link it gets
back logs a browser in once, within two minutes. No Ray import here.
"""

from __future__ import annotations

import http.client
import json
import re
from dataclasses import dataclass
from typing import Annotated

import typer

from vigo.cli import client, output
from vigo.cli.options import Address, JsonFlag
from vigo.crypto.tls import cert_fingerprint, unverified_client_context
from vigo.errors import AdminAuthError, ConnectError, UnavailableError

_REPR = re.compile(r"^vigo-console@(?P<host>[^ ]+):(?P<port>\d+) cert=(?P<fp>[0-9a-f]{64})$")


@dataclass(frozen=True)
class ConsoleEndpoint:
    host: str
    port: int
    cert_sha256: str

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}/"


def find_console(address: str, token: str) -> ConsoleEndpoint:
    for actor in client.alive_actors(address, token):
        match = _REPR.match(actor.get("repr_name") or "")
        if match:
            return ConsoleEndpoint(match["host"], int(match["port"]), match["fp"])
    raise UnavailableError("unavailable", f"the Ray cluster at {address} runs no vigo console (is console.enabled "
                                          "off in server.yaml, or is it still starting?); deploy it with "
                                          "`vigocli server deploy` or `vigocli server start --dev`")


def login_link(console: ConsoleEndpoint, token: str) -> dict:
    """A one-time login path from the console, after pinning its certificate."""
    conn = http.client.HTTPSConnection(console.host, console.port, timeout=client.CONNECT_TIMEOUT_S,
                                       context=unverified_client_context())
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise ConnectError("unavailable", f"cannot connect to the console at {console.url}: {exc}") from exc
        der = conn.sock.getpeercert(binary_form=True)
        got = cert_fingerprint(der) if der else "none"
        if got != console.cert_sha256:
            raise AdminAuthError(f"the console at {console.url} presented certificate sha256 {got[:16]}..., but the "
                                 f"dashboard reports {console.cert_sha256[:16]}...; refusing to send the cluster token")
        conn.request("POST", "/api/login-link", headers={"Authorization": f"Bearer {token}", "Content-Length": "0"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status == 401:
        raise AdminAuthError("the console refused the cluster token")
    if response.status != 200:
        raise UnavailableError("unavailable", f"the console answered HTTP {response.status}: {body[:200]!r}")
    return json.loads(body)


def console(
    address: Address = client.DEFAULT_ADDRESS,
    link: Annotated[bool, typer.Option("--link/--no-link", help="also print a one-time login link (valid 2 minutes)")] = True,
    as_json: JsonFlag = False,
) -> None:
    """Print the web console's URL and a one-time login link (docs/console.md). The console's
    certificate is issued by the fleet CA (DATA_DIR/tls/ca.pem): trust that CA in the browser,
    or compare the sha256 printed here with the one the browser shows."""
    token = client.cluster_token()
    found = find_console(address, token)
    info: dict = {"url": found.url, "cert_sha256": found.cert_sha256}
    if link:
        answer = login_link(found, token)
        info["login_link"] = found.url.rstrip("/") + answer["path"]
        info["login_link_expires_at"] = answer["expires_at"]
    if as_json:
        output.emit_json(info)
        return
    rows = [("console", info["url"]), ("certificate sha256", found.cert_sha256)]
    if link:
        rows.append(("one-time login", f"{info['login_link']}  (expires {output.when(info['login_link_expires_at'])})"))
    rows.append(("or log in with", "the cluster token (RAY_AUTH_TOKEN or ~/.ray/auth_token)"))
    typer.echo(output.kv(rows))
