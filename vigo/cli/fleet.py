"""`vigocli envoys ...` and `vigocli token ...`: the fleet and its admissions."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from vigo.cli import client, output
from vigo.cli.options import Address, JsonFlag

envoys = typer.Typer(help="List, inspect and revoke envoys.", no_args_is_help=True)
tokens = typer.Typer(help="Create and list join tokens.", no_args_is_help=True)

ADDR = client.DEFAULT_ADDRESS


@envoys.command("list")
def envoys_list(address: Address = ADDR, as_json: JsonFlag = False) -> None:
    """Every envoy with its derived status (converged, failed, pending, offline,
    enforcing-from-cache, revoked), last contact, bundle serial and queue depth."""
    rows = client.admin(address, "envoys.list")
    if as_json:
        output.emit_json(rows)
        return
    now = time.time()
    table = [
        (r["id"][:12], r["hostname"], r["status"], output.ago(r["last_seen"], now), r["serial"],
         r["queue_depth"], r.get("offline_runs") or 0,
         output.ago(r["oldest_queued_at"], now) if r["oldest_queued_at"] else "-", _counts(r["last_run"]))
        for r in rows
    ]
    typer.echo(output.table(table, ["ID", "HOSTNAME", "STATUS", "LAST SEEN", "SERIAL", "QUEUED", "OFFLINE RUNS",
                                    "OLDEST QUEUED", "LAST RUN"]))
    summary: dict[str, int] = {}
    for r in rows:
        summary[r["status"]] = summary.get(r["status"], 0) + 1
    if rows:
        typer.echo(f"\n{len(rows)} envoys: " + ", ".join(f"{n} {s}" for s, n in sorted(summary.items())))


def _counts(last_run: dict | None) -> str:
    if not last_run:
        return "-"
    c = last_run.get("counts") or {}
    text = f"{c.get('ok', 0)} ok {c.get('changed', 0)} chg {c.get('failed', 0)} fail"
    return text + (" (offline)" if last_run.get("offline") else "")


@envoys.command("show")
def envoys_show(
    envoy_id: Annotated[str, typer.Argument(help="envoy id or a unique prefix of it")],
    runs: Annotated[int, typer.Option("--runs", help="how many recent runs to show")] = 10,
    address: Address = ADDR,
    as_json: JsonFlag = False,
) -> None:
    """One envoy: traits, status, its recent runs and their per-resource results."""
    e = client.admin(address, "envoys.show", {"envoy_id": envoy_id, "runs": runs})
    if as_json:
        output.emit_json(e)
        return
    traits = e.get("traits") or {}
    typer.echo(output.kv([
        ("id", e["id"]), ("hostname", e["hostname"]), ("status", e["status"]),
        ("joined", output.when(e["joined_at"])), ("last seen", output.ago(e["last_seen"])),
        ("bundle", f"{e['bundle_version']} serial {e['serial']}" if e["bundle_version"] else "none yet"),
        ("queue", f"{e['queue_depth']} reports, oldest {output.ago(e['oldest_queued_at'])}" if e["queue_depth"] else "empty"),
        ("offline runs queued", e["offline_runs"]),
        ("os", f"{(traits.get('os') or {}).get('name', '?')} {(traits.get('os') or {}).get('version', '')}"),
        ("runs stored", e["run_count"]),
        ("revoked", output.when(e["revoked_at"]) if e["revoked_at"] else "no"),
    ]))
    for run in e["runs"]:
        c = run["counts"]
        flags = " offline" if run["offline"] else ""
        flags += " noop" if run["noop"] else ""
        typer.echo(f"\nrun {run['run_id']} {output.when(run['started_at'])} serial {run['serial']}{flags}: "
                   f"{c['ok']} ok, {c['changed']} changed, {c['failed']} failed, {c['skipped']} skipped")
        if run["kind"] == "summary":
            s = run.get("summary") or {}
            typer.echo(f"  summary of {s.get('count')} runs from {output.when(s.get('first_started_at'))} "
                       f"to {output.when(s.get('last_started_at'))}")
        for res in run.get("resources", []):
            if res["status"] != "ok":
                typer.echo(f"  {res['status']:<8} {res['id']}  {res['message']}")


@envoys.command("revoke")
def envoys_revoke(
    envoy_id: Annotated[str, typer.Argument(help="envoy id or a unique prefix of it")],
    address: Address = ADDR,
    as_json: JsonFlag = False,
) -> None:
    """Revoke an envoy: its certificate is refused by every gateway from now on."""
    result = client.admin(address, "envoys.revoke", {"envoy_id": envoy_id})
    if as_json:
        output.emit_json(result)
    else:
        typer.echo(f"revoked envoy {result['id']} at {output.when(result['revoked_at'])}")


@tokens.command("create")
def token_create(
    ttl: Annotated[float | None, typer.Option("--ttl", help="lifetime in seconds (default from server.yaml: 86400)")] = None,
    uses: Annotated[int | None, typer.Option("--uses", help="how many envoys may join with it (default 1)")] = None,
    note: Annotated[str, typer.Option("--note", help="free text shown in `token list`")] = "",
    address: Address = ADDR,
    as_json: JsonFlag = False,
) -> None:
    """Create a join token. It is shown once; the server keeps only its hash."""
    t = client.admin(address, "token.create", {"ttl_s": ttl, "uses": uses, "note": note})
    if as_json:
        output.emit_json(t)
    else:
        typer.echo(t["token"])
        typer.echo(f"token {t['id']}: {t['uses']} uses, expires {output.when(t['expires_at'])}", err=True)


@tokens.command("list")
def token_list(address: Address = ADDR, as_json: JsonFlag = False) -> None:
    """Join tokens (ids, not the tokens themselves), their uses left and expiry."""
    rows = client.admin(address, "token.list")
    if as_json:
        output.emit_json(rows)
        return
    typer.echo(output.table([(r["id"], output.when(r["created_at"]), output.when(r["expires_at"]),
                              f"{r['uses_left']}/{r['uses_total']}", r["note"]) for r in rows],
                            ["ID", "CREATED", "EXPIRES", "USES LEFT", "NOTE"]))
