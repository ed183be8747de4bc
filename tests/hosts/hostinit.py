"""PID 1 of one namespaced host (started by tests/hosts/netns.py, never by hand).

It runs inside fresh PID, mount and UTS namespaces (``unshare --pid --fork --kill-child
--mount-proc --mount --uts --propagation private``) inside the host's network namespace, and
makes the machine look like a host of its own:

- its hostname (UTS), so ``$(hostname)`` in cluster.yaml labels each node differently;
- private tmpfs on ``/tmp`` (Ray's session dir and ``ray up``'s lock and SSH control sockets),
  ``/dev/shm`` (Ray's object store) and ``/run`` (sshd's privilege-separation dir, sudo's
  timestamps);
- its own ``/home`` and ``/var/lib`` (the machine's under an overlay holding the host's
  changes: ``/var/lib/vigo`` exists only once made), and its own ``/etc`` files (passwd,
  group, shadow with the ``vigo`` account, hosts naming every host, an empty resolv.conf so
  nothing waits on DNS, sudoers.d granting ``vigo`` passwordless sudo);
- its own sshd on the host's address.

Then it stays as init: it reaps every orphan (``ray start`` daemonises; without a reaper the
host fills with zombies) and restarts sshd if it exits. It ends only by SIGKILL: killing the
``unshare`` parent (``--kill-child``) kills it, and the kernel then kills every process of
the host. Standard library only: it runs with the system interpreter.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

#: Files of /etc replaced by the host's own copy (kept in HOST_DIR/etc/).
ETC_FILES = ("passwd", "group", "shadow", "gshadow", "hosts", "hostname", "resolv.conf")


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--addr", required=True)
    parser.add_argument("--dir", required=True, type=Path)
    args = parser.parse_args()
    host_dir: Path = args.dir

    socket.sethostname(args.name)
    mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/tmp")
    mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", "/dev/shm")
    mount("-t", "tmpfs", "-o", "mode=755,nosuid,nodev", "tmpfs", "/run")
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    os.makedirs("/run/lock", mode=0o1777, exist_ok=True)
    mount("--bind", str(host_dir / "home"), "/home")
    # /var/lib: the machine's, plus this host's own changes (an overlay), so /var/lib/vigo
    # exists only where cluster.yaml (or an envoy) made it, as on a fresh host.
    mount("-t", "overlay", "overlay", "-o",
          f"lowerdir=/var/lib,upperdir={host_dir / 'varlib'},workdir={host_dir / 'varlib.work'}", "/var/lib")
    for name in ETC_FILES:
        if (host_dir / "etc" / name).exists() and os.path.exists(f"/etc/{name}"):
            mount("--bind", str(host_dir / "etc" / name), f"/etc/{name}")
    mount("--bind", str(host_dir / "etc" / "sudoers.d"), "/etc/sudoers.d")

    sshd_cmd = ["/usr/sbin/sshd", "-D", "-e", "-o", f"ListenAddress={args.addr}", "-o", "PidFile=none"]
    sshd = subprocess.Popen(sshd_cmd)
    (host_dir / "ready").write_text(f"{time.time()}\n")
    print(f"{args.name}: up at {args.addr}, sshd pid {sshd.pid}", flush=True)

    while True:  # init: reap everything; bring sshd back if it dies
        try:
            pid, status = os.wait()
        except ChildProcessError:
            time.sleep(1)
            continue
        if pid == sshd.pid:
            print(f"{args.name}: sshd exited ({status}); restarting", file=sys.stderr, flush=True)
            time.sleep(1)
            sshd = subprocess.Popen(sshd_cmd)


if __name__ == "__main__":
    sys.exit(main())
