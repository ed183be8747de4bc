"""Namespaced hosts: N "machines" on this one, each with its own network, PIDs, mounts and name.

    python -m tests.hosts.netns up 3          # node-1..node-3 at 10.231.0.11..13, sshd on each
    python -m tests.hosts.netns run 1 -- ray status      # a command on node-1 as `vigo`
    python -m tests.hosts.netns cut 2         # node-2's link down (a real partition) ...
    python -m tests.hosts.netns heal 2        # ... and back up
    python -m tests.hosts.netns kill 3        # SIGKILL the whole host (every process on it)
    python -m tests.hosts.netns start 3       # boot it again (its home and /var/lib kept)
    python -m tests.hosts.netns status
    python -m tests.hosts.netns down          # everything gone; idempotent; finds leftovers by name

Host ``node-I`` is a network namespace ``vigo-node-I`` whose ``eth0`` (10.231.0.(10+I)/24) is
a veth ``vigo-vI`` on the bridge ``vigo-br0``, plus its own PID, mount and UTS namespaces
(``unshare --pid --fork --kill-child --mount-proc --mount --uts --propagation private``)
whose PID 1 is tests/hosts/hostinit.py: hostname, private tmpfs ``/tmp``, ``/dev/shm`` and
``/run``, its own ``/home``, ``/var/lib`` (an overlay on the machine's) and ``/etc`` account
files (a ``vigo`` user, uid 2000, with passwordless sudo) and its own sshd on its address.
The per-host files live in ``ROOT/hosts/node-I`` (ROOT: ``$VIGO_HOSTS_ROOT``, default
``/var/tmp/vigo-hosts``) and survive ``kill``/``start`` like a disk survives a power cut.

Why each namespace (Ray facts, /work/shared/notes/hosts.md): ``ray stop`` kills every Ray
process it can see, so each host needs its own PID space; ``/tmp/ray`` must not be shared;
cluster.yaml labels nodes with ``$(hostname)``. The bridge has no address: hosts reach each
other and nothing else. Each host's default route points at 10.231.0.254, which nobody
answers: Ray's node-IP guess (a UDP "connect" towards a public address, which sends nothing)
then yields the host's own address as on a real host, while any packet actually sent outside
the /24 dies in the host for want of an ARP answer.

The packages the hosts need (``openssh-server``, ``rsync``, ``sudo``, ``python3.11-venv``,
``iproute2``, ``procps``) are installed from Debian's archive with apt-get when missing,
without starting any service. Tests use :class:`Hosts` (see
tests/hosts/conftest.py); one session at a time holds ``ROOT/lock``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(os.environ.get("VIGO_HOSTS_ROOT", "/var/tmp/vigo-hosts"))
BRIDGE = "vigo-br0"
NET = "10.231.0"
#: node-I has address NET.(FIRST_OCTET + I - 1): node-1 is 10.231.0.11.
FIRST_OCTET = 11
MAX_HOSTS = 20
#: Every host's default route: an address nobody answers (see the module docstring).
DEAD_GATEWAY = f"{NET}.254"
NETNS_PREFIX = "vigo-node-"
VETH_PREFIX = "vigo-v"
USER, UID = "vigo", 2000
HOME = f"/home/{USER}"
#: A file -> the Debian package providing it: what the hosts and the harness use.
PACKAGES = {
    "/usr/sbin/sshd": "openssh-server",  # every host's sshd; brings ssh and ssh-keygen
    "/usr/bin/rsync": "rsync",  # `ray up` copies file_mounts with it, at both ends
    "/usr/bin/sudo": "sudo",  # cluster.yaml's head_setup_commands
    "/usr/lib/python3.11/ensurepip/__init__.py": "python3.11-venv",  # `python3.11 -m venv` (the docs)
    "/usr/sbin/ip": "iproute2",
    "/usr/bin/ps": "procps",
}
#: Debian's way to keep package scripts from starting the services they install.
POLICY_RC_D = Path("/usr/sbin/policy-rc.d")
HOSTINIT = Path(__file__).with_name("hostinit.py")
#: The interpreter PID 1 of each host runs with (standard library only).
INIT_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_READY_TIMEOUT_S = 30.0
HOST_GONE_TIMEOUT_S = 30.0
#: How long a second session waits for the one holding ROOT/lock.
LOCK_TIMEOUT_S = 600.0


class HostsUnavailable(RuntimeError):
    """This machine cannot make namespaced hosts (not root, or no unshare/ip/nsenter)."""


class HostError(RuntimeError):
    """A host operation failed; the message carries the command and its output."""


def sh(*cmd: str | os.PathLike, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise HostError(f"{shlex.join(map(str, cmd))}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    return proc


def unavailable_reason() -> str | None:
    """Why namespaced hosts cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "namespaced hosts need root (network, PID and mount namespaces, a bridge)"
    for tool in ("unshare", "nsenter", "setpriv", "mount", "findmnt"):  # util-linux
        if shutil.which(tool) is None:
            return f"namespaced hosts need `{tool}` on PATH"
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount", "--uts", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"this machine cannot create namespaces: unshare said {probe.stderr.strip()!r}"
    return None


