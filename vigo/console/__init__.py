"""The fleet console (docs/console.md): a read-only web view served by an actor
(vigo/actors/console.py) over the same admin operations as vigocli. No Ray here, and nothing of
the server's cores: the console knows the fleet only through admin answers."""

from vigo.console.app import COOKIE, CSP, ConsoleServer, Source
from vigo.console.sessions import Sessions

__all__ = ["COOKIE", "CSP", "ConsoleServer", "Sessions", "Source"]
