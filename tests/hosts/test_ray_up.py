"""`ray up cluster.yaml` for real, as docs/deploying.md tells an operator, on namespaced hosts.

    node-1  head       10.231.0.11   } the cluster: ray up over SSH, vigo deployed on it
    node-2  worker     10.231.0.12   }
    node-3  worker     10.231.0.13   }
    node-4  operator   10.231.0.14   runs ray up / ray exec / ray down and vigocli, as `vigo`
    node-5  envoy      10.231.0.15   } managed hosts: join with --ca-fingerprint, converge
    node-6  envoy      10.231.0.16   }

The cluster config is cluster.yaml with only addresses, account, key, the wheel's directory
and the test server.yaml changed (tests/hosts/payload.py checks that nothing else differs).
Every step is a command the docs give, run on the host the docs say. The tests share one
cluster and run in this order, each leaving it serving for the next:

    test_cluster_serves                      ray up, deploy, envoys join and converge, ray up again
    test_worker_link_cut                     node-3's cable pulled: the envoy daemon moves to
                                             node-2's gateway; healed: no run lost or doubled
    test_head_killed_and_restarted           node-1 (GCS, control, primary) powered off, then
                                             Ray's head start command on it again: vigo resumes
    test_primary_host_killed_then_promoted   switch the primary to node-2, power node-2 off,
                                             `vigocli server promote` on node-3: nothing lost
    test_standby_host_returns_then_auto_failover  node-2 boots: Ray and its standby come back
                                             by themselves; auto failover on, node-3 powered off
    test_head_lost_for_good_new_cluster_from_a_survivor  node-1 never returns: `vigocli server
                                             adopt` on node-2, `ray up` a new cluster headed there
    test_ray_down_leaves_nothing             ray down, plus `ray stop` on the workers as the docs say

An envoy daemon on node-5 runs every 2 s through all of it; the last test stops it and checks
that the server holds exactly the runs it made (each run id once). node-6 probes with
`run --once` to time recoveries. Timings are printed and written to ROOT/ray-up-timings.json
(benchmarks/hosts.py runs this module and reports them).

    scripts/test -m hosts                       # these tests alone (~6-9 min; +3 min the first
                                                # time, building the hosts' venvs)
    VIGO_HOSTS_KEEP=1     leave the hosts up afterwards (`python -m tests.hosts.netns down`)
    VIGO_HOSTS_WHEEL=W    test wheel W instead of building this checkout's
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from tests.hosts import payload
from tests.hosts.conftest import make_hosts
from tests.hosts.netns import ROOT, UID, HostError, Hosts
from tests.hosts.payload import HOST_VENV, REPO

pytestmark = [pytest.mark.hosts, pytest.mark.integration, pytest.mark.timeout(1200)]

HEAD, WORKERS, OPERATOR, ENVOYS = 1, (2, 3), 4, (5, 6)
CLUSTER_HOSTS = (HEAD, *WORKERS)
KEY = "~/.ssh/vigo-cluster"  # cluster.yaml's auth.ssh_private_key, in the operator's home


#: Lines of Ray's CLI output that only repeat what the step said (SSH command lines, mux noise).
NOISE = re.compile(r"VVINFO|Full command is|Shared connection to|Connection to .* closed|Warning: Permanently added")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def clean(text: str, last: int = 8000) -> str:
    """Ray CLI output without colours and noise, its last ``last`` characters."""
    return "\n".join(line for line in ANSI.sub("", text).splitlines() if not NOISE.search(line))[-last:]


RAY_PROCESS = re.compile(r"\bray\b|ray::|raylet|gcs_server|python|redis")


#: Run on the operator's machine: vigo's alive actors -> the address of the node each runs on,
#: from the dashboard's State API (what `ray list actors` reads), with the cluster token.
ACTOR_HOSTS = """\
import json, pathlib, sys, urllib.request
token = pathlib.Path.home().joinpath(".ray/auth_token").read_text().strip()
def get(path):
    req = urllib.request.Request(sys.argv[1] + path, headers={"Authorization": "Bearer " + token})
    return json.load(urllib.request.urlopen(req, timeout=30))["data"]["result"]["result"]
