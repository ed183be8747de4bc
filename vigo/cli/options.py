"""Options shared by every command group, so `--address` and `--json` read the same everywhere."""

from __future__ import annotations

from typing import Annotated

import typer

Address = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="VIGO_ADDRESS",
        help="Ray dashboard URL of the cluster running vigo (as for `ray job submit`)",
    ),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="print JSON for scripts instead of a table")]
