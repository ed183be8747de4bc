"""`vigocli server start --dev` listens on loopback only, and `vigocli server stop` leaves no
process of the dev head behind: not the Ray client server, the dashboard agent or the runtime
env agent, which used to survive it (issue 18).

The head's processes are found here without vigo's own code: every process in the session of
its `ray start` (recorded in dev-head.json), every process whose environment carries the dev
head's marker, and their descendants. Their listening sockets come from /proc/net/tcp{,6}.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.devserver import free_port, run

pytestmark = pytest.mark.timeout(300)
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, session id, state) of a process, None once it is gone."""
    try:
        _, rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
    except OSError:
        return None
    fields = rest.split()
    return int(fields[1]), int(fields[3]), fields[0]


def head_processes(session: int, temp_dir: str) -> set[int]:
    """Live (non-zombie) processes of the dev head."""
    marker = f"VIGO_DEV_HEAD={temp_dir}".encode()
    table = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
    found = {pid for pid, (_, sid, _) in table.items() if sid == session}
    for pid in table:
        try:
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            continue
    grown = True
    while grown:
        more = {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found
        found |= more
        grown = bool(more)
    return {pid for pid in found if table[pid][2] != "Z" and pid != os.getpid()}


def _address(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # four host-order 32-bit words
    full = b"".join(words)
    if full[:12] == b"\0" * 10 + b"\xff\xff":
        return "::ffff:" + ".".join(str(b) for b in full[12:])
    import ipaddress

    return str(ipaddress.IPv6Address(full))


def listening_sockets(pids: set[int]) -> dict[tuple[str, int], set[int]]:
    """(address, port) -> pids, for every TCP socket in LISTEN state owned by ``pids``."""
    inodes = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            addr, port = fields[1].split(":")
            inodes[fields[9]] = (_address(addr), int(port, 16))
    out: dict[tuple[str, int], set[int]] = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(fd)
            except OSError:
                continue
            if link.startswith("socket:[") and (sock := inodes.get(link[8:-1])):
                out.setdefault(sock, set()).add(pid)
    return out


def test_dev_head_listens_on_loopback_only_and_stop_leaves_nothing(tmp_path):
    data = tmp_path / "data"
    dash, ray_port, gw_port = free_port(), free_port(), free_port()
    env = {"VIGO_ADDRESS": f"http://127.0.0.1:{dash}"}
    started = run("vigocli", "server", "start", "--dev", "--data-dir", data, "--dashboard-port", dash,
                  "--ray-port", ray_port, "--port", gw_port, "--json", env=env, check=None)
    marker = json.loads((data / "dev-head.json").read_text()) if (data / "dev-head.json").exists() else None
    try:
        assert started.returncode == 0, started.stderr
        pids = head_processes(marker["session"], marker["temp_dir"])
        names = {Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace") for p in pids}
        for expected in ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::Gateway", "ray::Member"):
            assert any(n.startswith(expected) for n in names), (expected, sorted(names))
        assert any("ray.util.client.server" in Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in pids)
        sockets = listening_sockets(pids)
        ports = {port for _, port in sockets}
        assert {dash, ray_port, gw_port} <= ports, sorted(sockets)  # the scan sees the head's servers
        exposed = {sock: owners for sock, owners in sockets.items() if sock[0] not in LOOPBACK}
        assert not exposed, exposed
        print(f"\n{len(pids)} processes, {len(sockets)} listening sockets, all on loopback")
    finally:
        t0 = time.monotonic()
        stopped = run("vigocli", "server", "stop", "--data-dir", data, env=env, check=None)
        print(f"server stop: {time.monotonic() - t0:.1f} s; {stopped.stderr.strip()}")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped actors: primary-p0, gateway-" in stopped.stderr
    deadline = time.monotonic() + 10
    while (left := head_processes(marker["session"], marker["temp_dir"])) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:80] for p in left}
