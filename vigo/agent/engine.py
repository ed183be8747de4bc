"""Converge a host from a verified bundle and fresh traits; produce the run's report.

The bundle is evaluated here, on the envoy: policy and resource ``when:`` conditions against
the traits of this run, templates rendered with them. So a bundle cached while the server was
reachable still does the right thing after the host changed while it was not.

Order: the graph module's topological order over the *active* resources. A resource that
fails makes everything that waits for it ``skipped`` (transitively); everything else still
runs. ``notify`` refreshes its target after the target's own apply, when the notifier changed.
No exception from a resource escapes: it becomes that resource's ``failed`` entry.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vigo
from vigo.agent.resources import CHANGED, FAILED, OK, SKIPPED, Outcome, RunContext, resource_class
from vigo.errors import CycleError, TemplateError, VigoError
from vigo.policy import conditions, graph, templates
from vigo.policy.bundle import Bundle

log = logging.getLogger("vigo.agent.engine")


@dataclass
class _Planned:
    policy: dict[str, Any]
    spec: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.spec['type']}:{self.spec['name']}"


def converge(
    bundle: Bundle,
    traits: dict[str, Any],
    *,
    root: Path | None = None,
    noop: bool = False,
    envoy_id: str = "",
    offline: bool = False,
    env: dict[str, str] | None = None,
    digest: str | None = None,
) -> dict[str, Any]:
    """Run every active resource of ``bundle`` once; return the report (not yet queued)."""
    started = time.time()
    t0 = time.monotonic()
    ctx = RunContext(root=root, noop=noop, traits=traits, secrets=dict(bundle.secrets), env=dict(env or {}))
    policies_report, planned = _select_policies(bundle, traits)
    policy_errors = {p["name"]: p["error"] for p in policies_report if p.get("error")}
    results = _run(planned, bundle, ctx, policy_errors)
    counts = {OK: 0, CHANGED: 0, FAILED: 0, SKIPPED: 0}
    for entry in results:
        counts[entry["status"]] += 1
    report = {
        "kind": "run",
        "run_id": uuid.uuid4().hex,
        "envoy_id": envoy_id,
        "started_at": started,
        "finished_at": time.time(),
        "duration_s": round(time.monotonic() - t0, 6),
        "bundle_version": bundle.version,
        "serial": bundle.serial,
        "term": bundle.term,
        "noop": noop,
        "offline": offline,
        "traits_digest": digest,
        "vigo_version": vigo.__version__,
        "counts": counts,
        "policy_errors": len(policy_errors),
        "policies": policies_report,
        "resources": results,
    }
    return report


def _select_policies(bundle: Bundle, traits: dict[str, Any]) -> tuple[list[dict[str, Any]], list[_Planned]]:
    """Evaluate each policy's `when`; a condition that cannot be evaluated fails its resources."""
    report: list[dict[str, Any]] = []
    planned: list[_Planned] = []
    for policy in bundle.policies:
        entry: dict[str, Any] = {"name": policy["name"], "active": True}
        when = policy.get("when")
        if when:
            try:
                entry["active"] = conditions.parse_cached(when).evaluate(traits)
            except VigoError as exc:
                entry["active"] = True  # its resources are reported failed below
                entry["error"] = f"when: {exc}"
            if not entry["active"]:
                entry["reason"] = f"when is false: {when}"
        report.append(entry)
        if entry["active"]:
            planned.extend(_Planned(policy, spec) for spec in policy["resources"])
    return report, planned


def _run(
    planned: list[_Planned], bundle: Bundle, ctx: RunContext, policy_errors: dict[str, str]
) -> list[dict[str, Any]]:
    by_id = {p.id: p for p in planned}
    declared = {f"{r['type']}:{r['name']}" for pol in bundle.policies for r in pol["resources"]}
    nodes = [graph.node_of(p.spec["type"], p.spec["name"], p.spec["attrs"]) for p in planned]
    before = graph.edges(nodes)
    try:
        order = graph.order(nodes)
    except CycleError as exc:  # cannot happen for a bundle built by vigo; say so if it does
        return [_entry(p, Outcome(FAILED, f"cannot order resources: {exc}"), 0.0) for p in planned]

    env = templates.make_environment(bundle.templates)
    status: dict[str, str] = {}
    blocked: dict[str, str] = {}  # id -> why it must not run (a dependency failed)
    notified: dict[str, list[str]] = {}
    results: list[dict[str, Any]] = []
    for rid in order:
        item = by_id[rid]
        t0 = time.monotonic()
        outcome = _one(item, before[rid], status, blocked, notified, declared, by_id, env, bundle, ctx, policy_errors)
        status[rid] = outcome.status
        if outcome.status == CHANGED:
            for target in item.spec["attrs"].get("notify") or ():
                notified.setdefault(target, []).append(rid)
        results.append(_entry(item, outcome, time.monotonic() - t0, ctx, notified.get(rid)))
    return results


