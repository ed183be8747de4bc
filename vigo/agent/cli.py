"""`vigo-envoy`: the agent's command line.

argparse, not Typer: the envoy installs with the base package only (no server extras) and
starts fast on every run. One layer at the bottom (``main``) turns a VigoError into one line on
stderr and its exit code; tracebacks are for bugs only (``-v`` shows them).

Exit codes: 0 nothing failed · 2 some resource failed · 1 no run (bundle refused, no bundle,
unreadable key, locked state dir) · 64 bad command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import vigo
from vigo.errors import TransportError, VigoError
from vigo.timefmt import stamp

EXIT_OK = 0
EXIT_NO_RUN = 1
EXIT_FAILED = 2
EXIT_USAGE = 64

STATE_DIR_DEFAULT = "/var/lib/vigo-envoy"
TRAITS_DIR_DEFAULT = "/etc/vigo-envoy/traits.d"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's 2 would read as "a resource failed"
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vigo-envoy",
        description=(
            "The vigo agent. Converges this host from a signed PolicyBundle, with or without a "
            "server: the last verified bundle is cached and re-evaluated against fresh traits on "
            "every run, and every run's report is queued durably until a server acknowledges it."
        ),
        epilog="Exit codes: 0 nothing failed, 2 some resource failed, 1 no run happened, 64 usage.",
    )
    parser.add_argument("--version", action="version", version=f"vigo-envoy {vigo.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    state = argparse.ArgumentParser(add_help=False)
    state.add_argument(
        "--state-dir", type=Path,
        default=Path(os.environ.get("VIGO_ENVOY_STATE_DIR", STATE_DIR_DEFAULT)),
        help=f"the envoy's cache and keys (env VIGO_ENVOY_STATE_DIR; default {STATE_DIR_DEFAULT})",
    )
    traits_dir = argparse.ArgumentParser(add_help=False)
    traits_dir.add_argument(
        "--traits-dir", type=Path,
        default=Path(os.environ.get("VIGO_ENVOY_TRAITS_DIR", TRAITS_DIR_DEFAULT)),
        help=f"custom traits: *.yaml/*.json files and executables printing JSON (default {TRAITS_DIR_DEFAULT})",
    )

    apply = sub.add_parser(
        "apply", parents=[state, traits_dir],
        help="converge once from a bundle file or the cached bundle",
        description=(
            "Verify BUNDLE (if given) against the trusted key, refuse it if it is older than one "
            "already accepted, cache it, collect traits, converge, and queue the report. Without "
            "--bundle, the cached bundle is enforced (offline run)."
        ),
    )
    apply.add_argument("--bundle", type=Path, help="a PolicyBundle file from `vigocli stack build`")
    apply.add_argument("--trust", type=Path, help="the signing key's public half (KEY.pub); remembered in the cache")
    apply.add_argument("--root", type=Path, help="resolve every managed path under this folder (tests, demos)")
    apply.add_argument("--noop", action="store_true", help="change nothing; report what would change, with diffs")
    apply.add_argument("--json", action="store_true", help="print the run report as one JSON object")
    apply.add_argument("--diff", action="store_true", help="show content diffs (always shown with --noop)")

    join = sub.add_parser(
        "join", parents=[state, traits_dir], help="enrol this host with a vigo server (once)",
        description=(
            "Make this envoy's key and a certificate request, present the join token to the first "
            "reachable gateway, and store the certificate, the fleet CA and the bundle signing key "
            "it answers with. The gateway's TLS certificate must be signed by the CA it sends "
            "(and the CA must match --ca-fingerprint when given), or nothing is stored."
        ),
    )
    join.add_argument("--server", action="append", required=True, metavar="HOST:PORT", type=_server_arg,
                      help="a gateway address; repeat for several (tried in order, remembered for runs)")
    join.add_argument("--token", required=True, help="the join token from `vigocli token create`")
    join.add_argument("--ca-fingerprint", metavar="SHA256HEX", type=_fingerprint_arg,
                      help="pin the fleet CA: its certificate's SHA-256 (`vigocli server status` shows it)")
    join.add_argument("--json", action="store_true", help="print the enrolment as one JSON object")

    run = sub.add_parser(
        "run", parents=[state, traits_dir], help="the daemon (--once: one run, then exit)",
        description=(
            "Without --once: the daemon. It converges on its schedule (interval with per-host splay) "
            "whatever the network does, keeps a persistent connection to a gateway (reconnecting with "
            "exponential backoff and full jitter), converges at once when the server notifies it, and "
            "flushes the results queue paced so a fleet reconnecting together does not flatten the "
            "server. SIGTERM finishes the current run and exits 0; SIGHUP reloads the config file. "
            "With --once: check in with the first reachable gateway, take a newer bundle if there is "
            "one, converge, queue the report and send the queue; with no gateway reachable the cached "
            "bundle is enforced and the reports stay queued."
        ),
    )
    run.set_defaults(traits_dir=None)  # None: not given (the daemon's config file may set it)
    run.add_argument("--once", action="store_true", help="one run, then exit (for cron or a systemd timer)")
    run.add_argument("--root", type=Path, help="resolve every managed path under this folder (tests, demos)")
    run.add_argument("--noop", action="store_true", help="(--once) change nothing; report what would change")
    run.add_argument("--json", action="store_true",
                     help="(--once) print the run report as one JSON object, with \"server\" and \"flushed\"")
    run.add_argument("--diff", action="store_true", help="(--once) show content diffs (always shown with --noop)")
    run.add_argument("--config", type=Path, metavar="FILE",
                     help="(daemon) local config file (env VIGO_ENVOY_CONFIG; default "
                          "/etc/vigo-envoy/envoy.yaml if present); flags given here win over it")
    run.add_argument("--interval", type=_seconds_arg(0.1), metavar="SECONDS",
                     help="(daemon) seconds between runs (default: the server's answer, else 300)")
    run.add_argument("--splay", type=_seconds_arg(0.0), metavar="SECONDS",
                     help="(daemon) bound of this host's offset in the interval (default: the server's, else 60)")
    run.add_argument("--server", action="append", metavar="HOST:PORT", type=_server_arg,
                     help="(daemon) gateway to use instead of the ones `join` stored; repeat for several")

    tr = sub.add_parser("traits", parents=[traits_dir], help="print this host's traits",
                        description="Collect and print the traits a run would evaluate conditions against.")
    tr.add_argument("--json", action="store_true", help="JSON instead of flattened key = value lines")

    st = sub.add_parser("status", parents=[state], help="show the cache: bundle, queue, last run",
                        description="Show the bundle in force, the results queue and the last run. Reads the cache without locking it.")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return _COMMANDS[args.command](args)
    except VigoError as exc:
        if args.verbose:
            logging.getLogger("vigo").exception("command failed")
        if isinstance(exc, TransportError):  # not a refusal: nobody answered
            print(f"vigo-envoy {args.command}: cannot reach a server: {exc.reason}", file=sys.stderr)
        else:
            print(f"vigo-envoy {args.command}: {exc}", file=sys.stderr)
        return EXIT_NO_RUN  # every VigoError here means no run happened
    except KeyboardInterrupt:
        return 130


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _cmd_apply(args: argparse.Namespace) -> int:
    from vigo.agent.runner import RunOptions, apply_once

    report = apply_once(
        RunOptions(
            state_dir=args.state_dir, bundle_path=args.bundle, trust_path=args.trust,
            root=args.root, noop=args.noop, traits_dir=args.traits_dir,
        )
    )
    if args.json:
        print(json.dumps(report, sort_keys=False))
    else:
        _print_report(report, show_diff=args.diff or args.noop)
    return EXIT_FAILED if report["counts"]["failed"] else EXIT_OK


def _server_arg(text: str) -> str:
    from vigo.agent.transport import parse_server

    try:
        parse_server(text)
    except VigoError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text.strip()


def _fingerprint_arg(text: str) -> str:
    from vigo.agent.join import normalise_fingerprint

    try:
        return normalise_fingerprint(text)
    except VigoError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _cmd_join(args: argparse.Namespace) -> int:
    import asyncio

    from vigo.agent.join import join_fleet

    info = asyncio.run(join_fleet(
        args.state_dir, args.server, args.token, ca_fingerprint=args.ca_fingerprint, traits_dir=args.traits_dir,
    ))
    if args.json:
        print(json.dumps(info))
    else:
        print(info["envoy_id"])
    return EXIT_OK


def _seconds_arg(low: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g} seconds, got {text}")
        return value
    return parse


def _cmd_run(args: argparse.Namespace) -> int:
    if not args.once:
        return _daemon(args)
    import asyncio

    from vigo.agent.once import run_once
    from vigo.agent.runner import RunOptions

    traits_dir = args.traits_dir or Path(os.environ.get("VIGO_ENVOY_TRAITS_DIR", TRAITS_DIR_DEFAULT))
    result = asyncio.run(run_once(
        RunOptions(state_dir=args.state_dir, root=args.root, noop=args.noop, traits_dir=traits_dir)
    ))
    report = result["report"]
    if args.json:
        print(json.dumps({**report, "server": result["server"], "flushed": result["flushed"]}))
    else:
        _print_report(report, show_diff=args.diff or args.noop)
        if result["server"]:
            print(f"server {result['server']}: {result['flushed']} report(s) acknowledged, "
                  f"{result['queued']} still queued")
        else:
            print(f"offline: enforced the cached bundle; {result['queued']} report(s) queued")
    return EXIT_FAILED if report["counts"]["failed"] else EXIT_OK


def _daemon(args: argparse.Namespace) -> int:
    from vigo.agent.daemon import run_daemon

    if args.noop or args.json or args.diff:
        print("vigo-envoy run: --noop, --json and --diff are for `run --once`", file=sys.stderr)
        return EXIT_USAGE
    if args.verbose == 0:  # a daemon says what it does (one line per event) unless asked for less
        logging.getLogger("vigo").setLevel(logging.INFO)
    overrides = {"servers": args.server, "interval_s": args.interval, "splay_s": args.splay,
                 "traits_dir": args.traits_dir, "root": args.root}
    return run_daemon(args.state_dir, config_file=args.config, overrides=overrides)


def _print_report(report: dict[str, Any], *, show_diff: bool) -> None:
    out = sys.stdout
    counts = report["counts"]
    mode = "noop run" if report["noop"] else "run"
    out.write(
        f"{mode} {report['run_id']}  bundle {report['bundle_version']} serial {report['serial']}"
        f"  {report['duration_s']:.3f} s\n"
    )
    for pol in report["policies"]:
        if pol.get("error"):
            out.write(f"  policy {pol['name']}: FAILED {pol['error']}\n")
        elif not pol["active"]:
            out.write(f"  policy {pol['name']}: not applied ({pol.get('reason', '')})\n")
    shown = [r for r in report["resources"] if r["status"] != "ok"]
    if shown:
        width = max(len(r["id"]) for r in shown)
        for r in shown:
            out.write(f"  {r['status']:<8} {r['id']:<{width}}  {r['message']}\n")
            if show_diff and r.get("diff"):
                for line in r["diff"].splitlines():
                    out.write(f"           {line}\n")
    out.write(
        f"{counts['ok']} ok, {counts['changed']} {'would change' if report['noop'] else 'changed'}, "
        f"{counts['failed']} failed, {counts['skipped']} skipped\n"
    )


def _cmd_traits(args: argparse.Namespace) -> int:
    from vigo.agent.traits import collect

    data = collect(args.traits_dir)
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        for key, value in _flatten(data):
            print(f"{key} = {json.dumps(value)}")
    return EXIT_OK


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict) and data:
        out = []
        for key in sorted(data):
            out.extend(_flatten(data[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return [(prefix, data)]


def _cmd_status(args: argparse.Namespace) -> int:
    from vigo.agent.runner import status

    info = status(args.state_dir)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    bundle, queue, last = info["bundle"], info["queue"], info["last_run"]
    rows = [
        ("envoy id", info["envoy_id"] or "-"),
        ("state dir", info["state_dir"]),
        ("bundle", f"{bundle['version']} serial {bundle['serial']} term {bundle['term']}, accepted {_ago(bundle['accepted_at'])}" if bundle else "none cached"),
        ("highest serial/term", f"{info['highest_serial']} / {info['highest_term']}"),
        ("queue depth", f"{queue['runs']} runs in {queue['entries']} entries, {queue['bytes']} bytes"
         + (f" ({queue['summarized_runs']} folded into a summary)" if queue["summarized_runs"] else "")),
        ("oldest queued report", _ago(queue["oldest_started_at"])),
        ("last run", (f"{_ago(last['started_at'])}: " + ", ".join(f"{n} {k}" for k, n in last["counts"].items())
                      + (" (noop)" if last["noop"] else "")) if last else "never"),
        ("quarantined entries", str(len(info["quarantined"]))),
        ("joined with", ", ".join(info.get("servers") or []) or "not joined"),
        ("gateways", _gateways_text(info)),
        ("certificate", _certificate_text(info)),
        ("last checkin", _ago(info.get("last_checkin_at"))),
        ("daemon", _daemon_text(info)),
        ("connected", _link_text(info)),
        ("enforcing from cache", f"since {_ago(info['offline_since'])}" if info.get("offline_since") else "no"),
        ("last successful flush", _flush_text(info.get("last_flush"))),
    ]
    if info.get("revoked"):
        rows.append(("REVOKED", f"{_ago(info['revoked'].get('at'))}: {info['revoked'].get('reason')}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for q in info["quarantined"]:
        print(f"  quarantined {q['db']}/{q['key']}: {q['reason']}")
    return EXIT_OK


def _certificate_text(info: dict[str, Any]) -> str:
    cert = info.get("certificate")
    if not cert:
        return "none (not joined)"
    servers = " ".join(f"--server {s}" for s in info.get("servers") or []) or "--server HOST:PORT"
    rejoin = f"re-join with `vigo-envoy join {servers} --token TOKEN` (a new token)"
    if cert["expired"]:
        return f"expired at {stamp(cert['not_after'])}: {rejoin}"
    text = f"valid until {_until(cert['not_after'])}, serial {cert['serial']}"
    refused = cert.get("refused")
    if refused:
        return (f"{text}, but refused as expired by {refused.get('server')} {_ago(refused.get('at'))} "
                f"(check this host's and the gateway's clocks, or {rejoin})")
    renew = cert["renew_after"]
    return text + (", renewal due" if renew <= time.time() else f", renewal from {stamp(renew)}")


def _until(ts: float) -> str:
    delta = ts - time.time()
    if delta < 0:
        return stamp(ts)
    if delta < 7200:
        return f"{stamp(ts)} (in {delta / 60:.0f} min)"
    if delta < 2 * 86400:
        return f"{stamp(ts)} (in {delta / 3600:.1f} h)"
    return f"{stamp(ts)} (in {delta / 86400:.1f} days)"


def _daemon_text(info: dict[str, Any]) -> str:
    daemon = info.get("daemon") or {}
    if not daemon.get("running"):
        return "not running"
    return f"running (pid {daemon.get('pid') or '?'}), started {_ago(daemon.get('started_at'))}"


def _gateways_text(info: dict[str, Any]) -> str:
    """Every gateway in this envoy's dial order, the one in use marked; where the list came from."""
    order = info.get("dial_order") or []
    if not order:
        return "none"
    link = info.get("link") or {}
    in_use = link.get("server") if link.get("connected") and (info.get("daemon") or {}).get("running") else None
    text = ", ".join(f"{g} (in use)" if g == in_use else g for g in order)
    learned = info.get("gateways")
    if learned:
        text += (f"; listed by {learned.get('server')} {_ago(learned.get('at'))}, unchanged since "
                 f"{_ago(learned.get('since'))}")
    else:
        text += "; none learned from a server yet (the joined addresses)"
    return text


