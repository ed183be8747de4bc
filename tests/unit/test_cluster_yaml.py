"""cluster.yaml and deploy/server.yaml, checked offline.

cluster.yaml goes through the validator `ray up` itself runs (``_bootstrap_config`` in
``ray.autoscaler._private.commands``): ``prepare_config`` fills in the local provider's
defaults, then ``validate_config`` checks the result against ``ray-schema.json``. For the local
provider the steps `ray up` runs in between (``fillout_available_node_types_resources``,
``bootstrap_config``) return the config unchanged, and nothing here opens an SSH connection.

What Ray's validator catches, found by these tests (Ray 2.60):
- an unknown top-level or ``auth`` key: ``jsonschema.ValidationError`` (additionalProperties);
- a missing ``head_ip``/``worker_ips`` or a present ``available_node_types``: ``prepare_config``
  calls ``cli_logger.abort``, a ``click.ClickException``;
- NOT an unknown key inside ``provider``: its schema allows additional properties, so a
  ``worker_ipz`` next to ``worker_ips`` passes. ``test_provider_keys_are_ones_the_local_provider_reads``
  covers that gap.
"""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("ray", reason="cluster.yaml checks need the server extras (Ray)")

import click  # Ray's dependencies, as is jsonschema: nothing extra to install
import jsonschema
from ray.autoscaler._private.util import prepare_config, validate_config

from vigo import config as config_mod

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
SERVER_YAML = REPO / "deploy" / "server.yaml"

#: Keys Ray's local provider reads (``ray/autoscaler/_private/local/``).
LOCAL_PROVIDER_KEYS = {"type", "head_ip", "worker_ips", "external_head_ip", "coordinator_address"}
HOST_LABEL = '--labels="vigo-host=$(hostname)"'


def _raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does to a cluster config before it connects to any host."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _ray_start(commands: list[str]) -> str:
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, commands
    return starts[0]


# --- Ray's validator ---------------------------------------------------------------------------