def _one(
    item: _Planned,
    deps: set[str],
    status: dict[str, str],
    blocked: dict[str, str],
    notified: dict[str, list[str]],
    declared: set[str],
    by_id: dict[str, _Planned],
    env: Any,
    bundle: Bundle,
    ctx: RunContext,
    policy_errors: dict[str, str],
) -> Outcome:
    rid = item.id
    attrs = item.spec["attrs"]
    pname = item.policy["name"]
    if pname in policy_errors:
        return Outcome(FAILED, f"policy {pname!r} condition cannot be evaluated: {policy_errors[pname]}")
    for ref in attrs.get("requires") or ():
        if ref not in by_id:
            why = "is not active on this host" if ref in declared else "is not in the bundle"
            blocked[rid] = ref
            return Outcome(SKIPPED, f"requires {ref}, which {why}")
    for dep in sorted(deps):
        if status.get(dep) == FAILED or dep in blocked:
            blocked[rid] = dep
            return Outcome(SKIPPED, f"skipped because {dep} " + ("failed" if status.get(dep) == FAILED else "was skipped after a failure"))
    when = attrs.get("when")
    if when:
        try:
            if not conditions.parse_cached(when).evaluate(ctx.traits):
                return Outcome(SKIPPED, f"when is false: {when}")
        except VigoError as exc:
            return Outcome(FAILED, f"when cannot be evaluated: {exc}")
    try:
        resource = resource_class(item.spec["type"])(item.spec["name"], _materialise(item, env, bundle, ctx))
        outcome = resource.apply(ctx)
        if rid in notified and outcome.status != FAILED:
            refreshed = resource.refresh(ctx)
            if refreshed is not None:
                outcome = _after_refresh(outcome, refreshed, notified[rid])
    except TemplateError as exc:
        return Outcome(FAILED, str(exc))
    except VigoError as exc:
        return Outcome(FAILED, str(exc))
    except Exception as exc:  # a bug in a resource must not end the run
        log.exception("resource %s raised", rid)
        return Outcome(FAILED, f"internal error in {item.spec['type']} resource: {type(exc).__name__}: {exc}")
    return outcome


def _materialise(item: _Planned, env: Any, bundle: Bundle, ctx: RunContext) -> dict[str, Any]:
    """Resolve a file's desired content from its literal, template or shipped source."""
    attrs = item.spec["attrs"]
    if item.spec["type"] != "file":
        return attrs
    if attrs.get("template"):
        policy = item.policy
        secrets = {name: bundle.secrets[name] for name in policy.get("secrets", ()) if name in bundle.secrets}
        text = templates.render(env, attrs["template"], traits=ctx.traits, vars=policy.get("vars") or {}, secrets=secrets)
        return {**attrs, "content": text}
    if attrs.get("source"):
        return {**attrs, "content": bundle.files[attrs["source"]]}
    return attrs


def _after_refresh(applied: Outcome, refreshed: Outcome, by: list[str]) -> Outcome:
    note = f"(notified by {', '.join(by)})"
    if refreshed.status == FAILED:
        return Outcome(FAILED, f"{refreshed.message} {note}", applied.diff, applied.changes)
    if refreshed.status == CHANGED:
        message = refreshed.message if applied.status == OK else f"{applied.message}; {refreshed.message}"
        return Outcome(CHANGED, f"{message} {note}", applied.diff, [*applied.changes, *refreshed.changes])
    return applied


def _entry(item: _Planned, outcome: Outcome, duration: float, ctx: RunContext | None = None, by: list[str] | None = None) -> dict[str, Any]:
    redact = ctx.redact if ctx is not None else (lambda s: s)
    entry: dict[str, Any] = {
        "id": item.id,
        "type": item.spec["type"],
        "policy": item.policy["name"],
        "status": outcome.status,
        "message": redact(outcome.message),
        "duration_s": round(duration, 6),
    }
    if outcome.changes:
        entry["changes"] = [redact(c) for c in outcome.changes]
    if outcome.diff:
        entry["diff"] = redact(outcome.diff)
    if by:
        entry["notified_by"] = by
    return entry