def _link_text(info: dict[str, Any]) -> str:
    link = info.get("link")
    if not (info.get("daemon") or {}).get("running"):
        return "no (no daemon running)" + (f"; last known: {_link_state(link)}" if link else "")
    return _link_state(link) if link else "not yet"


def _link_state(link: dict[str, Any]) -> str:
    if link.get("connected"):
        return f"yes, to {link.get('server')} since {_ago(link.get('since'))}"
    text = f"no, since {_ago(link.get('since'))}"
    return text + (f" ({link['error']})" if link.get("error") else "")


def _flush_text(flush: dict[str, Any] | None) -> str:
    if not flush:
        return "never"
    return f"{_ago(flush.get('at'))} to {flush.get('server')}: {flush.get('acked')} acknowledged"


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    delta = max(0.0, time.time() - ts)
    text = stamp(ts)
    if delta < 120:
        return f"{text} ({delta:.0f} s ago)"
    if delta < 7200:
        return f"{text} ({delta / 60:.0f} min ago)"
    return f"{text} ({delta / 3600:.1f} h ago)"


_COMMANDS = {
    "apply": _cmd_apply, "join": _cmd_join, "run": _cmd_run, "traits": _cmd_traits, "status": _cmd_status,
}

if __name__ == "__main__":
    sys.exit(main())
