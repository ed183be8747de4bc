"""A dev server with its console, a known secret in its stack, and envoys that converged on it:
what the console's integration and browser tests look at.

    with console_fleet(tmp) as f:   # f["console"] (URL), f["ca_pem"], f["envoys"], f["secret"]
"""

from __future__ import annotations

import json
import secrets
import ssl
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.devserver import dev_server, run


def vigocli(server: dict, *args: Any, stdin: str | None = None) -> str:
    return run("vigocli", *args, env=server["env"], stdin=stdin).stdout


@contextmanager
def console_fleet(base: Path, envoys: int = 2) -> Iterator[dict[str, Any]]:
    with dev_server(base / "server") as server:
        secret = "console-secret-" + secrets.token_hex(8)
        vigocli(server, "secrets", "set", "api_token", stdin=secret)
        vigocli(server, "stack", "push", server["stack_dir"])  # the bundle carries the new value
        token = json.loads(vigocli(server, "token", "create", "--uses", str(envoys), "--json"))["token"]
        joined = []
        for n in range(envoys):
            state, root, traits = base / f"e{n}" / "state", base / f"e{n}" / "root", base / f"e{n}" / "traits.d"
            traits.mkdir(parents=True)
            (traits / "roles.yaml").write_text("roles: [web]\n")  # the web policy renders the secret
            envoy_id = json.loads(run("vigo-envoy", "join", "--server", server["gateway"], "--token", token,
                                      "--state-dir", state, "--json").stdout)["envoy_id"]
            run("vigo-envoy", "run", "--once", "--state-dir", state, "--root", root, "--traits-dir", traits, "--json")
            assert secret in (root / "etc/vigo-demo/site/app.conf").read_text()  # it did reach the host
            joined.append(envoy_id)
        yield {**server, "secret": secret, "envoys": joined, "ca_pem": (server["data"] / "tls" / "ca.pem").read_bytes()}


def verified_context(ca_pem: bytes) -> ssl.SSLContext:
    """TLS that trusts only the fleet CA, with hostname checks: the console must pass it."""
    return ssl.create_default_context(cadata=ca_pem.decode())


def login_link(server: dict) -> dict[str, Any]:
    return json.loads(vigocli(server, "console", "--json"))


def opener(ca_pem: bytes, *handlers: Any) -> urllib.request.OpenerDirector:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=verified_context(ca_pem)), NoRedirect(),
                                       *handlers)
