"""`vigocli secrets ...`: values encrypted at rest on the server; a bundle carries only the ones
its policies reference."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from vigo.cli import client, output
from vigo.cli.options import Address, JsonFlag
from vigo.errors import ConfigError

app = typer.Typer(help="Set and list secrets (values are never printed).", no_args_is_help=True)
ADDR = client.DEFAULT_ADDRESS


@app.command("set")
def secrets_set(
    name: Annotated[str, typer.Argument(help="secret name, e.g. db_password")],
    address: Address = ADDR,
    as_json: JsonFlag = False,
) -> None:
    """Set NAME from standard input (one trailing newline is dropped), so the value never
    appears in a shell history or a process list: `vigocli secrets set db_password < file`."""
    if sys.stdin.isatty():
        import getpass

        value = getpass.getpass(f"value for {name} (not echoed): ").encode()
    else:
        value = sys.stdin.buffer.read()
    if value.endswith(b"\n"):
        value = value[:-1]
    if not value:
        raise ConfigError(f"no value on standard input for secret {name!r}")
    result = client.admin(address, "secrets.set", {"name": name, "value": value})
    if as_json:
        output.emit_json(result)
    else:
        typer.echo(f"secret {result['name']} set ({result['bytes']} bytes); push the stack again to ship it")


@app.command("list")
def secrets_list(address: Address = ADDR, as_json: JsonFlag = False) -> None:
    """Secret names and when they were last set (never their values)."""
    rows = client.admin(address, "secrets.list")
    if as_json:
        output.emit_json(rows)
    else:
        typer.echo(output.table([(r["name"], output.when(r["updated_at"])) for r in rows], ["NAME", "UPDATED"]))
