"""What the namespaced hosts run: the vigo-fleet wheel, venvs prepared from outside, and the
cluster config for `ray up`, generated from the repository's cluster.yaml.

Hosts have no route to any package index, as a locked-down data centre would not. So every
host gets ``~/vigo/venv`` already holding the pinned dependencies (requirements/*.txt,
installed here with ``--require-hashes`` from the index this machine reaches), and
cluster.yaml's ``setup_commands`` find them satisfied and install only the wheel that
``file_mounts`` carries. The venv is built once per lock file in a private mount namespace
where ``/home`` is the template's own directory, so its paths are the hosts' paths
(``/home/vigo/vigo/venv``); each host then gets a hard-linked copy (``cp -al``: seconds, no
space; made outside the host's bind mounts, which hard links cannot cross). The template lives
in ``ROOT/cache`` and is reused until its lock file changes (``down`` keeps it).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.hosts.netns import HOME, ROOT, UID, Host, HostError, Hosts, sh

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
SERVER_YAML = REPO / "deploy" / "server.yaml"
#: cluster.yaml's ``~/vigo/venv`` for ssh_user vigo, as every host sees it.
HOST_VENV = f"{HOME}/vigo/venv"
#: The interpreter docs/deploying.md asks of every host (Debian's).
HOST_PYTHON = "/usr/bin/python3.11"
VENV_BUILD_TIMEOUT_S = 1800
#: What the generated cluster config may change in cluster.yaml, and why.
ALLOWED_DIFFERENCES = {
    "provider.head_ip": "the namespaced head's address",
    "provider.worker_ips": "the namespaced workers' addresses",
    "auth.ssh_user": "the hosts' account",
    "auth.ssh_private_key": "the harness's key",
    "file_mounts.~/vigo/dist": "the wheel built for this test",
    "file_mounts.~/vigo/server.yaml": "the test's server.yaml (see KNOWN_BUGS in test_ray_up.py)",
}


def build_wheel(out_dir: Path) -> Path:
    """The vigo-fleet wheel of this checkout, alone in ``out_dir`` (scripts/build-wheel)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(REPO / "scripts" / "build-wheel"), str(out_dir)], capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    if proc.returncode != 0:
        raise HostError(f"scripts/build-wheel failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    wheel = Path(proc.stdout.strip().splitlines()[-1])
    assert wheel.is_file() and wheel.parent == out_dir.resolve(), proc.stdout
    out_dir.chmod(0o755)
    return wheel


def lock_file(kind: str) -> Path:
    """requirements/server.txt or requirements/envoy.txt (scripts/lock)."""
    path = REPO / "requirements" / f"{kind}.txt"
    if not path.is_file():
        raise HostError(f"{path} is missing: run scripts/lock")
    return path


def template_venv(kind: str, root: Path = ROOT) -> Path:
    """A venv at the hosts' path holding ``requirements/{kind}.txt``, built once per lock file;
    returns its directory as seen from outside."""
    lock = lock_file(kind)
    key = hashlib.sha256(lock.read_bytes() + HOST_PYTHON.encode() + _python_version().encode()).hexdigest()[:16]
    tpl = root / "cache" / f"venv-{kind}-{key}"
    venv = tpl / "home" / HOME.removeprefix("/home/") / "vigo" / "venv"
    if (tpl / "complete").exists():
        return venv
    for old in (root / "cache").glob(f"venv-{kind}-*"):
        shutil.rmtree(old)
    (tpl / "home").mkdir(parents=True)
    # /home of this private mount namespace is the template's: the venv's absolute paths
    # (pyvenv.cfg, script shebangs) come out as every host will see them.
    script = (f"mount --bind {tpl / 'home'} /home && {HOST_PYTHON} -m venv {HOST_VENV} && "
              f"{HOST_VENV}/bin/pip install --quiet --disable-pip-version-check --require-hashes -r {lock}")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                          capture_output=True, text=True, timeout=VENV_BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        raise HostError(f"building the {kind} venv from {lock} failed:\n{proc.stdout[-4000:]}{proc.stderr[-4000:]}")
    sh("chown", "-R", f"{UID}:{UID}", tpl / "home")
    (tpl / "complete").write_text(f"{lock}\n")
    return venv


def _python_version() -> str:
    return sh(HOST_PYTHON, "-c", "import sys; print(sys.version)").stdout


def install_venv(hosts: Hosts, h: Host, kind: str, wheel: Path | None = None) -> None:
    """Give ``h`` its ``~/vigo/venv`` (hard links to the template); with ``wheel``, also
    install vigo-fleet in it, as an operator or an envoy host would (no index: --no-deps)."""
    template = template_venv(kind, hosts.root)
    dest = h.home / "vigo" / "venv"
    dest.parent.mkdir(parents=True, exist_ok=True)
    sh("chown", f"{UID}:{UID}", dest.parent)
    if dest.exists():
        shutil.rmtree(dest)
    sh("cp", "-al", template, dest)
    if wheel is not None:
        hosts.run(h, f"{HOST_VENV}/bin/pip install --quiet --no-deps {wheel}", timeout=300)


# --- the cluster config ---------------------------------------------------------------------


def server_yaml_for_test(*, standbys: list[str] | None) -> dict[str, Any]:
    """deploy/server.yaml with the changes a test on namespaced hosts needs: no archive (no
    S3 is reachable; the shipped URL is a placeholder) and, when ``standbys`` is not None,
    those standbys instead of the shipped ones."""
    cfg = yaml.safe_load(SERVER_YAML.read_text())
    cfg["archive"]["url"] = ""
    if standbys is not None:
        cfg["replication"]["standbys"] = standbys
    return cfg


def cluster_config(head: Host, workers: list[Host], *, key_path: str, dist_dir: Path,
                   server_yaml: str | None) -> dict[str, Any]:
    """cluster.yaml with this cluster's addresses, the harness's account and key, the wheel's
    directory and (if given) another server.yaml; nothing else differs (checked)."""
    cfg = yaml.safe_load(CLUSTER_YAML.read_text())
    cfg["provider"]["head_ip"] = head.addr
    cfg["provider"]["worker_ips"] = [w.addr for w in workers]
    cfg["auth"]["ssh_user"] = "vigo"
    cfg["auth"]["ssh_private_key"] = key_path
    mounts = cfg["file_mounts"]
    if "~/vigo/dist" not in mounts:
        raise HostError(f"cluster.yaml's file_mounts carry no ~/vigo/dist (the wheel): {sorted(mounts)}")
    mounts["~/vigo/dist"] = str(dist_dir)
    if server_yaml is not None:
        mounts["~/vigo/server.yaml"] = server_yaml
    extra = set(differences(yaml.safe_load(CLUSTER_YAML.read_text()), cfg)) - set(ALLOWED_DIFFERENCES)
    assert not extra, f"the test config differs from cluster.yaml beyond what it must: {sorted(extra)}"
    return cfg


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Dotted paths where two YAML documents differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b), key=str):
            out += differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [path]
