"""The gateway's way to the bolts when spanner is on: each envoy to its owner bolt.

Ownership is rendezvous hashing of envoy ids over the live bolts (vigo.roster.ownership, with
its suspicion delay and flap damping); liveness is polled here every ``LIVENESS_POLL_S`` (a
bolt that does not answer, or has not pulled the roster yet, is not live). A join has no envoy
id yet: it goes to the owner of its token's hash, so one bolt counts a token's uses.

Admin operations fan out where the fleet needs all bolts to agree: a stack push goes to every
live bolt with one serial (so a serial means one stack wherever an envoy is served), secrets
and tokens are set on every live bolt, a revocation is made at every live bolt (the roster
carries it to the others, and to any bolt that was down). Listings are merged. The routing key
and the merging rules are plain functions in vigo.server.spanner.routing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from vigo.actors.runtime import RAY, Runtime
from vigo.roster import Ownership, OwnershipConfig
from vigo.server.spanner import routing

log = logging.getLogger("vigo.actors.spanner")

#: How often the gateway asks every bolt whether it is alive and ready, and how long it waits, s.
LIVENESS_POLL_S = 0.5
#: Longest wait for one bolt's answer to a batch or an admin call, s.
CALL_TIMEOUT_S = 15.0
#: Admin operations every live bolt must apply.
FANOUT_WRITES = ("secrets.set",)


class SpannerBackend:
    def __init__(self, bolts: list[str], ownership: dict[str, Any], rt: Runtime = RAY) -> None:
        self.bolts = sorted(bolts)
        self.rt = rt
        self.control: Any = None  # looked up when first needed: control may not be up yet
        self.ownership = Ownership(self.bolts, config=OwnershipConfig(**ownership))
        self.handles: dict[str, Any] = {}
        self.partition = "spanner"
        self._poller: asyncio.Task | None = None

    async def _handle(self, name: str) -> Any:
        """The member serving bolt ``name`` now: control's route (a promoted standby after a
        failover inside the bolt), cached until a call to it fails."""
        if name not in self.handles:
            if self.control is None:
                self.control = self.rt.actor("control")
            try:
                route = await self.rt.acall(self.control, "route", name)
            except Exception:
                self.control = None  # looked up again next time (control restarted or recreated)
                raise
            self.handles[name] = self.rt.actor((route or {}).get("primary", name))
        return self.handles[name]

    async def start(self) -> None:
        await self.poll()
        self._poller = asyncio.create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(LIVENESS_POLL_S)
            try:
                await self.poll()
            except Exception:
                log.exception("bolt liveness poll failed")

    async def poll(self) -> frozenset[str]:
        async def ask(name: str) -> bool:
            try:
                handle = await asyncio.wait_for(self._handle(name), LIVENESS_POLL_S)
                info = await asyncio.wait_for(self.rt.acall(handle, "bolt_ping"), LIVENESS_POLL_S)
                return bool(info.get("ready"))
            except Exception:
                self.handles.pop(name, None)
                return False

        answers = await asyncio.gather(*(ask(n) for n in self.bolts))
        return self.ownership.update([n for n, ok in zip(self.bolts, answers, strict=True) if ok])

    def owner(self, key: str) -> str | None:
        return self.ownership.owner(key)

    def live(self) -> list[str]:
        return sorted(self.ownership.live())

    async def _call(self, bolt: str, method: str, *args: Any) -> Any:
        handle = await self._handle(bolt)
        try:
            return await asyncio.wait_for(self.rt.acall(handle, method, *args), CALL_TIMEOUT_S)
        except Exception:
            self.handles.pop(bolt, None)  # re-read the route next time (restart, promotion)
            raise

    # --- envoy traffic ------------------------------------------------------------------------

    async def handle_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        groups: dict[str | None, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(self.owner(routing.slice_key(item)), []).append(i)
        answers: list[dict[str, Any]] = [{}] * len(items)

        async def send(bolt: str | None, idx: list[int]) -> None:
            if bolt is None:
                for i in idx:
                    answers[i] = {"error": {"code": "unavailable", "reason": "no bolt is live; retry later"}}
                return
            try:
                got = await self._call(bolt, "handle_batch", [items[i] for i in idx])
            except Exception as exc:  # the bolt died mid-call: envoys retry, by then it has moved
                self.handles.pop(bolt, None)
                got = [{"error": {"code": "unavailable",
                                  "reason": f"bolt {bolt} failed ({type(exc).__name__}); retry later"}}] * len(idx)
            for i, answer in zip(idx, got, strict=True):
                answers[i] = answer

        await asyncio.gather(*(send(b, idx) for b, idx in groups.items()))
        return answers

    async def bundle_bytes(self, serial: int) -> bytes:
        last: Exception | None = None
        for bolt in self.live():
            try:
                return await self._call(bolt, "bundle_bytes", serial)
            except Exception as exc:  # this bolt lacks the serial (it missed a push) or died
                last = exc
        raise RuntimeError(f"no live bolt has bundle serial {serial} ({last})")

    async def revocations(self) -> list[dict[str, Any]]:
        merged: dict[tuple, dict[str, Any]] = {}
        for bolt in self.live():
            try:
                for entry in await self._call(bolt, "revocations"):
                    merged[tuple(sorted(entry.items()))] = entry
            except Exception:
                continue
        return list(merged.values())

    # --- admin ------------------------------------------------------------------------------------

    async def _each(self, op: str, args: dict[str, Any]) -> dict[str, dict[str, Any]]:
        live = self.live()

        async def one(bolt: str) -> dict[str, Any]:
            try:
                return await self._call(bolt, "admin", op, args)
            except Exception as exc:
                return {"error": {"code": "unavailable", "reason": f"bolt {bolt}: {type(exc).__name__}"}}

        results = await asyncio.gather(*(one(b) for b in live))
        return dict(zip(live, results, strict=True))

    async def admin(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        if not self.live():
            return {"error": {"code": "unavailable", "reason": "no bolt is live"}}
        if op == "spanner.status":
            return {"ok": await self.spanner_status()}
        if op == "stack.push":
            shows = await self._each("stack.show", {})
            serial = 1 + max((r["ok"] or {}).get("serial") or 0 for r in shows.values() if "ok" in r)
            return routing.all_or_error(await self._each(op, {**args, "serial": serial}), self.bolts)
        if op in FANOUT_WRITES:
            return routing.all_or_error(await self._each(op, args), self.bolts)
        if op == "token.create":
            first = self.live()[0]
            created = await self._call(first, "admin", op, args)
            if "error" in created:
                return created
            record = routing.token_record(created["ok"], time.time())
            others = [b for b in self.live() if b != first]
            await asyncio.gather(*(self._call(b, "admin", "token.install", record) for b in others))
            return created
        if op == "envoys.revoke":
            results = await self._each(op, args)
            ok = [r for r in results.values() if "ok" in r]
            return ok[0] if ok else next(iter(results.values()))
        if op == "envoys.list":
            return {"ok": routing.merge_envoys(await self._each(op, args), self.ownership)}
        if op == "envoys.show":
            return routing.merge_show(await self._each(op, args))
        if op == "envoys.page":
            # One bolt's page is not the fleet's page: merging sorted pages across bolts is not
            # built yet, and a partial answer would look whole.
            return {"error": {"code": "not_found", "reason": "envoys.page is not answered under spanner yet; "
                                                             "use envoys.list (merged from every bolt)"}}
        if op == "status":
            results = await self._each(op, args)
            return {"ok": {"spanner": True, "bolts": {b: r.get("ok", r.get("error")) for b, r in results.items()}}}
        return await self._call(self.live()[0], "admin", op, args)

    async def spanner_status(self) -> dict[str, Any]:
        infos = {}
        for bolt in self.bolts:
            try:
                infos[bolt] = await self._call(bolt, "bolt_info")
            except Exception as exc:
                infos[bolt] = {"name": bolt, "error": f"{type(exc).__name__}"}
        return {"bolts": infos, "gateway_view": self.ownership.stats()}