def ensure_packages(extra: dict[str, str] | None = None) -> None:
    """apt-get install the Debian packages whose binaries are missing (quiet, idempotent; an
    `apt-get update` only when the package lists are stale). No service is started: Debian's
    policy-rc.d on this machine refuses it, and the hosts run their own daemons."""
    wanted = {**PACKAGES, **(extra or {})}
    missing = sorted({pkg for path, pkg in wanted.items() if not os.path.exists(path)})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends",
               "-o", "Dpkg::Use-Pty=0", "-o", "DPkg::Lock::Timeout=300", *missing]
    # openssh-server's postinst would start a real sshd on every address of this machine:
    # forbid service starts for the length of the install (Debian's policy-rc.d, exit 101).
    made_policy = not POLICY_RC_D.exists()
    if made_policy:
        POLICY_RC_D.write_text("#!/bin/sh\n# tests/hosts/netns.py: no service starts during its install\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        first = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if first.returncode != 0:  # stale package lists: update once, then try again
            sh("apt-get", "update", "-q", env=env, timeout=600)
            sh(*install, env=env, timeout=900)
    finally:
        if made_policy:
            POLICY_RC_D.unlink(missing_ok=True)


# --- one host -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    index: int
    root: Path

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def addr(self) -> str:
        return f"{NET}.{FIRST_OCTET + self.index - 1}"

    @property
    def netns(self) -> str:
        return f"{NETNS_PREFIX}{self.index}"

    @property
    def veth(self) -> str:
        return f"{VETH_PREFIX}{self.index}"

    @property
    def dir(self) -> Path:
        return self.root / "hosts" / self.name

    @property
    def home(self) -> Path:
        """The ``vigo`` account's home as seen from outside (``/home/vigo`` inside)."""
        return self.dir / "home" / USER

    @property
    def var_lib(self) -> Path:
        """What the host changed in its ``/var/lib`` (the overlay's upper dir), seen from
        outside: read it, never write it while the host runs (write through ``run``)."""
        return self.dir / "varlib"

    def __str__(self) -> str:
        return f"{self.name} ({self.addr})"


def _ns_pids(netns: str) -> list[int]:
    proc = sh("ip", "netns", "pids", netns, check=False)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def _netns_names() -> list[str]:
    proc = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.startswith(NETNS_PREFIX)]


def _links(prefix: str) -> list[str]:
    proc = sh("ip", "-o", "link", "show", check=False)
    names = [line.split(":")[1].strip().split("@")[0] for line in proc.stdout.splitlines() if ":" in line]
    return [n for n in names if n.startswith(prefix)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid)


def _proc_state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except OSError:
        return "gone"
    return ""


# --- the set of hosts ---------------------------------------------------------------------


