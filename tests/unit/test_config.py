"""Settings declared once (vigo/fields.py): server.yaml and envoy.yaml read by one engine, their
docs held to the declarations, and the refusals worded as they always were."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from vigo import config, fields
from vigo.agent.config import EnvoyConfig, load_config
from vigo.errors import ConfigError
from vigo.fields import field, section

DOCS = Path(__file__).resolve().parents[2] / "docs"
SERVER = fields.specs(config.ServerConfig)


def _documented_settings() -> dict[str, tuple[str, str]]:
    """docs/configuration.md's table: key -> (default cell, allowed cell)."""
    rows = {}
    for line in (DOCS / "configuration.md").read_text().splitlines():
        if re.match(r"\| `[\w.]+` \|", line):
            key, default, _unit, allowed, _meaning = (c.strip() for c in line.strip().strip("|").split("|"))
            rows[key.strip("`")] = (default, allowed)
    return rows


def test_every_setting_is_documented_and_nothing_else():
    assert set(_documented_settings()) == set(SERVER)


@pytest.mark.parametrize("key", sorted(SERVER))
def test_the_documented_default_and_range_are_the_declared_ones(key):
    default_cell, allowed_cell = _documented_settings()[key]
    declared, spec = SERVER[key]
    documented = yaml.safe_load(re.match(r"`([^`]*)`", default_cell).group(1))  # `300` (dev: 30) -> 300
    assert documented == declared and type(documented) in (type(declared), int), (key, default_cell)
    assert allowed_cell == (spec.allowed() if spec.min is not None or spec.max is not None else "")


@pytest.mark.parametrize(("cls", "settings"), [(config.ServerConfig, SERVER),
                                               (EnvoyConfig, fields.specs(EnvoyConfig))])
def test_declared_defaults_lie_in_their_declared_ranges(cls, settings):
    for key, (default, spec) in settings.items():
        assert default is None or spec.allows(default), key
    assert config.from_dict(config.ServerConfig().to_dict()) == config.ServerConfig()


@pytest.mark.parametrize(("data", "message"), [
    ({"gateway": {"batch_max": 0}}, "gateway.batch_max: 0 is out of range (allowed 1..100000)"),  # the docs' example
    ({"checkin": {"interval_s": 0}}, "checkin.interval_s: 0.0 is out of range (allowed >= 1)"),
    ({"archive": {"spool_max_bytes": 5}}, "archive.spool_max_bytes: 5 is out of range (allowed >= 1048576)"),
    ({"gateway": {"batch_max": "many"}}, "gateway.batch_max: expected a whole number, got 'many'"),
    ({"gateway": {"batch_max": 2.5}}, "gateway.batch_max: expected a whole number, got 2.5"),
    ({"gateway": {"retry_after_s": True}}, "gateway.retry_after_s: expected a number, got True"),
    ({"replication": {"auto_failover": "yes"}}, "replication.auto_failover: expected true or false, got 'yes'"),
    ({"listen": {"host": 7}}, "listen.host: expected a string, got 7"),
    ({"spanner": {"bolts": ["a", ""]}}, "spanner.bolts: expected a list of names, got ['a', '']"),
    ({"gateway": {"batch": 1}}, "gateway.batch: unknown setting (expected one of batch_max, batch_wait_ms,"),
    ({"listn": {}}, "listn: unknown setting (expected one of admissions, archive, checkin, console, data_dir,"),
    (["a"], "server.yaml: expected a mapping, got list"),
    # unknown keys first, then kinds in the file's order, then ranges in declaration order
    ({"gateway": {"batch_max": 0, "queue_max": "x"}}, "gateway.queue_max: expected a whole number"),
    ({"gateway": {"queue_max": 0, "batch_max": 0}}, "gateway.batch_max: 0 is out of range"),
])
def test_server_yaml_refusals_name_the_key_the_form_and_the_value(data, message):
    with pytest.raises(ConfigError) as info:
        config.from_dict(data)
    assert str(info.value).startswith(message)


def test_values_are_converted_and_sections_may_be_empty():
    cfg = config.from_dict({"checkin": {"interval_s": 60}, "listen": None,
                            "replication": {"standbys": ["b", "c"]}})
    assert cfg.checkin.interval_s == 60.0 and isinstance(cfg.checkin.interval_s, float)
    assert cfg.listen == config.ListenConfig() and cfg.replication.standbys == ["b", "c"]
    assert config.ServerConfig().replication.standbys is not config.ServerConfig().replication.standbys


def test_the_documented_envoy_yaml_example_names_every_setting_and_loads(tmp_path: Path):
    text = (DOCS / "envoy.md").read_text()
    example = re.search(r"### Local config file.*?```yaml\n(.*?)```", text, re.S).group(1)
    assert set(yaml.safe_load(example)) == set(fields.specs(EnvoyConfig))
    path = tmp_path / "envoy.yaml"
    path.write_text(example)
    cfg = load_config(path, required=True)
    assert cfg.servers == ["gw1.example.com:7700", "gw2.example.com:7700"] and cfg.root == Path("/")


def test_envoy_yaml_null_means_unset(tmp_path: Path):
    path = tmp_path / "envoy.yaml"
    path.write_text("keepalive_s: null\ninterval_s:\nservers: ' gw:1 '\n")
    cfg = load_config(path, required=True)
    assert cfg == EnvoyConfig(servers=["gw:1"])


def test_a_kind_refusal_of_its_own_is_prefixed_with_the_key(tmp_path: Path):
    path = tmp_path / "envoy.yaml"
    path.write_text("servers: [gw:1, 'gw:99999']\n")
    with pytest.raises(ConfigError, match=r"envoy\.yaml: servers: server port must be 1\.\.65535, got 99999"):
        load_config(path, required=True)


@dataclass
class Odd:
    when: complex = 1j


@dataclass
class Inner:
    level: int = field(3, max=5)


@dataclass
class Outer:
    names: list[str] = field([])
    inner: Inner = section(Inner)


def test_a_field_without_a_kind_is_refused_when_first_read():
    with pytest.raises(TypeError, match=r"Odd\.when: no kind"):
        fields.from_mapping(Odd, {})


def test_the_engine_on_a_small_declaration():
    assert fields.from_mapping(Outer, {"inner": {"level": 5}}) == Outer(inner=Inner(5))
    with pytest.raises(ConfigError, match=r"^inner\.level: 6 is out of range \(allowed <= 5\)$"):
        fields.from_mapping(Outer, {"inner": {"level": 6}})
    assert set(fields.specs(Outer)) == {"names", "inner.level"}
