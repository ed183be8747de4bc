"""A simulated multi-node Ray cluster on this machine for failover tests and benchmarks.

``ray.cluster_utils.Cluster`` starts a head and extra raylets; each node carries a
``vigo-host`` label, so vigo's actors are pinned exactly as on real hosts. "Killing a host"
SIGKILLs the vigo actor processes on it and removes its raylet without a graceful shutdown;
"bringing it back" adds a raylet with the same label (Ray restarts the pinned actors there, on
the same data dir: hosts here share one disk, so data dirs are ``ROOT/{host}``).

Health checks are tuned as docs/operations.md recommends for fast failover (1 s x 3).

With ``node_ips=True`` every non-head node gets an address of its own on loopback
(127.0.0.11, .12, ...; Linux routes all of 127/8 to lo), so gateways configured with
``listen.host: node-ip`` can run on every node at once, each on its own address and the same
port, as on real hosts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from tests.devserver import free_port
from vigo.actors.deploy import deploy
from vigo.actors.runtime import NAMESPACE
from vigo.config import ServerConfig

HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                 "health_check_initial_delay_ms": 0}
BIN = Path(sys.executable).parent


class SimCluster:
    def __init__(self, root: Path, hosts: tuple[str, ...] = ("a", "b", "c"), *, node_ips: bool = False) -> None:
        self.root = root
        self.hosts = hosts
        self.nodes: dict[str, Any] = {}
        self.cluster: Cluster | None = None
        self.port = free_port()
        self.node_ips = node_ips
        self._ips: dict[str, str] = {}

    def node_args(self, host: str) -> dict[str, Any]:
        """``add_node`` arguments of the node labelled ``host`` (the same address each time)."""
        args: dict[str, Any] = {"num_cpus": 2, "labels": {"vigo-host": host}}
        if self.node_ips:
            args["node_ip_address"] = self._ips.setdefault(host, f"127.0.0.{11 + len(self._ips)}")
        return args

    def start(self) -> SimCluster:
        self.cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": 2, "labels": {"vigo-host": "head"}, "include_dashboard": False,
            "_system_config": HEALTH_CHECKS})
        for host in self.hosts:
            self.nodes[host] = self.cluster.add_node(**self.node_args(host))
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        return self

    def config(self, **replication: Any) -> ServerConfig:
        cfg = ServerConfig.local(str(self.root / "{host}"), self.port)
        cfg.archive.url = ""
        for key, value in replication.items():
            setattr(cfg.replication, key, value)
        return cfg

    def deploy(self, cfg: ServerConfig, primary_host: str = "a") -> dict[str, Any]:
        return self._with_free_port(cfg, lambda: deploy(cfg, host=primary_host, control_host="head",
                                                        gateway_hosts=["head"], control_dir=str(self.root / "control")))

    def deploy_spanner(self, cfg: ServerConfig) -> dict[str, Any]:
        from vigo.actors.deploy import deploy_spanner

        return self._with_free_port(cfg, lambda: deploy_spanner(cfg, control_host="head", gateway_hosts=["head"],
                                                                control_dir=str(self.root / "control")))

    def _with_free_port(self, cfg: ServerConfig, run) -> dict[str, Any]:
        """Deploy on a port picked just before; if a Ray process took it meanwhile (the gateway
        cannot bind), pick another and deploy again (deploy is idempotent)."""
        from vigo.errors import ConfigError

        for attempt in range(3):
            self.port = cfg.listen.port = free_port()
            try:
                return run()
            except ConfigError as exc:
                if "did not start on port" not in str(exc) or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def gateway_admin(self, op: str, args: dict[str, Any] | None = None) -> Any:
        answer = ray.get(self.actor("gateway-head").admin.remote(op, args or {}), timeout=60)
        if "error" in answer:
            raise AssertionError(f"admin {op} failed: {answer['error']}")
        return answer["ok"]

    def actor(self, name: str) -> Any:
        return ray.get_actor(name, namespace=NAMESPACE)

    def control(self) -> Any:
        return self.actor("control")

    def route(self, partition: str = "p0") -> dict[str, Any]:
        return ray.get(self.control().route.remote(partition), timeout=30)

    def primary(self, partition: str = "p0") -> Any:
        return self.actor(self.route(partition)["primary"])

    def admin(self, op: str, args: dict[str, Any] | None = None, partition: str = "p0") -> Any:
        answer = ray.get(self.primary(partition).admin.remote(op, args or {}), timeout=60)
        if "error" in answer:
            raise AssertionError(f"admin {op} failed: {answer['error']}")
        return answer["ok"]

    def members_on(self, host: str) -> list[str]:
        topology = ray.get(self.control().get_topology.remote(), timeout=30)
        return [name for entry in topology["partitions"].values()
                for name, member_host in entry.get("hosts", {}).items() if member_host == host]

    def kill_host(self, host: str) -> float:
        """SIGKILL the vigo members on ``host`` and drop its raylet; returns the kill time."""
        for name in self.members_on(host):
            try:
                pid = ray.get(self.actor(name).ping.remote(), timeout=10)["pid"]
                os.kill(pid, signal.SIGKILL)
            except Exception:
                pass
        killed_at = time.time()
        self.cluster.remove_node(self.nodes.pop(host), allow_graceful=False)
        return killed_at

    def restore_host(self, host: str) -> None:
        """Add the node labelled ``host``: one that was killed, or one that joins for the first time."""
        self.nodes[host] = self.cluster.add_node(**self.node_args(host))
        self.cluster.wait_for_nodes()

    def wait(self, what: str, predicate, timeout_s: float = 60.0, every_s: float = 0.2) -> Any:
        deadline = time.monotonic() + timeout_s
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = predicate()
                if last:
                    return last
            except Exception as exc:  # members restarting answer with errors for a while
                last = exc
            time.sleep(every_s)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")

    def replication(self, partition: str = "p0") -> dict[str, Any]:
        return self.admin("status", partition=partition)["replication"]

    def all_in_sync(self, partition: str = "p0") -> bool:
        rep = self.replication(partition)
        return bool(rep["standbys"]) and all(s["in_sync"] for s in rep["standbys"])

    def shutdown(self) -> None:
        try:
            ray.shutdown()
        finally:
            if self.cluster is not None:
                self.cluster.shutdown()


# --- real envoys (subprocesses) ----------------------------------------------------------------

def envoy(*args: Any, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([str(BIN / "vigo-envoy"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def join_envoy(base: Path, server: str, token: str) -> dict[str, Path | str]:
    state, root, traits = base / "state", base / "root", base / "traits.d"
    traits.mkdir(parents=True, exist_ok=True)
    (traits / "roles.yaml").write_text("roles: [web]\n")
    proc = envoy("join", "--server", server, "--token", token, "--state-dir", state, "--json")
    assert proc.returncode == 0, proc.stderr
    return {"id": json.loads(proc.stdout)["envoy_id"], "state": state, "root": root, "traits": traits}


def run_envoy_once(e: dict[str, Any]) -> dict[str, Any]:
    proc = envoy("run", "--once", "--state-dir", e["state"], "--root", e["root"], "--traits-dir", e["traits"], "--json")
    out = json.loads(proc.stdout) if proc.stdout.strip() else {}
    out["exit_code"] = proc.returncode
    out["stderr"] = proc.stderr[-2000:]
    return out


def envoy_status(e: dict[str, Any]) -> dict[str, Any]:
    proc = envoy("status", "--state-dir", e["state"], "--json")
    return json.loads(proc.stdout)