class Hosts:
    """The namespaced hosts under ``root``. ``up(n)`` makes node-1..node-n; ``down()`` removes
    every host, veth, bridge and per-host directory the harness ever made (by name, so it also
    cleans up after a crashed session)."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.hosts: dict[int, Host] = {}
        self._procs: dict[int, subprocess.Popen] = {}
        self._lock_fd: int | None = None

    # -- session lock ---------------------------------------------------------------------

    def lock(self, timeout_s: float = LOCK_TIMEOUT_S) -> None:
        """Hold ROOT/lock for this object's lifetime: one session of hosts at a time."""
        if self._lock_fd is not None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 100, 0).decode(errors="replace").strip()
                    os.close(fd)
                    raise HostError(f"namespaced hosts are in use by another session ({holder}) "
                                    f"for more than {timeout_s:.0f} s") from None
                time.sleep(2)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} {' '.join(sys.argv)[:80]}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- bring up -------------------------------------------------------------------------

    def host(self, index: int) -> Host:
        if not 1 <= index <= MAX_HOSTS:
            raise ValueError(f"host index {index} out of range 1..{MAX_HOSTS}")
        return self.hosts.setdefault(index, Host(index, self.root))

    def discover(self) -> list[Host]:
        """The hosts that exist (per-host directories), for a CLI invocation after `up`."""
        found = sorted(int(p.name.split("-")[1]) for p in (self.root / "hosts").glob("node-*"))
        return [self.host(i) for i in found]

    def up(self, n: int) -> list[Host]:
        """node-1..node-n, each booted with sshd listening. Removes leftovers first."""
        reason = unavailable_reason()
        if reason:
            raise HostsUnavailable(reason)
        if not 1 <= n <= MAX_HOSTS:
            raise ValueError(f"between 1 and {MAX_HOSTS} hosts, not {n}")
        ensure_packages()
        self.lock()
        self.down()
        (self.root / "hosts").mkdir(parents=True, exist_ok=True)
        self._keypair()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "link", "set", BRIDGE, "up")
        hosts = [self.host(i) for i in range(1, n + 1)]
        for h in hosts:
            self._prepare(h)
            self._plug(h)
            self._boot(h)
        for h in hosts:
            self._wait_ready(h)
        return hosts

    def _keypair(self) -> None:
        key = self.root / "ssh" / "id_ed25519"
        if not key.exists():
            key.parent.mkdir(parents=True, exist_ok=True)
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vigo-hosts", "-f", key)

    @property
    def private_key(self) -> Path:
        """The key every host's ``vigo`` account accepts (root-owned: copy it to use it)."""
        return self.root / "ssh" / "id_ed25519"

    def _prepare(self, h: Host) -> None:
        """The host's disk: home with the vigo account, its /var/lib changes, /etc account files."""
        etc = h.dir / "etc"
        (etc / "sudoers.d").mkdir(parents=True, exist_ok=True)
        h.var_lib.mkdir(parents=True, exist_ok=True)
        (h.dir / "varlib.work").mkdir(exist_ok=True)
        if not h.home.exists():
            shutil.copytree("/etc/skel", h.home, symlinks=True)
        (h.home / ".ssh").mkdir(mode=0o700, exist_ok=True)
        pub = (self.root / "ssh" / "id_ed25519.pub").read_text()
        (h.home / ".ssh" / "authorized_keys").write_text(pub)
        # No index is reachable from a host: pip must never try one (it would wait on DNS).
        (h.home / ".config" / "pip").mkdir(parents=True, exist_ok=True)
        (h.home / ".config" / "pip" / "pip.conf").write_text(
            "[global]\nno-index = true\ndisable-pip-version-check = true\n")
        sh("chown", "-R", f"{UID}:{UID}", h.home)
        os.chmod(h.home / ".ssh" / "authorized_keys", 0o600)

        accounts = {
            "passwd": f"{USER}:x:{UID}:{UID}:vigo test account:{HOME}:/bin/bash\n",
            "group": f"{USER}:x:{UID}:\n",
            "shadow": f"{USER}:*:20000:0:99999:7:::\n",
            "gshadow": f"{USER}:!::\n",
        }
        for name, line in accounts.items():
            src = Path("/etc") / name
            if src.exists():
                shutil.copy2(src, etc / name)
                with open(etc / name, "a") as f:
                    f.write(line)
                st = src.stat()
                os.chown(etc / name, st.st_uid, st.st_gid)
        names = "".join(f"{Host(i, self.root).addr}\tnode-{i}\n" for i in range(1, MAX_HOSTS + 1))
        (etc / "hosts").write_text(f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n{names}")
        (etc / "hostname").write_text(f"{h.name}\n")
        (etc / "resolv.conf").write_text("# no DNS on namespaced hosts: names are in /etc/hosts\n")
        sudoers = etc / "sudoers.d" / USER
        sudoers.write_text(f"{USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
        os.chmod(sudoers, 0o440)

    def _plug(self, h: Host) -> None:
        """The host's network namespace and its veth on the bridge."""
        sh("ip", "netns", "add", h.netns)
        sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
        sh("ip", "link", "set", h.veth, "master", BRIDGE, "up")
        sh("ip", "-n", h.netns, "link", "set", "lo", "up")
        sh("ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
        sh("ip", "-n", h.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", h.netns, "route", "add", "default", "via", DEAD_GATEWAY)

    def _boot(self, h: Host) -> None:
        (h.dir / "ready").unlink(missing_ok=True)
        with open(h.dir / "init.log", "ab") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", h.netns,
                 "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--uts",
                 "--propagation", "private",
                 INIT_PYTHON, str(HOSTINIT), "--name", h.name, "--addr", h.addr, "--dir", str(h.dir)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"})
        self._procs[h.index] = proc
        (h.dir / "pid").write_text(f"{proc.pid}\n")

    def _wait_ready(self, h: Host) -> None:
        deadline = time.monotonic() + HOST_READY_TIMEOUT_S
        probe = ["ip", "netns", "exec", h.netns, "bash", "-c", f"exec 3<>/dev/tcp/{h.addr}/22"]
        while time.monotonic() < deadline:
            if (h.dir / "ready").exists() and sh(*probe, check=False, timeout=10).returncode == 0:
                return
            if not _alive(self.unshare_pid(h)):
                break
            time.sleep(0.1)
        log = (h.dir / "init.log").read_text(errors="replace")[-3000:]
        raise HostError(f"{h} did not come up (sshd on {h.addr}:22) within {HOST_READY_TIMEOUT_S:.0f} s:\n{log}")

    def start(self, index: int) -> Host:
        """Boot a killed host again: same network namespace, same disk."""
        h = self.host(index)
        if self.is_running(h):
            raise HostError(f"{h} is running")
        self._wait_gone(h)
        self._boot(h)
        self._wait_ready(h)
        return h

    # -- operate --------------------------------------------------------------------------

    def unshare_pid(self, h: Host) -> int:
        try:
            return int((h.dir / "pid").read_text())
        except (OSError, ValueError):
            return 0

    def is_running(self, h: Host) -> bool:
        pid = self.unshare_pid(h)
        return pid > 0 and _alive(pid) and "unshare" in _cmdline(pid)

    def init_pid(self, h: Host) -> int:
        """PID (in this namespace) of the host's PID 1."""
        pid = self.unshare_pid(h)
        children = Path(f"/proc/{pid}/task/{pid}/children")
        try:
            first = children.read_text().split()
        except OSError:
            first = []
        if not first or not self.is_running(h):
            raise HostError(f"{h} is not running")
        return int(first[0])

    def argv(self, h: Host | int, command: str, *, user: str = USER, env: dict[str, str] | None = None) -> list[str]:
        """argv running ``command`` (bash) on host ``h`` as ``user`` (a login shell for vigo)."""
        h = self.host(h) if isinstance(h, int) else h
        enter = ["nsenter", "-t", str(self.init_pid(h)), "-m", "-u", "-n", "-p", "--"]
        extra = [f"{k}={v}" for k, v in (env or {}).items()]
        if user == "root":
            base = ["env", "-i", "HOME=/root", f"PATH={SYSTEM_PATH}", "LANG=C.UTF-8", "USER=root", "PIP_NO_INDEX=1"]
            return [*enter, *base, *extra, "bash", "-c", f"cd /root && {command}"]
        return [*enter, "setpriv", "--reuid", user, "--regid", user, "--init-groups", "--reset-env", "--",
                "env", "LANG=C.UTF-8", *extra, "bash", "-lc", f"cd && {command}"]

    def run(self, h: Host | int, command: str, *, user: str = USER, env: dict[str, str] | None = None,
            timeout: float = 300, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``command`` on a host and wait; ``check``: raise HostError on a non-zero exit."""
        h = self.host(h) if isinstance(h, int) else h
        proc = subprocess.run(self.argv(h, command, user=user, env=env), capture_output=True, text=True,
                              timeout=timeout, input=input)
        if check and proc.returncode != 0:
            raise HostError(f"on {h} as {user}: {command}\nexit {proc.returncode}\n"
                            f"--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}")
        return proc

    def processes(self, h: Host | int) -> list[str]:
        """``pid user command`` of every process on the host except its init, sshd and this
        listing itself."""
        h = self.host(h) if isinstance(h, int) else h
        out = self.run(h, "ps -eo pid=,ppid=,user=,args=", user="root").stdout
        rows = [[*line.split(None, 3), "", "", ""][:4] for line in out.splitlines() if line.strip()]
        lister = {pid for pid, ppid, _, args in rows if args.startswith("ps -eo")}
        lister |= {ppid for pid, ppid, _, args in rows if pid in lister}
        return [" ".join((pid, user, args)) for pid, _, user, args in rows
                if pid != "1" and pid not in lister and not args.startswith("/usr/sbin/sshd -D")]

    def cut(self, index: int) -> None:
        """Unplug the host's cable: its veth on the bridge goes down (connections hang)."""
        sh("ip", "link", "set", self.host(index).veth, "down")

    def heal(self, index: int) -> None:
        sh("ip", "link", "set", self.host(index).veth, "up")

    def kill(self, index: int) -> None:
        """Power the host off: SIGKILL its unshare, hence (``--kill-child``) its PID 1, hence
        every process in it. Returns once none is left."""
        h = self.host(index)
        pid = self.unshare_pid(h)
        if pid and _alive(pid) and "unshare" in _cmdline(pid):
            os.kill(pid, signal.SIGKILL)
        proc = self._procs.pop(index, None)
        if proc is not None:
            proc.wait(timeout=HOST_GONE_TIMEOUT_S)
        self._wait_gone(h)

    def _wait_gone(self, h: Host) -> None:
        """A network namespace is only free when its last process has exited."""
        deadline = time.monotonic() + HOST_GONE_TIMEOUT_S
        while (pids := [p for p in _ns_pids(h.netns) if _alive(p)]) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if pids:
            raise HostError(f"{h}: processes {pids} outlived SIGKILL for {HOST_GONE_TIMEOUT_S:.0f} s")

    # -- tear down ------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove every host, veth, the bridge and the per-host dirs (not ROOT/cache). Safe to
        run at any time and again; returns what it removed."""
        removed: list[str] = []
        for pidfile in (self.root / "hosts").glob("node-*/pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text())
                if _alive(pid) and "unshare" in _cmdline(pid):
                    os.kill(pid, signal.SIGKILL)
                    removed.append(f"host process {pid}")
        for proc in self._procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=HOST_GONE_TIMEOUT_S)
        self._procs.clear()
        for netns in _netns_names():
            index = int(netns.removeprefix(NETNS_PREFIX)) if netns.removeprefix(NETNS_PREFIX).isdigit() else 0
            if index:
                self._wait_gone(Host(index, self.root))
            else:  # not one of ours by number: still ours by name
                for pid in _ns_pids(netns):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            sh("ip", "netns", "del", netns, check=False)
            removed.append(f"netns {netns}")
        for link in _links(VETH_PREFIX) + _links(BRIDGE):
            sh("ip", "link", "del", link, check=False)
            removed.append(f"link {link}")
        for target in _mounts_under(self.root):  # none expected: host mounts die with the host
            sh("umount", "-l", target, check=False)
            removed.append(f"mount {target}")
        if (self.root / "hosts").exists():
            shutil.rmtree(self.root / "hosts")
            removed.append(f"dir {self.root / 'hosts'}")
        self.hosts.clear()
        return removed

    def down_at_exit(self) -> None:
        """Make sure the hosts go even if the interpreter exits on an error or a signal."""
        atexit.register(self._down_quietly)

    def _down_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self.down()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _mounts_under(root: Path) -> list[str]:
    proc = sh("findmnt", "-rn", "-o", "TARGET", check=False)
    return [t for t in proc.stdout.splitlines() if t.startswith(str(root) + "/")][::-1]


@contextlib.contextmanager
def namespaced_hosts(n: int, root: Path = ROOT) -> Iterator[Hosts]:
    """``n`` hosts for the duration of the block, removed afterwards whatever happened."""
    hosts = Hosts(root)
    hosts.down_at_exit()
    try:
        hosts.up(n)
        yield hosts
    finally:
        hosts.down()
        hosts.unlock()


# --- CLI ----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.hosts.netns", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="make node-1..node-N (removing any left before)").add_argument("n", type=int)
    for name, text in (("start", "boot a killed host again"), ("cut", "take a host's link down"),
                       ("heal", "bring a host's link back"), ("kill", "SIGKILL a whole host")):
        sub.add_parser(name, help=text).add_argument("index", type=int)
    run = sub.add_parser("run", help="run a shell command on a host (as vigo, or --root)")
    run.add_argument("index", type=int)
    run.add_argument("--root", action="store_true")
    run.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("status", help="list the hosts and whether each runs")
    sub.add_parser("down", help="remove every host, link and per-host dir (idempotent)")
    args = parser.parse_args(argv)

    hosts = Hosts()
    if args.cmd == "up":
        for h in hosts.up(args.n):
            print(f"{h.name}\t{h.addr}\tssh -i {hosts.private_key} {USER}@{h.addr}")
        return 0
    if args.cmd == "down":
        hosts.lock(timeout_s=60)
        for line in hosts.down():
            print(f"removed {line}")
        return 0
    if args.cmd == "status":
        for h in hosts.discover():
            state = "running" if hosts.is_running(h) else "down"
            link = sh("ip", "-br", "link", "show", h.veth, check=False).stdout.split()
            print(f"{h.name}\t{h.addr}\t{state}\tlink {link[1] if len(link) > 1 else 'absent'}")
        return 0
    if args.cmd == "run":
        words = list(args.command)
        as_root = args.root or (bool(words) and words[0] == "--root")
        words = words[1:] if words and words[0] == "--root" else words
        words = words[1:] if words and words[0] == "--" else words
        return subprocess.call(hosts.argv(args.index, " ".join(words), user="root" if as_root else USER))
    getattr(hosts, args.cmd)(args.index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
