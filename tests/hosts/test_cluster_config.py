"""The cluster config the host tests give `ray up`, checked offline (no root, no hosts): it is
cluster.yaml with only what must differ changed, and it passes Ray's own validator."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from tests.hosts import payload
from tests.hosts.netns import Host

pytest.importorskip("ray", reason="the cluster config check needs the server extras (Ray)")

from ray.autoscaler._private.util import prepare_config, validate_config


def _config(root: Path) -> dict:
    head, workers = Host(1, root), [Host(2, root), Host(3, root)]
    return payload.cluster_config(head, workers, key_path="~/.ssh/vigo-cluster", dist_dir=root / "dist",
                                  server_yaml="~/server.yaml")


def test_generated_config_differs_from_cluster_yaml_only_where_it_must(tmp_path: Path) -> None:
    config = _config(tmp_path)
    original = yaml.safe_load(payload.CLUSTER_YAML.read_text())
    changed = set(payload.differences(original, config))
    assert changed <= set(payload.ALLOWED_DIFFERENCES), changed
    assert config["provider"]["head_ip"] == "10.231.0.11"
    assert config["provider"]["worker_ips"] == ["10.231.0.12", "10.231.0.13"]
    # The commands run on the hosts are cluster.yaml's, word for word.
    for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert config.get(key) == original.get(key), key


def test_generated_config_passes_rays_validator(tmp_path: Path) -> None:
    prepared = prepare_config(copy.deepcopy(_config(tmp_path)))
    validate_config(prepared)


def test_differences_names_dotted_paths() -> None:
    a = {"provider": {"head_ip": "x", "worker_ips": [1]}, "auth": {"ssh_user": "u"}}
    b = {"provider": {"head_ip": "y", "worker_ips": [1]}, "auth": {"ssh_user": "u"}, "extra": 1}
    assert payload.differences(a, b) == ["extra", "provider.head_ip"]


def test_test_server_yaml_drops_archive_and_sets_standbys() -> None:
    cfg = payload.server_yaml_for_test(standbys=[])
    assert cfg["archive"]["url"] == "" and cfg["replication"]["standbys"] == []
    shipped = yaml.safe_load(payload.SERVER_YAML.read_text())
    assert payload.server_yaml_for_test(standbys=None)["replication"] == shipped["replication"]
