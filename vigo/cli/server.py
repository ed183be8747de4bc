"""`vigocli server ...`: start a dev server, deploy onto a cluster, show status, stop; list the
admin operations a server answers (`server ops`, offline)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets as pysecrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import typer

from vigo.actors.runtime import HOST_LABEL, LOOPBACK_ENV, RAY  # no Ray loaded until RAY.connect
from vigo.cli import client, output
from vigo.cli.options import Address, JsonFlag
from vigo.errors import ConfigError, UnavailableError

app = typer.Typer(help="Start, deploy, inspect and stop the vigo control plane.", no_args_is_help=True)

DEV_MARKER = "dev-head.json"
EXAMPLE_STACK = Path(__file__).resolve().parent.parent / "examples" / "stack"


def _say(text: str) -> None:
    typer.echo(text, err=True)


def _ray_bin() -> str:
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if not found:
        raise ConfigError("the `ray` command is not installed: install the server extras of vigo-fleet "
                          "(requirements/server.txt, see docs/deploying.md)")
    return found


def _ensure_token() -> None:
    from vigo.raytoken import load_token, token_path

    if load_token():
        return
    _say(f"creating a Ray cluster token in {token_path()}")
    subprocess.run([_ray_bin(), "get-auth-token", "--generate"], check=True, capture_output=True)


def _ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "token"}


def _connect_ray(address: str = "auto") -> None:
    RAY.connect(address)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dev_temp_dir(data_dir: Path) -> Path:
    # Ray's unix sockets live under its temp dir and must stay under ~100 characters, so the
    # dev head gets a short private one (which also tells `server stop` which processes are ours).
    import hashlib

    return Path("/tmp") / f"vigo-ray-{hashlib.sha256(str(data_dir).encode()).hexdigest()[:10]}"


#: Set in the environment of a dev head's `ray start` (value: its temp dir) and inherited by
#: every process Ray spawns from it: how `server stop` tells the dev head's processes apart from
#: any other Ray on the machine.
DEV_HEAD_ENV = "VIGO_DEV_HEAD"


def _dev_head_env(temp_dir: Path) -> dict[str, str]:
    """The environment of a dev head's `ray start`: token auth, the marker, and loopback only.
    Ray turns ``--node-ip-address 127.0.0.1`` into the host's routed address (ray's
    services.resolve_ip_for_localhost) unless clusters are off, and with a node address on
    127.0.0.1 every Ray server (GCS, raylet, object manager, agents, client server, workers)
    binds loopback. The two metrics servers with fixed default ports get free ones."""
    return {**_ray_env(), DEV_HEAD_ENV: str(temp_dir), LOOPBACK_ENV: "0",
            "DASHBOARD_METRIC_PORT": str(_free_port()), "AUTOSCALER_METRIC_PORT": str(_free_port())}


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every process, from /proc."""
    table = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(proc.name)] = (int(fields[1]), int(fields[3]))
    return table


