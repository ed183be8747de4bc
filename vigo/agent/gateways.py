"""Which gateways an envoy knows, and in which order it dials them (docs/envoy.md, "Gateways").

    learn       a check-in answer's ``gateways`` (every gateway serving now, from control's
                topology) kept in the cache's meta ``gateways``: {list, at, server}
    dial_order  the addresses to try, best first: the learned list, then the joined addresses
                the server does not list; in each, gateways that failed lately go last, and
                the rest in this envoy's rendezvous order
    rank        the rendezvous order itself: highest sha256(envoy id, address) first
    pinned_order  envoy.yaml ``servers`` (or ``run --server``): exactly those, in their order,
                the ones that failed lately last; nothing learned is added

Decisions:

* **The joined addresses are never forgotten.** ``vigo-envoy join --server ...`` (or envoy.yaml
  ``servers``) are the operator's words and may be names the server cannot know (a DNS name
  that an operator repoints, an address of a cluster that replaced this one). They stay in the
  cache as they were given. What the server's list says otherwise is their *place*: an address
  it does not list is tried only after every listed gateway failed.
* **The newest non-empty list wins.** Every current check-in answer that carries a non-empty
  ``gateways`` list replaces the one kept; an answer without it (an older server) or with an
  empty one changes nothing, so an envoy never ends up with fewer addresses than it joined with.
* **Rendezvous order spreads a dead gateway's envoys.** Each envoy ranks the gateways by a hash
  of its own id and the address: envoys agree on nothing, so when a gateway dies, its envoys'
  next choices fall evenly on the others, and a gateway that is added takes an even share of
  the envoys that reconnect (without moving envoys whose connection works).
* **A local ``servers`` list pins.** An operator who writes ``servers:`` in envoy.yaml (or
  passes ``run --server``) says which gateways this host uses and in which order (a host that
  reaches only some networks, a test that keeps an envoy off the head): the learned list is
  still stored and shown, but not dialled.
* **A gateway that just failed goes last** for ``SUSPECT_S``: the envoy that lost it does not
  dial it first again in the next round (a vanished host costs a whole connect timeout).

This module is imported by the envoy: standard library (and ``transport.parse_server``) only.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping
from typing import Any

from vigo.agent.transport import parse_server
from vigo.errors import ConfigError

#: How long a gateway that failed (refused, timed out, lost its connection) is tried after the
#: others, seconds. Long enough to cover a host's outage as Ray sees it (about a minute before
#: control drops it from the list), short enough that a gateway that came back gets its share
#: again.
SUSPECT_S = 60.0
#: Most addresses kept from one answer (a cluster has one gateway per node; this only bounds
#: what a broken or hostile answer can make the envoy store and dial).
MAX_GATEWAYS = 256


def rank(envoy_id: str, address: str) -> int:
    """This envoy's rendezvous score of one gateway address (higher is tried first)."""
    digest = hashlib.sha256(f"{envoy_id}\n{address}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def dial_order(envoy_id: str, joined: Iterable[str], learned: Iterable[str] | None,
               failed: Mapping[str, float] | None = None, *, now: float | None = None) -> list[str]:
    """Every address to try, best first, each once: the learned gateways, then the joined
    addresses not among them; inside that, a gateway that failed within ``SUSPECT_S`` (``failed``:
    address -> monotonic time of its failure) after every other one, the rest by ``rank``."""
    now = time.monotonic() if now is None else now
    listed = list(dict.fromkeys(learned or ()))
    others = [a for a in dict.fromkeys(joined) if a not in set(listed)]
    failed = failed or {}

    def key(item: tuple[int, str]) -> tuple[bool, int, int]:
        tier, address = item
        suspect = now - failed.get(address, float("-inf")) < SUSPECT_S
        return suspect, tier, -rank(envoy_id, address)

    return [a for _, a in sorted([(0, a) for a in listed] + [(1, a) for a in others], key=key)]


def pinned_order(servers: Iterable[str], failed: Mapping[str, float] | None = None, *,
                 now: float | None = None) -> list[str]:
    """A pinned list in its own order, each once, a gateway that failed within ``SUSPECT_S``
    after the others."""
    now = time.monotonic() if now is None else now
    failed = failed or {}
    listed = list(dict.fromkeys(servers))
    return sorted(listed, key=lambda a: now - failed.get(a, float("-inf")) < SUSPECT_S)


def learned(meta: Any) -> list[str]:
    """The learned list from meta ``gateways`` (empty when none was learned)."""
    if not isinstance(meta, dict):
        return []
    return [a for a in meta.get("list") or [] if isinstance(a, str)]


def learn(previous: Any, answer_list: Any, server: str, *, now: float | None = None) -> dict[str, Any] | None:
    """The meta ``gateways`` to keep after an answer from ``server``: a new record when the
    answer carries a non-empty list, else None (keep ``previous`` as it is)."""
    if not isinstance(answer_list, list):
        return None
    addresses = list(dict.fromkeys(a.strip() for a in answer_list if _dialable(a)))
    if not addresses:
        return None
    addresses = addresses[:MAX_GATEWAYS]
    record = {"list": addresses, "at": time.time() if now is None else now, "server": server}
    if isinstance(previous, dict) and previous.get("list") == addresses:
        record["since"] = previous.get("since", previous.get("at"))  # unchanged since then
    else:
        record["since"] = record["at"]
    return record


def _dialable(address: Any) -> bool:
    """Whether an address from an answer is one this envoy can dial (HOST:PORT)."""
    if not isinstance(address, str):
        return False
    try:
        parse_server(address)
    except ConfigError:
        return False
    return True
