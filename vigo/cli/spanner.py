"""`vigocli spanner status`: the bolts, who is live, how the fleet is split, and whether the
admissions roster has converged."""

from __future__ import annotations

import typer

from vigo.cli import client, output
from vigo.cli.options import Address, JsonFlag

app = typer.Typer(help="Spanner federation: write-equal bolts sharing the admissions roster.", no_args_is_help=True)


@app.command("status")
def status(address: Address = client.DEFAULT_ADDRESS, as_json: JsonFlag = False) -> None:
    """Every bolt: live and ready (the gateway's view, with suspicion and flap damping), its
    slice (envoys it serves now), roster size, digest agreement with its peers (1.00 = every
    one of the 256 shards agrees: converged), and the delta backlog per peer (its roster changes
    a peer has not acknowledged). Exit 0 even when a bolt is down: the table says so."""
    info = client.admin(address, "spanner.status")
    if as_json:
        output.emit_json(info)
        return
    view = info["gateway_view"]
    rows = []
    for name, b in sorted(info["bolts"].items()):
        if "error" in b:
            rows.append((name, "no", "-", "-", "-", "-", "-", f"unreachable ({b['error']})"))
            continue
        backlog = ", ".join(f"{p}:{v['backlog']}" for p, v in sorted(b.get("peers", {}).items()) if v.get("live")) or "-"
        agreement = b.get("digest_agreement")
        rows.append((
            name, "yes" if name in view["live"] else ("held down" if name in view["held_down"] else "no"),
            "yes" if b.get("ready") else "no", b.get("slice"), b.get("agents"),
            "-" if agreement is None else f"{agreement:.2f}", backlog, b.get("bundle_serial") or "-",
        ))
    typer.echo(output.table(rows, ["BOLT", "LIVE", "READY", "SLICE", "ROSTER", "DIGESTS", "BACKLOG", "SERIAL"]))
    typer.echo(f"\nlive: {', '.join(view['live']) or 'none'}; quorum: {'yes' if view['quorum'] else 'NO'}; "
               f"reassignments so far: {view['reassignments']}")