def _is_ray_process(pid: int, temp_dir: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return temp_dir in cmdline or cmdline.startswith(("ray::", "ray-dashboard-"))


def dev_head_pids(temp_dir: str, session: int | None = None) -> set[int]:
    """The processes of one dev head: those whose environment carries its marker, every
    process in their sessions (a dev head's `ray start` runs in a session of its own, and Ray's
    processes stay in it even when orphaned; processes that rename themselves overwrite their
    environment, so the marker alone misses the agents and workers), and their descendants.
    Never this process or its session."""
    marker = f"{DEV_HEAD_ENV}={temp_dir}".encode()
    table = _proc_table()
    me = os.getpid()
    own_session = table.get(me, (0, 0))[1]
    marked = set()
    for pid in table:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ:
            marked.add(pid)
    sessions = {table[p][1] for p in marked}
    if session and session not in sessions and any(
            sid == session and _is_ray_process(pid, temp_dir) for pid, (_, sid) in table.items()):
        # Only the orphans (whose environment was overwritten) remain. A recorded session id
        # is trusted only while a Ray process is in it: once empty, the number can be reused.
        sessions.add(session)
    sessions -= {0, 1, own_session}
    found = marked | {pid for pid, (_, sid) in table.items() if sid in sessions}
    grown = True
    while grown:  # descendants, to a fixed point
        more = {pid for pid, (ppid, _) in table.items() if ppid in found} - found
        found |= more
        grown = bool(more)
    return found - {me}


def _stop_dev_head(temp_dir: str, session: int | None = None) -> int:
    """Stop every process of one dev head (``dev_head_pids``), leaving any other Ray on this
    machine alone: `ray stop` would kill them all. SIGTERM, up to 3 s, then SIGKILL for the rest
    (Ray's agents ignore SIGTERM once their raylet is gone), until none is left."""
    import signal

    stopped: set[int] = set()
    for sig, grace_s in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0)):
        pids = dev_head_pids(temp_dir, session)
        if not pids:
            break
        stopped |= pids
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.time() + grace_s
        while time.time() < deadline and dev_head_pids(temp_dir, session):
            time.sleep(0.1)
    return len(stopped)


