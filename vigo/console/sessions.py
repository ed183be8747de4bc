"""Console logins: the Ray cluster token exchanged for a session, and one-time login links.

A session is a random id (32 bytes, URL-safe) kept in this process with its expiry; the cookie
carries only the id. A cookie that is not in the table (forged, from before a restart, or
logged out) or whose expiry passed is refused, so nothing a client sends can extend or invent
a session. The table is bounded: past ``MAX_SESSIONS`` the oldest session goes.

A one-time login link (``vigocli console``) is a code issued to a caller that presented the
cluster token; it is valid once, for ``LINK_TTL_S``, and only its sha256 is kept.

Failed logins are limited per client address (``MAX_FAILURES`` per ``FAILURE_WINDOW_S``): the
cluster token is long and random, so this only keeps a guesser from burning CPU.

Not thread-safe by design: the console's aiohttp server calls it from one event loop.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: Sessions kept at most; a new login past it ends the oldest session.
MAX_SESSIONS = 1000
#: Lifetime of a one-time login link, seconds: long enough to click it in a terminal.
LINK_TTL_S = 120.0
#: Unredeemed login links kept at most.
MAX_LINKS = 100
#: Failed logins allowed per client address per window, and the window, seconds.
MAX_FAILURES = 10
FAILURE_WINDOW_S = 60.0
#: Clients whose failures are remembered at most (the oldest is forgotten first).
MAX_FAILING_CLIENTS = 10000


@dataclass(frozen=True)
class Session:
    id: str
    created_at: float
    expires_at: float


class Sessions:
    def __init__(self, token: Callable[[], str | None], ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        self._token = token  # read at every login: a rotated cluster token applies at once
        self.ttl_s = ttl_s
        self.clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._links: OrderedDict[str, float] = OrderedDict()  # sha256(code) -> expires_at
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    # --- the cluster token ---------------------------------------------------------------

    def token_ok(self, presented: str | None) -> bool:
        """Whether ``presented`` is the cluster token (compared in constant time). With no
        token configured nothing is accepted: the console is never open."""
        wanted = self._token()
        if not wanted or not presented:
            return False
        return hmac.compare_digest(presented.strip().encode(), wanted.encode())

    def throttled(self, client: str) -> bool:
        now = self.clock()
        recent = [t for t in self._failures.get(client, []) if now - t < FAILURE_WINDOW_S]
        if recent:
            self._failures[client] = recent
        else:
            self._failures.pop(client, None)
        return len(recent) >= MAX_FAILURES

    def failed(self, client: str) -> None:
        self._failures.setdefault(client, []).append(self.clock())
        self._failures.move_to_end(client)
        while len(self._failures) > MAX_FAILING_CLIENTS:
            self._failures.popitem(last=False)

    # --- sessions ------------------------------------------------------------------------

    def create(self) -> Session:
        now = self.clock()
        session = Session(secrets.token_urlsafe(32), now, now + self.ttl_s)
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def check(self, session_id: str | None) -> Session | None:
        """The live session ``session_id`` names, or None (unknown, or expired: then dropped)."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if self.clock() >= session.expires_at:
            del self._sessions[session_id]
            return None
        return session

    def end(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    # --- one-time login links ------------------------------------------------------------

    def issue_link(self) -> tuple[str, float]:
        """A new one-time code and when it expires."""
        code = secrets.token_urlsafe(24)
        expires = self.clock() + LINK_TTL_S
        self._links[_digest(code)] = expires
        while len(self._links) > MAX_LINKS:
            self._links.popitem(last=False)
        return code, expires

    def redeem_link(self, code: str) -> Session | None:
        """A session for a valid, unused, unexpired code (which is then spent), else None."""
        expires = self._links.pop(_digest(code), None)
        if expires is None or self.clock() >= expires:
            return None
        return self.create()


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()