def test_cluster_yaml_passes_rays_validator() -> None:
    prepared = ray_up_validate(_raw())
    assert prepared["provider"]["type"] == "local"
    # The local provider turns worker_ips into one node type that keeps every worker.
    (node_type,) = prepared["available_node_types"].values()
    workers = len(prepared["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == workers == 2


def test_placeholder_addresses_are_documentation_addresses() -> None:
    provider = _raw()["provider"]
    hosts = [provider["head_ip"], *provider["worker_ips"]]
    assert hosts == ["192.0.2.10", "192.0.2.11", "192.0.2.12"]  # RFC 5737 TEST-NET-1
    assert len(set(hosts)) == len(hosts)  # local cluster state is keyed by address


def test_misspelt_top_level_key_fails_with_a_schema_error() -> None:
    config = _raw()
    config["worker_ipz"] = config["provider"]["worker_ips"]
    with pytest.raises(jsonschema.ValidationError, match="'worker_ipz' was unexpected"):
        ray_up_validate(config)


def test_misspelt_auth_key_fails_with_a_schema_error() -> None:
    config = _raw()
    config["auth"]["ssh_usr"] = config["auth"].pop("ssh_user")
    with pytest.raises(jsonschema.ValidationError, match="'ssh_usr' was unexpected"):
        ray_up_validate(config)


def test_misspelt_command_list_fails_with_a_schema_error() -> None:
    config = _raw()
    config["head_start_ray_command"] = config.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="'head_start_ray_command' was unexpected"):
        ray_up_validate(config)


def test_missing_worker_ips_fails_with_a_click_exception() -> None:
    config = _raw()
    config["provider"]["worker_ipz"] = config["provider"].pop("worker_ips")
    with pytest.raises(click.ClickException, match="worker_ips"):
        ray_up_validate(config)


def test_node_types_are_refused_for_the_local_provider() -> None:
    config = _raw()
    config["available_node_types"] = {"worker": {"node_config": {}, "resources": {}}}
    with pytest.raises(click.ClickException, match="available_node_types"):
        ray_up_validate(config)


def test_ray_accepts_unknown_provider_keys() -> None:
    # Documents the gap in Ray's schema (provider allows additional properties); if a later
    # Ray rejects this, the test below becomes redundant.
    config = _raw()
    config["provider"]["worker_ipz"] = ["192.0.2.13"]
    ray_up_validate(config)


def test_provider_keys_are_ones_the_local_provider_reads() -> None:
    unknown = set(_raw()["provider"]) - LOCAL_PROVIDER_KEYS
    assert not unknown, f"provider keys Ray's local provider ignores: {sorted(unknown)}"


# --- what vigo depends on ------------------------------------------------------------------


def test_token_auth_on_every_node() -> None:
    config = _raw()
    # Ray's token, the same file on every node...
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # ... and token mode in every shell (initialization_commands run on every node) ...
    assert any("export RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])
    # ... and on the ray start commands themselves.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token " in _ray_start(config[key]), key


def test_every_node_is_labelled_with_its_hostname() -> None:
    config = _raw()
    assert HOST_LABEL in _ray_start(config["head_start_ray_commands"])
    assert HOST_LABEL in _ray_start(config["worker_start_ray_commands"])


def test_head_persists_gcs_in_rocksdb_and_serves_the_dashboard() -> None:
    head = _ray_start(_raw()["head_start_ray_commands"])
    words = shlex.split(head.split(";", 1)[1])
    assert "RAY_gcs_storage=rocksdb" in words
    assert "RAY_gcs_storage_path=/var/lib/vigo/gcs" in words
    # The launcher's own flags must survive our edits: without --autoscaling-config the head
    # never starts the workers.
    for flag in ("--head", "--port=6379", "--autoscaling-config=~/ray_bootstrap_config.yaml",
                 "--dashboard-host=0.0.0.0", "--dashboard-port=8265"):
        assert flag in words, flag


def test_workers_join_the_head() -> None:
    worker = _ray_start(_raw()["worker_start_ray_commands"])
    assert "--address=$RAY_HEAD_IP:6379" in worker  # RAY_HEAD_IP is exported by the autoscaler


def test_start_commands_stop_ray_first() -> None:
    # `ray start` refuses to run where Ray already runs, so a second `ray up` needs this.
    config = _raw()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert config[key][0] == "ray stop", key


def test_head_deploys_vigo_after_ray_starts() -> None:
    commands = _raw()["head_start_ray_commands"]
    start = commands.index(_ray_start(commands))
    deploy = [i for i, c in enumerate(commands) if c.startswith("vigocli server deploy")]
    assert deploy and deploy[0] > start
    words = shlex.split(commands[deploy[0]])
    config_path = words[words.index("--config") + 1]
    assert _raw()["file_mounts"][config_path] == "deploy/server.yaml"


def _pip_installs() -> list[list[str]]:
    """Every `pip install` in setup_commands, as words (one command may hold several)."""
    installs = []
    for command in _raw()["setup_commands"]:
        for part in command.split(";"):
            words = shlex.split(part)
            if len(words) > 1 and words[0].endswith("/pip") and words[1] == "install":
                installs.append(words)
    return installs


def test_server_dependencies_install_hash_checked_from_the_lock() -> None:
    mounts = _raw()["file_mounts"]
    (deps,) = [w for w in _pip_installs() if "--require-hashes" in w]
    lock = deps[deps.index("-r") + 1]
    # ~/vigo/requirements/server.txt is requirements/server.txt carried by file_mounts.
    remote_dir, file_name = lock.rsplit("/", 1)
    assert mounts[remote_dir] == "requirements" and file_name == "server.txt"
    assert (REPO / "requirements" / file_name).is_file()


def test_vigo_installs_from_the_carried_wheel_never_from_an_index() -> None:
    mounts = _raw()["file_mounts"]
    (wheel,) = [w for w in _pip_installs() if "--require-hashes" not in w]
    assert "--no-deps" in wheel  # every dependency came from the hash-checked lock
    (target,) = [w for w in wheel[2:] if not w.startswith("-")]
    remote_dir, pattern = target.rsplit("/", 1)
    assert mounts[remote_dir] == "dist"  # where scripts/build-wheel writes the wheel
    assert pattern == "vigo_fleet-*.whl"
    # The distribution `vigo` on the public index is an unrelated project.
    for words in _pip_installs():
        assert not any(w == "vigo" or w.startswith(("vigo[", "vigo==")) for w in words), words


def test_header_says_how_to_run_ray_up() -> None:
    # Ray >= 2.50's autoscaler v2 never starts a local provider's workers; v1 does.
    header = CLUSTER_YAML.read_text().split("\ncluster_name:", 1)[0]
    assert "RAY_UP_enable_autoscaler_v2=0 ray up cluster.yaml" in header
    assert "scripts/build-wheel" in header
    assert "never as root" in header


def test_file_mount_sources_exist() -> None:
    for remote, local in _raw()["file_mounts"].items():
        if local.startswith("~"):  # the token lives in the operator's home, not the repo
            continue
        if local == "dist":  # built by scripts/build-wheel before `ray up`, not committed
            assert (REPO / "scripts" / "build-wheel").is_file()
            continue
        assert (REPO / local).exists(), f"{remote}: {local}"


# --- deploy/server.yaml ----------------------------------------------------------------------


def test_server_yaml_loads() -> None:
    cfg = config_mod.load(SERVER_YAML)
    assert isinstance(cfg, config_mod.ServerConfig)
    assert cfg.listen.port == 7700


def test_server_yaml_round_trips() -> None:
    cfg = config_mod.load(SERVER_YAML)
    assert config_mod.from_dict(yaml.safe_load(config_mod.dump(cfg))) == cfg


def test_server_yaml_sets_every_key() -> None:
    # A complete example: a setting added to vigo/config.py must be added here too.
    raw = yaml.safe_load(SERVER_YAML.read_text())
    cfg = config_mod.ServerConfig.default().to_dict()
    assert raw.keys() == cfg.keys()
    for key, value in cfg.items():
        if isinstance(value, dict):
            assert raw[key].keys() == value.keys(), key


def test_server_yaml_fits_cluster_yaml() -> None:
    cfg = config_mod.load(SERVER_YAML)
    head = _ray_start(_raw()["head_start_ray_commands"])
    gcs_path = next(w.split("=", 1)[1] for w in head.split() if w.startswith("RAY_gcs_storage_path="))
    data_dir, gcs = Path(cfg.data_dir), Path(gcs_path)
    # Both live below the directory setup_commands create on every host (a standby on a worker
    # keeps its copy in the same data_dir), and neither inside the other.
    assert any("/var/lib/vigo" in c for c in _raw()["setup_commands"])
    assert "head_setup_commands" not in _raw()
    assert data_dir.parent == gcs.parent == Path("/var/lib/vigo")
    assert data_dir != gcs
    # gateway.max_connections sockets need more than the usual 1024 open files.
    assert cfg.gateway.max_connections > 1024
    assert 'ulimit -n "$(ulimit -Hn)"' in head
