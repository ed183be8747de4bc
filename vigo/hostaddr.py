"""This host's own IP addresses, read without a subprocess or a network lookup.

A bottom-layer module because two sides need the same answer: the envoy reports the addresses
as traits (``vigo.agent.traits``) and the server names them in the gateway certificate it makes
for itself (``vigo.server.partition``). The server must not import the envoy for that, and the
envoy must stay light, so this needs nothing but the standard library.

No subprocess (``ip addr`` costs a fork and may be absent). IPv4 comes from one ``SIOCGIFADDR``
ioctl per interface, which gives each interface's *primary* address only (secondary addresses
need netlink, not worth its code here); IPv6 from ``/proc/net/if_inet6``, which lists every
address. Linux only: elsewhere the answer is empty.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path

__all__ = ["interfaces", "local_addresses", "sort_addresses"]

log = logging.getLogger("vigo.hostaddr")

# ioctl(2) request that returns an interface's primary IPv4 address (linux/sockios.h).
_SIOCGIFADDR = 0x8915


def interfaces(root: Path = Path("/")) -> dict[str, list[str]]:
    """``{interface: [address, ...]}`` of non-loopback, non-link-local IPv4 and IPv6 addresses.

    ``root`` re-bases ``proc/net/if_inet6`` so tests can point it at a fixture.
    """
    found: dict[str, set[str]] = {}
    if sys.platform.startswith("linux"):
        for name, address in _ipv4_addresses():
            found.setdefault(name, set()).add(address)
    for name, address in _ipv6_addresses(Path(root)):
        found.setdefault(name, set()).add(address)
    return {name: sort_addresses(addrs) for name, addrs in sorted(found.items()) if addrs}


def local_addresses(root: Path = Path("/")) -> list[str]:
    """Every address of :func:`interfaces`, once each, in :func:`sort_addresses` order."""
    return sort_addresses({a for addrs in interfaces(root).values() for a in addrs})


def sort_addresses(addresses: set[str] | list[str]) -> list[str]:
    """IPv4 before IPv6, each in numeric order (string order would put 10.x before 9.x)."""

    def key(address: str) -> tuple[int, bytes]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        packed = socket.inet_pton(family, address)
        return (len(packed), packed)

    return sorted(addresses, key=key)


def _ipv4_addresses() -> list[tuple[str, str]]:
    import fcntl
    import struct

    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError as exc:
        log.debug("cannot list interfaces: %s", exc)
        return []
    out = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            try:
                req = struct.pack("256s", name.encode()[:15])
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, req)
            except OSError:
                continue  # No IPv4 address on this interface (EADDRNOTAVAIL): not an error.
            address = socket.inet_ntoa(reply[20:24])
            if not address.startswith("127.") and address != "0.0.0.0":
                out.append((name, address))
    return out


def _ipv6_addresses(root: Path) -> list[tuple[str, str]]:
    path = root / "proc/net/if_inet6"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:  # no IPv6 on this host, or not Linux: no IPv6 addresses, not an error
        log.debug("cannot read %s: %s", path, exc)
        return []
    out = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 6 or len(words[0]) != 32:
            continue
        try:
            packed = bytes.fromhex(words[0])
        except ValueError:
            continue
        loopback = packed == bytes(15) + b"\x01"
        link_local = packed[0] == 0xFE and packed[1] & 0xC0 == 0x80  # fe80::/10
        if not (loopback or link_local):
            out.append((words[5], socket.inet_ntop(socket.AF_INET6, packed)))
    return out