ips = {n["node_id"]: n["node_ip"] for n in get("/api/v0/nodes?limit=1000")}
alive = "/api/v0/actors?detail=true&limit=1000&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
print(json.dumps({a["name"]: ips.get(a["node_id"]) for a in get(alive) if a.get("ray_namespace") == "vigo"}))
"""


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    yield from make_hosts(max(*CLUSTER_HOSTS, OPERATOR, *ENVOYS))


def wait_for(what: str, check: Callable[[], Any], timeout_s: float, every_s: float = 2.0,
             diagnose: Callable[[], str] = lambda: "") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (HostError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; last: {last!r}\n{diagnose()}")


#: The envoys' own state dir (their default); traits and the managed tree beside it. --root
#: keeps the example stack's /etc/vigo-demo inside the host's /var/lib (its /etc is shared).
ENVOY_DIRS = "--state-dir /var/lib/vigo-envoy --traits-dir /var/lib/vigo-envoy/traits.d"
MANAGED = "/var/lib/vigo-envoy/root"
DAEMON_HOST, PROBE_HOST = ENVOYS
DAEMON_LOG = "/var/lib/vigo-envoy/daemon.log"
DAEMON_PID = "/var/lib/vigo-envoy/daemon.pid"


class Cluster:
    """The cluster under test and the operator's commands on it."""

    def __init__(self, hosts: Hosts) -> None:
        self.hosts = hosts
        self.head = hosts.host(HEAD)
        self.workers = [hosts.host(i) for i in WORKERS]
        self.dashboard = f"http://{self.head.addr}:8265"
        self.marks: dict[str, float] = {}
        self.envoy_ids: dict[int, str] = {}
        self.fingerprint = ""
        self.daemon_runs_before = 0

    def mark(self, name: str, since: float) -> float:
        self.marks[name] = round(time.monotonic() - since, 2)
        return self.marks[name]

    def op(self, command: str, timeout: float = 300, check: bool = True, stdin: str | None = None):
        """A command on the operator's machine, from the repository root (as the docs say)."""
        return self.hosts.run(OPERATOR, f"export PATH={HOST_VENV}/bin:$PATH && cd {REPO} && {command}",
                              env={"RAY_UP_enable_autoscaler_v2": "0"}, timeout=timeout, check=check, input=stdin)

    def on(self, i: int, command: str, timeout: float = 120, check: bool = True):
        """A command on cluster host ``i`` as ssh_user, with the environment cluster.yaml gives it."""
        return self.hosts.run(i, f". ~/vigo/env.sh && {command}", timeout=timeout, check=check)

    def vigocli(self, args: str, timeout: float = 60) -> Any:
        return json.loads(self.op(f"vigocli {args} --address {self.dashboard} --json", timeout=timeout).stdout)

    def envoy_once(self, i: int, timeout: float = 120, check: bool = True) -> dict[str, Any]:
        run = self.hosts.run(i, f"{HOST_VENV}/bin/vigo-envoy run --once {ENVOY_DIRS} --root {MANAGED} --json",
                             user="root", timeout=timeout, check=check)
        return json.loads(run.stdout) if run.stdout.strip().startswith("{") else {"exit": run.returncode,
                                                                                  "stderr": run.stderr[-500:]}

    def run_count(self, i: int) -> int:
        return int(self.vigocli(f"envoys show {self.envoy_ids[i]} --runs 1")["run_count"])

    def daemon_log(self) -> str:
        return self.hosts.run(DAEMON_HOST, f"cat {DAEMON_LOG}", user="root").stdout

    def diagnose(self) -> str:
        out = [clean(self.op("ray exec ~/cluster.yaml 'ray status' 2>&1", check=False, timeout=60).stdout, 3000)]
        for h in (self.head, *self.workers):
            if not self.hosts.is_running(h):
                out.append(f"--- {h}: powered off")
                continue
            logs = "/tmp/ray/session_latest/logs"
            out.append(f"--- {h}: processes\n" + "\n".join(p[:160] for p in self.hosts.processes(h)))
            out.append(clean(self.hosts.run(h, f"tail -n 40 {logs}/monitor.out {logs}/monitor.err "
                                               f"{logs}/raylet.err {logs}/*gateway*.err {logs}/*member*.err "
                                               f"2>/dev/null; grep -hE ' [EWC] [0-9]+ [0-9]+\\]' "
                                               f"{logs}/gcs_server.out {logs}/raylet.out 2>/dev/null | tail -n 30",
                                            check=False).stdout, 6000))
        out.append("--- envoy daemon log (tail)\n" + "\n".join(self.daemon_log().splitlines()[-30:]))
        return "\n".join(out)

    def status(self) -> dict[str, Any]:
        proc = self.op(f"vigocli server status --address {self.dashboard} --json", timeout=60, check=False)
        if proc.returncode != 0:
            raise ValueError(proc.stderr.strip()[-500:])
        return json.loads(proc.stdout)

    def serving(self, gateways: set[str], in_sync: set[str], primary: str | None = None) -> dict[str, Any] | None:
        """`vigocli server status` when it shows exactly these gateway hosts' addresses, at least
        these standbys in sync and (if given) this primary; else None."""
        status = self.status()
        endpoints = {g["endpoint"].split(":")[0] for g in status["gateways"]}
        if endpoints != gateways:
            return None
        if primary is not None and status["primary"] != primary:
            return None
        rep = status.get("replication") or {}
        names = {s["name"] for s in rep.get("standbys", []) if s.get("in_sync")}
        return status if in_sync <= names else None

    def probe_until_online(self, what: str, timeout_s: float) -> float:
        """``run --once`` on the probe envoy until a run is online and flushed; the seconds it took."""
        t = time.monotonic()

        def online() -> bool:
            report = self.envoy_once(PROBE_HOST, check=False)
            return bool(report.get("flushed")) and not report.get("offline")

        wait_for(what, online, timeout_s, every_s=0.2, diagnose=self.diagnose)
        return time.monotonic() - t


