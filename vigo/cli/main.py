"""The `vigocli` entry point and the one layer that turns VigoError into a message and an exit code.

Command groups live one per module (``vigo/cli/stack.py`` ...) and are mounted here. Nothing in
this package imports Ray at import time: commands that work offline (`stack build`,
`stack keygen`) must never start or even load it.
"""

from __future__ import annotations

import sys

try:
    import typer
except ImportError:  # the envoy-only install has no typer
    typer = None


def _app():
    from vigo.cli import backup, fleet, secrets, server, stack

    app = typer.Typer(
        name="vigocli",
        help=(
            "Operate vigo. Commands other than `stack build|check|keygen`, `server ops`, `restore` and `backup verify|list|restore` talk to a running server "
            "through the Ray dashboard (--address, env VIGO_ADDRESS, default http://127.0.0.1:8265), "
            "authenticated by the Ray cluster token (RAY_AUTH_TOKEN or ~/.ray/auth_token)."
        ),
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    app.add_typer(server.app, name="server")
    app.add_typer(stack.app, name="stack")
    app.add_typer(fleet.envoys, name="envoys")
    app.add_typer(fleet.tokens, name="token")
    app.add_typer(secrets.app, name="secrets")
    app.add_typer(backup.app, name="backup")
    from vigo.cli import console, restore, spanner

    app.add_typer(spanner.app, name="spanner")
    app.command("console")(console.console)

    app.command("restore")(restore.restore)
    return app


def main(argv: list[str] | None = None) -> int:
    if typer is None:
        print(
            "vigocli needs the server extras of the vigo-fleet distribution: "
            "pip install --require-hashes -r requirements/server.txt, then the vigo-fleet wheel "
            "(docs/deploying.md); never `pip install vigo`, an unrelated project on the public index",
            file=sys.stderr,
        )
        return 1
    from vigo.errors import VigoError

    try:
        # Standalone mode lets Typer print usage errors itself (with the usage line); vigo's own
        # errors still arrive here as exceptions because pretty tracebacks are off.
        _app()(args=argv, prog_name="vigocli", standalone_mode=True)
    except VigoError as exc:
        print(f"vigocli: {exc}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        return 64 if code == 2 else code  # click's usage error (2) is our 64, as in vigo-envoy
    except KeyboardInterrupt:
        print("vigocli: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