@app.command("start")
def start(
    dev: Annotated[bool, typer.Option("--dev", help="start a local Ray head and a one-node vigo on this machine")] = False,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="where the partition's state lives (default: ~/.local/state/vigo/dev)")] = None,
    port: Annotated[int, typer.Option("--port", help="gateway TCP port (TLS)")] = 7700,
    dashboard_port: Annotated[int, typer.Option("--dashboard-port", help="Ray dashboard port")] = 8265,
    ray_port: Annotated[int, typer.Option("--ray-port", help="Ray GCS port of the dev head")] = 6379,
    archive: Annotated[str | None, typer.Option("--archive", help="archive URL (file:///path or s3://bucket/prefix); default file://DATA_DIR-archive")] = None,
    archive_endpoint: Annotated[str | None, typer.Option("--archive-endpoint", help="S3-compatible endpoint for an s3:// --archive (credentials from the usual AWS_* sources)")] = None,
    archive_interval: Annotated[float, typer.Option("--archive-interval", help="seconds between archive uploads (archive.sync_interval_s)")] = 1.0,
    console_port: Annotated[int, typer.Option("--console-port", help="web console port (HTTPS; 0: no console)")] = 7780,
    as_json: JsonFlag = False,
) -> None:
    """Start a development server: a local Ray head with its dashboard, the control, primary
    and gateway actors, the example stack pushed, and a join token. Returns once it is up,
    like `ray start --head`; stop it with `vigocli server stop`."""
    if not dev:
        raise ConfigError("only `server start --dev` exists; on a cluster use `vigocli server deploy --config server.yaml`")
    from vigo import config as config_mod

    data_dir = (data_dir or config_mod.dev_data_dir()).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    _ensure_token()
    host = socket.gethostname()
    t0 = time.time()
    try:
        client.find_gateways(address, client.cluster_token())
        raise ConfigError(f"a vigo server already answers at {address}; `vigocli server status` or `vigocli server stop`")
    except UnavailableError:
        pass
    _say(f"[1/4] starting a Ray head (dashboard {address}, label {HOST_LABEL}={host}) ...")
    temp_dir = _dev_temp_dir(data_dir)
    gcs = f"127.0.0.1:{ray_port}"
    # Every other port Ray opens is picked free, so a dev head can run beside another Ray. In a
    # session of its own, marked in its environment: `server stop` finds every process by that.
    # Its output goes to a file, not a pipe: Ray's autoscaler monitor inherits `ray start`'s
    # stdout and keeps it open, so reading a pipe to its end would never return.
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(
            [_ray_bin(), "start", "--head", "--port", str(ray_port), "--node-ip-address", "127.0.0.1",
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
             "--dashboard-agent-listen-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
             "--metrics-export-port", str(_free_port()), "--runtime-env-agent-port", str(_free_port()),
             "--temp-dir", str(temp_dir), "--labels", f"{HOST_LABEL}={host}", "--disable-usage-stats"],
            env=_dev_head_env(temp_dir), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
        session = proc.pid  # the session of `ray start`, which every Ray process it spawns stays in
        proc.wait()
        out.seek(0)
        stderr = out.read()
    if proc.returncode != 0:
        _stop_dev_head(str(temp_dir), session)
        raise ConfigError(f"`ray start --head` failed (exit {proc.returncode}): {stderr.strip()[-800:]}")
    (data_dir / DEV_MARKER).write_text(json.dumps(
        {"address": address, "gcs": gcs, "temp_dir": str(temp_dir), "session": session,
         "started_at": time.time(), "host": host}))

    _say("[2/4] deploying control, primary and gateway actors ...")
    try:
        _connect_ray(gcs)
        from vigo.actors.deploy import deploy

        cfg = config_mod.ServerConfig.local(data_dir, port)
        if archive is not None:
            cfg.archive.url = archive
        else:  # the dev default, file://DATA_DIR-archive: a target's folder must exist, like a bucket
            Path(f"{data_dir}-archive").mkdir(mode=0o700, exist_ok=True)
        cfg.archive.endpoint_url = archive_endpoint or ""
        cfg.archive.sync_interval_s = archive_interval
        cfg.console.enabled, cfg.console.port = console_port != 0, console_port or cfg.console.port
        deployed = deploy(cfg, host=host)
    except BaseException:
        # Leave nothing half-started behind: the head we just started goes too.
        _say("deploy failed; stopping the dev Ray head again")
        _stop_dev_head(str(temp_dir), session)
        (data_dir / DEV_MARKER).unlink(missing_ok=True)
        raise
    gateway = next(iter(deployed["gateways"].values()))

    _say("[3/4] pushing the example stack ...")
    stack_dir = data_dir / "example-stack"
    if not stack_dir.exists():
        shutil.copytree(EXAMPLE_STACK, stack_dir)
    existing = {s["name"] for s in client.admin(address, "secrets.list")}
    if "api_token" not in existing:
        client.admin(address, "secrets.set", {"name": "api_token", "value": "demo-" + pysecrets.token_hex(8)})
    from vigo.cli.stack import stack_files

    pushed = client.admin(address, "stack.push", {"files": stack_files(stack_dir)})
    _say("[4/4] creating a join token ...")
    token = client.admin(address, "token.create", {"uses": 100, "note": "dev server"})
    info = {"address": address, "gateway": gateway, "data_dir": str(data_dir), "stack_dir": str(stack_dir),
            "bundle": {"version": pushed["version"], "serial": pushed["serial"]}, "join_token": token["token"],
            "token_expires_at": token["expires_at"], "console": deployed.get("console"),
            "seconds": round(time.time() - t0, 1)}
    if as_json:
        output.emit_json(info)
        return
    typer.echo(f"""vigo dev server is up ({info['seconds']} s).
  dashboard   {address}
  gateway     {gateway}
  console     {info['console'] or 'off'}  (`vigocli console` prints a one-time login link)
  data dir    {data_dir}
  stack       {stack_dir}  (bundle {pushed['version']} serial {pushed['serial']})
  join token  {token['token']}  (100 joins, expires {output.when(token['expires_at'])})

Next:
  vigo-envoy join --server {gateway} --token {token['token']} --state-dir /tmp/envoy1
  vigo-envoy run --once --state-dir /tmp/envoy1 --root /tmp/envoy1/root
  vigocli envoys list
  vigocli stack push {stack_dir}      # after editing it
  vigocli server stop""")


@app.command("deploy")
def deploy_cmd(
    config: Annotated[Path, typer.Option("--config", help="server.yaml (see docs/configuration.md)")],
    host: Annotated[str | None, typer.Option("--host", help="vigo-host label of the node holding the primary's data_dir (default: this host)")] = None,
    control_host: Annotated[str | None, typer.Option("--control-host", help="vigo-host label for the control actor (default: --host); pick a host that outlives the primary's, e.g. the Ray head's, when replication is on")] = None,
    gateway_hosts: Annotated[list[str] | None, typer.Option("--gateway-host", help="vigo-host label of a node to run a gateway on (repeatable; default: every labelled node)")] = None,
    ray_address: Annotated[str, typer.Option("--ray-address", help="GCS address of the cluster (default: the one this node belongs to)")] = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Deploy control, the partition's primary, its standbys (replication.standbys in
    server.yaml) and one gateway per labelled node onto the Ray cluster this machine belongs to
    (run on a cluster node; `cluster.yaml` does it after `ray up`). Nodes that are not there yet
    are pending: control starts their gateway and standby when they join. Re-running it applies a
    changed server.yaml (actors whose settings changed restart one at a time; an unchanged file
    restarts nothing), and a partition that was failed over keeps its current primary."""
    from vigo import config as config_mod

    cfg = config_mod.load(config)
    _connect_ray(ray_address)
    if cfg.spanner.bolts:
        from vigo.actors.deploy import deploy_spanner

        deployed = deploy_spanner(cfg, control_host=control_host or host or socket.gethostname(),
                                  gateway_hosts=gateway_hosts or None)
        if as_json:
            output.emit_json(deployed)
        else:
            typer.echo(output.kv([("bolts", ", ".join(deployed["bolts"])),
                                  *[(f"gateway {n}", e) for n, e in deployed["gateways"].items()],
                                  *_change_rows(deployed)]))
        return
    from vigo.actors.deploy import deploy

    deployed = deploy(cfg, host=host, control_host=control_host, gateway_hosts=gateway_hosts or None)
    if as_json:
        output.emit_json(deployed)
    else:
        typer.echo(output.kv([("partition", deployed["partition"]), ("term", deployed["term"]),
                              ("primary", deployed["primary"]),
                              ("standbys", ", ".join(deployed["standbys"]) or "none"),
                              *[(f"gateway {n}", e) for n, e in deployed["gateways"].items()],
                              ("console", deployed.get("console") or "off"),
                              *_change_rows(deployed)]))


def _change_rows(deployed: dict) -> list[tuple[str, object]]:
    """What a deploy did and what waits for its node, for `server deploy`."""
    rows: list[tuple[str, object]] = [
        ("started", ", ".join(deployed.get("started") or []) or "nothing (all there)"),
        ("restarted", ", ".join(deployed.get("restarted") or []) or "nothing (no setting changed)"),
    ]
    if deployed.get("stopped"):
        rows.append(("stopped", ", ".join(deployed["stopped"])))
    return rows + _pending_rows(deployed.get("pending") or [])


def _pending_rows(waiting: list[dict]) -> list[tuple[str, object]]:
    """One row per actor waiting for its node: `standby on node-2: waiting for a node labelled
    vigo-host=node-2` (control starts it when that node joins the cluster)."""
    return [("pending", f"{w['kind']} on {w['host']}: {w['reason']}") for w in waiting]


def _gateway_rows(info: dict) -> list[tuple[str, object]]:
    """Each gateway's endpoint, with its node, since when it serves and its connections (from
    control's view and the gateway itself); a registered gateway whose node is gone is shown as
    left out of the list envoys receive."""
    known = ((info.get("placement") or {}).get("gateways")) or {}
    rows: list[tuple[str, object]] = []
    for g in info["gateways"]:
        entry = known.get(g["name"]) or {}
        rows.append((f"gateway {g['name']}", f"{g['endpoint']}{_gateway_extra(entry)}"))
    found = {g["name"] for g in info["gateways"]}
    for name, entry in sorted(known.items()):
        if name not in found and not entry.get("listed", True):
            rows.append((f"gateway {name}", f"{entry.get('endpoint')}: its node is gone; not listed to envoys"))
    return rows


def _gateway_extra(entry: dict) -> str:
    if not entry.get("node"):
        return ""
    parts = [f"node {entry['node'][:12]}"]
    since = entry.get("serving_since") or entry.get("registered_at")
    parts.append(f"serving since {output.when(since)} ({output.ago(since)})" if since else "not serving")
    if entry.get("connections") is not None:
        parts.append(f"{entry['connections']} connections")
    if entry.get("unreachable"):
        parts.append(f"not answering ({entry['unreachable']})")
    if entry.get("listed") is False:
        parts.append("not listed to envoys (node gone)")
    return " (" + ", ".join(parts) + ")"


def _placement_rows(placement: dict) -> list[tuple[str, object]]:
    """Control's view for `server status`: what waits for its node, and each gateway's node
    and registration time."""
    if not placement:
        return []
    if "error" in placement:
        return [("placement", f"unknown: {placement['error']}")]
    rows = _pending_rows(placement.get("pending") or [])
    if placement.get("paused"):
        rows.append(("placement", "paused (the deployment was stopped; deploy again to resume)"))
    return rows


@app.command("promote")
def promote_cmd(
    partition: Annotated[str, typer.Option("--partition", help="partition whose standby becomes primary")] = "p0",
    standby: Annotated[str | None, typer.Option("--standby", help="standby actor to promote, e.g. standby-p0-hostb (default: the one holding the newest commit)")] = None,
    force: Annotated[bool, typer.Option("--force", help="promote even if the chosen standby is behind a primary that still answers (what it lacks is lost)")] = False,
    ray_address: Annotated[str, typer.Option("--ray-address", help="GCS address of the cluster (default: the one this node belongs to)")] = "auto",
    as_json: JsonFlag = False,
) -> None:
    """Make a standby the partition's primary: the term goes up by one, every member that
    answers is fenced at the new term (an old primary stops writing and rejoins as a standby when
    it comes back), the topology routes every gateway to the new primary, and envoys' next
    check-in lands there without re-joining. Refuses (exit 5) when the chosen standby is behind a
    primary that still answers, when the standby is unknown, or when there is none.
    Run on a node of the cluster; see docs/operations.md."""
    _connect_ray(ray_address)
    from vigo.actors.failover import promote

    result = promote(partition, standby, force=force)
    if as_json:
        output.emit_json(result)
        return
    typer.echo(output.kv([
        ("partition", result["partition"]),
        ("new primary", f"{result['new_primary']} at term {result['term']}"),
        ("old primary", f"{result['old_primary']} ({'alive, fenced' if result['old_primary_alive'] else 'unreachable; fenced when it returns'})"),
        ("state held", _pos_text(result["held"])),
        ("primary was at", _pos_text(result["primary_position"]) if result["primary_position"] else "unknown (unreachable)"),
        ("gateways rerouted", ", ".join(result["gateways"]) or "none (they re-resolve at their next call)"),
        ("took", f"{result['total_s']} s (promotion {result['promotion_s']} s)"),
    ]))


@app.command("adopt")
def adopt_cmd(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="the surviving member's data dir (data_dir in server.yaml, e.g. /var/lib/vigo/p0)")],
    check: Annotated[bool, typer.Option("--check", help="only say what the data dir holds (role, position, term, newest commit); change nothing")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Make a surviving member's data dir the start of a new cluster, when the Ray head's host
    is lost for good (docs/operations.md, "The head's host, lost for good"). Works offline: stop
    Ray on this host first (`ray stop`). Run with --check on every survivor and adopt the one
    holding the newest commit (in synchronous mode it holds every acknowledged report). It
    checks the database (size, PRAGMA integrity_check), raises the term above every term seen
    and removes the replication state; then `ray up` a cluster.yaml whose head is this host:
    the primary starts on this data dir, envoys keep their identities and flush their queues.
    Exit 2 when the dir is not a complete copy (nothing changed)."""
    from vigo.server.peer.adopt import adopt, inspect

    result = inspect(data_dir) if check else adopt(data_dir)
    if as_json:
        output.emit_json(result)
        return
    rows = [("data dir", result["data_dir"]),
            ("role", result["role"] if check else f"primary of a new cluster (was {result['was']})"),
            ("position", _pos_text(result["position"])),
            ("newest commit", result["committed_at_iso"] or "unknown (a primary's dir: see its position)"),
            ("term", str(result["term"]) if check else f"{result['term']} (was {result['term_before']})"),
            ("database", f"{result['database_bytes']:,} bytes")]
    if check and not result["complete"]:
        rows.append(("complete", "no: a standby between snapshots; adopt another survivor"))
    typer.echo(output.kv(rows))
    if not check:
        typer.echo("next: `ray up` a cluster.yaml whose head is this host (docs/operations.md)")


def _pos_text(pos: list | None) -> str:
    if not pos:
        return "nothing"
    return f"generation {pos[0]} index {int(pos[1]):08x} offset {pos[2]}"


@app.command("status")
def status(address: Address = client.DEFAULT_ADDRESS, as_json: JsonFlag = False) -> None:
    """The partition: term, bundle, envoy counts by status, database; and every gateway."""
    token = client.cluster_token()
    gateways = client.find_gateways(address, token)
    info = client.admin(address, "status")
    info["gateways"] = [{"name": g.name, "endpoint": f"{g.host}:{g.port}"} for g in gateways]
    if as_json:
        output.emit_json(info)
        return
    if info.get("spanner"):
        rows = []
        for name, b in sorted(info["bolts"].items()):
            if "status_counts" not in (b or {}):
                rows.append((name, "-", "-", "-", f"unreachable: {(b or {}).get('reason', b)}"))
                continue
            counts = ", ".join(f"{n} {k}" for k, n in b["status_counts"].items() if n) or "none"
            serial = (b.get("bundle") or {}).get("serial", "-")
            rows.append((name, b["envoys"], b["runs_stored"], serial, counts))
        typer.echo("spanner: one row per live bolt (`vigocli spanner status` for slices and the roster)")
        typer.echo(output.table(rows, ["BOLT", "ENVOYS", "RUNS", "SERIAL", "STATUS"]))
        rows = [*_gateway_rows(info), *_placement_rows(info.get("placement") or {})]
        typer.echo(output.kv(rows) if rows else "")
        return
    bundle = info["bundle"]
    counts = ", ".join(f"{n} {k}" for k, n in info["status_counts"].items() if n) or "none"
    typer.echo(output.kv([
        ("partition", f"{info['partition']} (term {info['term']})"),
        *([("primary", info["primary"])] if info.get("primary") else []),
        ("bundle", f"{bundle['version']} serial {bundle['serial']}, pushed {output.ago(bundle['pushed_at'])}" if bundle else "none pushed"),
        ("envoys", f"{info['envoys']} ({counts})"),
        ("runs stored", info["runs_stored"]),
        ("data dir", info["data_dir"]),
        ("WAL pages", info["wal_pages"]),
        ("CA fingerprint", info["ca_fingerprint"]),
        ("signing key", info["signing_key_id"]),
        *_stream_rows(info.get("stream") or {}),
        *_replication_rows(info.get("replication") or {}),
        *_gateway_rows(info),
        *_placement_rows(info.get("placement") or {}),
    ]))


@app.command("ops")
def ops(as_json: JsonFlag = False) -> None:
    """The admin operations a server answers: arguments (type, default) and which change state.
    Needs no server: it prints the table in vigo/server/admin.py that servers dispatch by."""
    from vigo.server import admin

    if as_json:
        output.emit_json(admin.describe())
        return
    rows = [(op.name, ", ".join(a.describe() for a in op.args) or "-", "yes" if op.writes else "no", op.summary)
            for op in admin.OPS.values()]
    typer.echo(output.table(rows, ["OP", "ARGUMENTS", "WRITES", "WHAT IT DOES"]))


def _replication_rows(rep: dict) -> list[tuple[str, object]]:
    """Standbys with their position, lag and sync state for `server status`."""
    if not rep or rep.get("mode") == "none":
        return [("replication", "none (no standbys in server.yaml)")]
    rows: list[tuple[str, object]] = [("replication", rep["mode"])]
    for s in rep["standbys"]:
        lag = "unknown" if s["lag_s"] is None else f"{s['lag_s']:.3f} s"
        state = "in sync" if s["in_sync"] else ("resyncing (snapshot)" if s["needs_snapshot"] else "catching up")
        if s["last_error"]:
            state += f"; {s['last_error']}"
        rows.append((f"standby {s['name']}", f"{_pos_text(s['position'])}; lag {s['lag_bytes']} bytes, {lag}; {state}"))
    return rows


def _stream_rows(stream: dict) -> list[tuple[str, object]]:
    """Stream position, archive lag and spool for `server status`."""
    rows: list[tuple[str, object]] = []
    pos = stream.get("position")
    if pos:
        rows.append(("stream position", f"generation {pos[0]} index {pos[1]:08x} offset {pos[2]}"))
    archive = stream.get("archive")
    if archive is None:
        error = stream.get("archive_error")
        rows.append(("archive", f"NOT ARCHIVING: {error}" if error else "off (set archive.url in server.yaml)"))
        return rows
    state = "BEHIND: spool over its bound" if archive["spool_over_bound"] else (
        f"failing: {archive['last_error']}" if archive["last_error"] else "ok")
    rows += [
        ("archive", f"{archive['url']} ({state})"),
        ("archive lag", f"{archive['lag_s']:.1f} s, {archive['lag_bytes']} bytes"),
        ("archive spool", f"{archive['spool_bytes']} bytes in {archive['spool_files']} files "
                          f"(bound {archive['spool_max_bytes']})"),
        ("archive uploaded", output.ago(archive["uploaded_at"]) if archive["uploaded_at"] else "nothing yet"),
    ]
    return rows


@app.command("stop")
def stop(
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="dev data dir (default: ~/.local/state/vigo/dev)")] = None,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="GCS address (HOST:PORT) of a cluster's head, to stop vigo's actors there")] = None,
) -> None:
    """Stop vigo's actors; if this machine's Ray head was started by `server start --dev`, stop
    it too. Data stays in the data dir; `server start --dev` picks it up again."""
    from vigo import config as config_mod

    data_dir = (data_dir or config_mod.dev_data_dir()).resolve()
    marker = data_dir / DEV_MARKER
    dev = json.loads(marker.read_text()) if marker.exists() else None
    if dev is None and ray_address is None:
        # Never guess: with several Ray clusters on a machine, "auto" may pick someone else's.
        raise ConfigError(
            f"no dev server recorded in {data_dir} ({DEV_MARKER} is missing); to stop vigo's "
            "actors on a cluster, pass --ray-address HOST:PORT of its head")
    killed: list[str] = []
    try:
        _connect_ray(dev["gcs"] if dev else ray_address)
        from vigo.actors.deploy import teardown

        killed = teardown()
        RAY.disconnect()
    except (ConnectionError, RuntimeError, ValueError) as exc:
        _say(f"no Ray cluster to stop actors on ({exc})")
    _say(f"stopped actors: {', '.join(killed) or 'none'}")
    if dev:
        n = _stop_dev_head(dev["temp_dir"], dev.get("session"))
        marker.unlink(missing_ok=True)
        _say(f"stopped the dev Ray head ({n} processes)")