@pytest.fixture(scope="module")
def cluster(hosts: Hosts) -> Iterator[Cluster]:
    c = Cluster(hosts)
    yield c
    result = dict(c.marks)
    (ROOT / "ray-up-timings.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\nnamespaced hosts (head + 2 workers, 2 envoys):")
    for name, seconds in result.items():
        print(f"  {name:<72} {seconds:7.2f}")


def test_cluster_serves(cluster: Cluster, hosts: Hosts, wheel) -> None:
    c = cluster
    head, workers = c.head, c.workers
    all_gateways = {hosts.host(i).addr for i in CLUSTER_HOSTS}
    both_standbys = {f"standby-p0-{w.name}" for w in workers}

    # -- the hosts' software: venvs with the pinned dependencies, the operator's and envoys' vigo
    t = time.monotonic()
    for i in CLUSTER_HOSTS:
        payload.install_venv(hosts, hosts.host(i), "server")  # setup_commands add the wheel
    payload.install_venv(hosts, hosts.host(OPERATOR), "server", wheel)
    for i in ENVOYS:
        payload.install_venv(hosts, hosts.host(i), "envoy", wheel)
    c.mark("venvs on 6 hosts", t)

    # -- the operator's machine: the cluster key, the Ray token, the config ----------------
    op_home = hosts.host(OPERATOR).home
    key = op_home / ".ssh" / "vigo-cluster"
    key.write_bytes(b"")
    key.chmod(0o600)
    key.write_bytes(hosts.private_key.read_bytes())
    c.op("ray get-auth-token --generate >/dev/null && chmod 600 ~/.ray/auth_token")
    # deploy/server.yaml as shipped (standbys on node-2 and node-3, sync), archive off.
    (op_home / "server.yaml").write_text(yaml.safe_dump(payload.server_yaml_for_test(standbys=None), sort_keys=False))
    config = payload.cluster_config(head, workers, key_path=KEY, dist_dir=wheel.parent,
                                    server_yaml="~/server.yaml")
    (op_home / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for path in (op_home / "cluster.yaml", op_home / "server.yaml", key):
        os.chown(path, UID, UID)

    # -- ray up; the workers' gateways and standbys start when they join (control) -------------
    t_up = time.monotonic()
    up = c.op("ray up -y ~/cluster.yaml 2>&1", timeout=420, check=False)
    c.mark("ray up returned", t_up)
    assert up.returncode == 0, f"ray up failed:\n{clean(up.stdout)}\n{c.diagnose()}"
    status = wait_for("a gateway per host and both standbys in sync in `vigocli server status`",
                      lambda: c.serving(all_gateways, both_standbys), timeout_s=300, diagnose=c.diagnose)
    c.mark("ray up to serving: primary, 2 standbys in sync, a gateway per host", t_up)

    # control, the primary and the gateways are alive actors, each where it belongs.
    actors = json.loads(c.op(f"python - {c.dashboard} <<'EOF'\n{ACTOR_HOSTS}EOF").stdout)
    assert actors.get("control") == head.addr, actors
    assert actors.get("primary-p0") == head.addr, actors
    for i in CLUSTER_HOSTS:
        h = hosts.host(i)
        assert actors.get(f"gateway-{h.name}") == h.addr, actors
    for w in workers:
        assert actors.get(f"standby-p0-{w.name}") == w.addr, actors
    assert status["partition"] == "p0" and status["primary"] == "primary-p0", status
    c.fingerprint = status["ca_fingerprint"]

    # -- envoys: a stack to enforce, a token, join with the CA pinned, converge ---------------
    c.op("vigocli secrets set api_token --address " + c.dashboard, stdin="vigo-hosts-test-token\n")
    c.op(f"vigocli stack push examples/stack --address {c.dashboard}")
    token = c.vigocli(f"token create --uses {len(ENVOYS)}")["token"]
    t = time.monotonic()
    for i in ENVOYS:
        h = hosts.host(i)
        hosts.run(h, "mkdir -p /var/lib/vigo-envoy/traits.d && echo 'roles: [web]' > /var/lib/vigo-envoy/traits.d/roles.yaml",
                  user="root")
        # Every gateway's address, as docs/envoy.md advises: an envoy knows only what join was given.
        servers = " ".join(f"--server {hosts.host(g).addr}:7700" for g in CLUSTER_HOSTS)
        joined = hosts.run(h, f"{HOST_VENV}/bin/vigo-envoy join {servers} "
                              f"--token {shlex.quote(token)} --ca-fingerprint {c.fingerprint} {ENVOY_DIRS} --json",
                           user="root", timeout=120)
        c.envoy_ids[i] = json.loads(joined.stdout)["envoy_id"]
        report = c.envoy_once(i)
        assert report["counts"]["failed"] == 0 and report["counts"]["changed"] > 0, report
        assert report.get("flushed"), report
        hosts.run(h, f"test -f {MANAGED}/etc/vigo-demo/motd && test -f {MANAGED}/etc/vigo-demo/site/app.conf",
                  user="root")
    c.mark("2 envoys joined and converged", t)
    listed = c.vigocli("envoys list")
    assert {e["id"] for e in listed} == set(c.envoy_ids.values()), listed
    assert all(e["last_run"]["counts"]["failed"] == 0 for e in listed), listed

    # -- ray up again (what the docs say to do after every edit): vigo's state survives -------
    t = time.monotonic()
    again = c.op("ray up -y ~/cluster.yaml 2>&1", timeout=420, check=False)
    c.mark("ray up again returned", t)
    assert again.returncode == 0, f"ray up (again) failed:\n{clean(again.stdout)}\n{c.diagnose()}"
    status = wait_for("vigo serving again after the second ray up", lambda: c.serving(all_gateways, both_standbys),
                      timeout_s=180, diagnose=c.diagnose)
    c.mark("ray up again to serving", t)
    assert status["ca_fingerprint"] == c.fingerprint and status["envoys"] == len(ENVOYS), status
    for i in ENVOYS:  # the same envoys, no rejoin: they check in, report and are counted once
        report = c.envoy_once(i)
        assert report["counts"]["failed"] == 0 and report.get("flushed"), report
    listed = c.vigocli("envoys list")
    assert {e["id"] for e in listed} == set(c.envoy_ids.values()), listed

    # -- the envoy daemon that runs through every failure below -------------------------------
    # Gateways node-3 first, then node-2 (never the head's), a run every 2 s, a dead connection
    # noticed after a 2 s keepalive ping goes unanswered (plus the request timeout).
    envoy_yaml = yaml.safe_dump({
        "servers": [f"{hosts.host(3).addr}:7700", f"{hosts.host(2).addr}:7700"], "interval_s": 2, "splay_s": 0,
        "keepalive_s": 2, "reconnect_base_s": 0.2, "reconnect_cap_s": 2, "run_checkin_budget_s": 5,
        "root": MANAGED, "traits_dir": "/var/lib/vigo-envoy/traits.d"})
    hosts.run(DAEMON_HOST, f"cat > /var/lib/vigo-envoy/envoy.yaml <<'EOF'\n{envoy_yaml}EOF", user="root")
    c.daemon_runs_before = c.run_count(DAEMON_HOST)
    # In braces: only the daemon goes to the background, its output away from this command's pipe.
    hosts.run(DAEMON_HOST, f"{{ setsid {HOST_VENV}/bin/vigo-envoy run --state-dir /var/lib/vigo-envoy "
                           f"--config /var/lib/vigo-envoy/envoy.yaml >{DAEMON_LOG} 2>&1 </dev/null & "
                           f"echo $! > {DAEMON_PID}; }}", user="root")
    wait_for("the envoy daemon connected to node-3's gateway",
             lambda: f"connected to {hosts.host(3).addr}:7700" in c.daemon_log(), 60, diagnose=c.diagnose)


def test_worker_link_cut(cluster: Cluster, hosts: Hosts) -> None:
    """node-3 (a gateway and a standby) loses its link: the daemon moves to node-2's gateway
    and keeps reporting online; writes go on (node-2's standby acknowledges them); healed,
    node-3's standby catches up."""
    c = cluster
    node2, node3 = hosts.host(2).addr, hosts.host(3).addr
    before = c.run_count(DAEMON_HOST)
    t = time.monotonic()
    hosts.cut(3)
    try:
        wait_for("the daemon connected to node-2's gateway after node-3's link was cut",
                 lambda: f"connected to {node2}:7700" in c.daemon_log(), 90, every_s=0.5, diagnose=c.diagnose)
        c.mark("link cut: daemon on another gateway (keepalive 2 s + request timeout)", t)
        wait_for("two more runs of the daemon stored while node-3 is cut off",
                 lambda: c.run_count(DAEMON_HOST) >= before + 2, 60, diagnose=c.diagnose)
        c.mark("link cut: 2 runs stored through node-2", t)
        report = c.envoy_once(PROBE_HOST)  # the probe's list holds all three: it skips the dead one
        assert report.get("flushed") and not report.get("offline"), report
    finally:
        hosts.heal(3)
    t = time.monotonic()
    every = {hosts.host(i).addr for i in CLUSTER_HOSTS}
    wait_for("node-3's standby in sync again after the heal",
             lambda: c.serving(every, {"standby-p0-node-2", "standby-p0-node-3"}), 120, diagnose=c.diagnose)
    c.mark("link healed: node-3's standby in sync again", t)
    assert node3  # the daemon may stay on node-2: it keeps a working connection


def test_head_killed_and_restarted(cluster: Cluster, hosts: Hosts) -> None:
    """Power the head off: Ray's GCS, control, the primary and the head's gateway go with it.
    Envoys enforce from cache and queue their reports; the workers' raylets wait for the GCS
    (RAY_gcs_rpc_server_reconnect_timeout_s). Boot the host, `ray up --restart-only`: the GCS
    reloads its RocksDB, Ray restarts vigo's detached actors, envoys flush; the head's
    autoscaler finds its record of the workers (kept on disk by cluster.yaml) and leaves them
    running. Measured: power-on to `vigocli` answering and to an online check-in."""
    c = cluster
    before = c.run_count(DAEMON_HOST)
    offline_before = c.daemon_log().count("offline run")
    raylets = {i: c.on(i, "pgrep -x raylet").stdout.split() for i in WORKERS}
    hosts.kill(HEAD)
    t_dead = time.monotonic()
    # With the head gone `vigocli` has nothing to talk to; the daemon keeps enforcing offline.
    assert c.op(f"vigocli server status --address {c.dashboard} --json", check=False, timeout=60).returncode != 0
    wait_for("the daemon's offline runs while the head is down",
             lambda: c.daemon_log().count("offline run") >= offline_before + 2, 60, diagnose=c.diagnose)
    c.mark("head down: the daemon enforced from cache (2 offline runs)", t_dead)

    t_boot = time.monotonic()
    hosts.start(HEAD)
    # What docs/operations.md says to run once the head's host is back: its start commands
    # again (ray stop, ray start --head on the same GCS directory, deploy), nothing else.
    restart = c.op("ray up -y --restart-only ~/cluster.yaml 2>&1", timeout=300, check=False)
    assert restart.returncode == 0, f"ray up --restart-only failed:\n{clean(restart.stdout)}\n{c.diagnose()}"
    c.mark("head restart: ray up --restart-only returned", t_boot)
    wait_for("vigocli answering after the head restart", lambda: c.status(), 120, every_s=0.5, diagnose=c.diagnose)
    c.mark("head restart: power-on to vigocli answering", t_boot)
    c.probe_until_online("an online check-in after the head restart", 180)
    c.mark("head restart: power-on to an online check-in", t_boot)
    every = {hosts.host(i).addr for i in CLUSTER_HOSTS}
    status = wait_for("every gateway and both standbys back after the head restart",
                      lambda: c.serving(every, {"standby-p0-node-2", "standby-p0-node-3"}), 180, diagnose=c.diagnose)
    c.mark("head restart: power-on to every gateway and standby back", t_boot)
    assert status["primary"] == "primary-p0" and status["ca_fingerprint"] == c.fingerprint, status
    # The workers rode it out: their raylets reconnected to the GCS and the head's autoscaler,
    # which checks its workers every 5 s, did not set them up again (`ray stop` first).
    time.sleep(15)
    assert {i: c.on(i, "pgrep -x raylet").stdout.split() for i in WORKERS} == raylets
    wait_for("the daemon's queued runs flushed", lambda: c.run_count(DAEMON_HOST) > before + 2, 120,
             diagnose=c.diagnose)


def test_primary_host_killed_then_promoted(cluster: Cluster, hosts: Hosts) -> None:
    """Switch the primary to node-2 (promote while it is alive: a planned move), power node-2
    off, promote on node-3 as docs/operations.md says. Envoys go on without re-joining."""
    c = cluster
    t = time.monotonic()
    moved = json.loads(c.on(3, "vigocli server promote --standby standby-p0-node-2 --json").stdout)
    c.mark("switchover: vigocli server promote (process start to exit)", t)
    c.marks["switchover: promotion inside control (total_s)"] = moved["total_s"]
    assert moved["new_primary"] == "standby-p0-node-2" and moved["old_primary_alive"], moved
    c.probe_until_online("an online check-in after the switchover", 60)

    offline_before = c.daemon_log().count("offline run")
    hosts.kill(2)
    t_dead = time.monotonic()
    wait_for("the daemon's offline runs while the primary's host is down",
             lambda: c.daemon_log().count("offline run") >= offline_before + 2, 90, diagnose=c.diagnose)
    t = time.monotonic()
    # node-3 by name, so that the next test can take its host away in turn while the head
    # (control) stays; the default would pick whichever standby holds the newest commit.
    promoted = json.loads(c.on(3, "vigocli server promote --standby standby-p0-node-3 --json", timeout=120).stdout)
    c.mark("primary host lost: vigocli server promote (process start to exit)", t)
    c.marks["primary host lost: promote, asking the members (detect_s; a dead one costs 1.5 s)"] = promoted["detect_s"]
    c.marks["primary host lost: promote, the standby's promotion (promotion_s)"] = promoted["promotion_s"]
    c.marks["primary host lost: promote, whole call (total_s)"] = promoted["total_s"]
    assert promoted["new_primary"] == "standby-p0-node-3" and not promoted["old_primary_alive"], promoted
    t_ret = time.monotonic()
    c.probe_until_online("an online check-in after the promotion", 60)
    c.mark("primary host lost: promote returned to an online check-in", t_ret)
    c.mark("primary host lost: power-off to an online check-in (operator-paced)", t_dead)


def test_standby_host_returns_then_auto_failover(cluster: Cluster, hosts: Hosts) -> None:
    """node-2 boots again: the head's autoscaler restarts Ray there (its raylet stopped
    reporting), Ray restarts node-2's gateway and member, and the member, fenced at an old term,
    comes back as a standby and catches up. Then a changed server.yaml turns automatic failover
    on (docs/deploying.md: rsync it up, deploy), and node-3, the primary's host, is powered off:
    control's watchdog promotes a standby with nobody at the keyboard."""
    c = cluster
    every = {hosts.host(i).addr for i in CLUSTER_HOSTS}
    t = time.monotonic()
    hosts.start(2)
    wait_for("node-2's gateway serving and its standby in sync after it booted",
             lambda: c.serving(every, {"standby-p0-node-2", "primary-p0"}, primary="standby-p0-node-3"),
             240, diagnose=c.diagnose)
    c.mark("standby host back: power-on to its gateway serving and standby in sync", t)

    server_yaml = payload.server_yaml_for_test(standbys=None)
    server_yaml["replication"].update(auto_failover=True, failover_after_s=2)
    op_home = hosts.host(OPERATOR).home
    (op_home / "server.yaml").write_text(yaml.safe_dump(server_yaml, sort_keys=False))
    t = time.monotonic()
    c.op("ray rsync-up ~/cluster.yaml ~/server.yaml ~/vigo/server.yaml 2>&1", timeout=120)
    c.op("ray exec ~/cluster.yaml 'vigocli server deploy --config ~/vigo/server.yaml' 2>&1", timeout=300)
    c.mark("changed server.yaml (auto_failover on): rsync-up + deploy", t)
    wait_for("every gateway and the standbys in sync after the deploy",
             lambda: c.serving(every, {"standby-p0-node-2", "primary-p0"}, primary="standby-p0-node-3"),
             120, diagnose=c.diagnose)

    hosts.kill(3)
    t_dead = time.monotonic()
    c.probe_until_online("an online check-in after the automatic failover", 120)
    c.mark("auto failover: primary's host powered off to an online check-in (RTO)", t_dead)
    status = wait_for("a new primary in `server status`", lambda: (st := c.status())["primary"] != "standby-p0-node-3"
                      and st, 60, diagnose=c.diagnose)
    assert status["primary"] in {"primary-p0", "standby-p0-node-2"}, status


def test_head_lost_for_good_new_cluster_from_a_survivor(cluster: Cluster, hosts: Hosts, wheel) -> None:
    """The head's host never comes back: GCS, control's topology and the head's member are gone.
    As docs/operations.md says: `ray stop` and `vigocli server adopt --check` on each survivor,
    adopt the newest (node-2: node-3 was off since the automatic failover; in synchronous mode
    node-2 acknowledged every report), `ray up` a cluster.yaml whose head is node-2. The
    envoys keep their identities, flush what they queued, and nothing acknowledged is lost."""
    c = cluster
    hosts.kill(HEAD)
    t_dead = time.monotonic()
    hosts.start(3)  # back, without Ray: the new cluster's worker
    data_dir = "/var/lib/vigo/p0"
    checks = {}
    for i in WORKERS:
        c.on(i, "ray stop >/dev/null 2>&1; true", timeout=120)
        checks[i] = json.loads(c.on(i, f"vigocli server adopt --check --json --data-dir {data_dir}").stdout)
    assert checks[2]["complete"], checks
    if checks[2]["committed_at"] and checks[3]["committed_at"]:
        assert checks[2]["committed_at"] >= checks[3]["committed_at"], checks
    adopted = json.loads(c.on(2, f"vigocli server adopt --json --data-dir {data_dir}").stdout)
    assert adopted["term"] > max(ch["term"] for ch in checks.values()), (adopted, checks)
    c.mark("head lost for good: power-off to a survivor adopted (operator-paced)", t_dead)

    new_head, new_workers = hosts.host(2), [hosts.host(3)]
    op_home = hosts.host(OPERATOR).home
    (op_home / "server.yaml").write_text(
        yaml.safe_dump(payload.server_yaml_for_test(standbys=[w.name for w in new_workers]), sort_keys=False))
    config = payload.cluster_config(new_head, new_workers, key_path=KEY, dist_dir=wheel.parent,
                                    server_yaml="~/server.yaml")
    (op_home / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for path in (op_home / "cluster.yaml", op_home / "server.yaml"):
        os.chown(path, UID, UID)
    c.head, c.workers, c.dashboard = new_head, new_workers, f"http://{new_head.addr}:8265"
    t = time.monotonic()
    up = c.op("ray up -y ~/cluster.yaml 2>&1", timeout=420, check=False)
    assert up.returncode == 0, f"ray up of the new cluster failed:\n{clean(up.stdout)}\n{c.diagnose()}"
    status = wait_for("the new cluster serving from the adopted data dir",
                      lambda: c.serving({new_head.addr, *(w.addr for w in new_workers)}, {"standby-p0-node-3"},
                                        primary="primary-p0"), 300, diagnose=c.diagnose)
    c.mark("head lost for good: ray up of the new cluster to serving", t)
    assert status["ca_fingerprint"] == c.fingerprint and status["term"] == adopted["term"], status
    assert status["envoys"] == len(ENVOYS), status
    c.probe_until_online("an online check-in on the new cluster", 120)
    c.mark("head lost for good: power-off to an online check-in (operator-paced)", t_dead)


def test_ray_down_leaves_nothing(cluster: Cluster, hosts: Hosts) -> None:
    """Stop the daemon, flush what it queued: the server holds each of its runs exactly once.
    Then ray down and `ray stop` on each worker (docs/deploying.md): no Ray process anywhere."""
    c = cluster
    hosts.run(DAEMON_HOST, f"kill -TERM $(cat {DAEMON_PID})", user="root")
    wait_for("the daemon exited", lambda: "daemon stopped after" in c.daemon_log(), 60, every_s=0.5,
             diagnose=c.diagnose)
    made = int(re.search(r"daemon stopped after (\d+) run", c.daemon_log()).group(1))
    final = c.envoy_once(DAEMON_HOST)  # flushes whatever the daemon still had queued
    assert final.get("flushed") and not final.get("offline"), final
    stored = c.run_count(DAEMON_HOST) - c.daemon_runs_before
    c.marks["daemon runs made (+1 final run --once)"] = made + 1
    c.marks["daemon runs stored by the server"] = stored
    assert stored == made + 1, f"the daemon made {made} runs and one more --once; the server stored {stored}"
    runs = c.vigocli(f"envoys show {c.envoy_ids[DAEMON_HOST]} --runs {made + 10}")["runs"]
    ids = [r["run_id"] for r in runs]
    assert len(ids) == len(set(ids)), "a run id stored twice"

    t = time.monotonic()
    c.op("ray down -y ~/cluster.yaml 2>&1", timeout=180)
    c.mark("ray down", t)

    def leftovers(i: int) -> list[str]:
        return [p for p in hosts.processes(i)
                if RAY_PROCESS.search(args := p.split(None, 2)[2]) and not args.startswith("sshd")]

    head, workers = c.head.index, [w.index for w in c.workers]
    assert wait_for("no Ray process on the head", lambda: not leftovers(head) or None, 30, every_s=1,
                    diagnose=lambda: "\n".join(leftovers(head))) is True
    # `ray down` with provider `local` stops the head only (Ray's teardown_cluster); the
    # workers' raylets would wait RAY_gcs_rpc_server_reconnect_timeout_s for it. The docs say
    # to `ray stop` each worker, as here.
    ssh = f"ssh -i {KEY} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"
    stops = " & ".join(f"{ssh} vigo@{hosts.host(i).addr} '~/vigo/venv/bin/ray stop' >/dev/null 2>&1"
                       for i in workers)
    t = time.monotonic()
    c.op(f"{stops} & wait", timeout=120)
    c.mark("ray stop on the workers", t)
    for i in workers:
        assert wait_for(f"no Ray process on {hosts.host(i)}", lambda i=i: not leftovers(i) or None, 30, every_s=1,
                        diagnose=lambda i=i: "\n".join(leftovers(i))) is True
