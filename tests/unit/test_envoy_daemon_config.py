"""The daemon's local config file, flag precedence, and the server's view of an envoy that
enforces from its cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from vigo.agent.config import (
    DEFAULT_CONFIG_PATH,
    EnvoyConfig,
    config_path,
    load_config,
    with_overrides,
)
from vigo.errors import ConfigError
from vigo.server.fleet import CONVERGED, FROM_CACHE, OFFLINE, derive_status


def test_a_full_config_file_is_read(tmp_path: Path):
    path = tmp_path / "envoy.yaml"
    path.write_text(
        "servers: [gw1.example.com:7700, '[::1]:7701']\ninterval_s: 120\nsplay_s: 0\n"
        "traits_dir: /etc/t.d\nroot: /srv/root\nkeepalive_s: 30\nreconnect_base_s: 0.5\n"
        "reconnect_cap_s: 10\nrun_checkin_budget_s: 2\n")
    cfg = load_config(path, required=True)
    assert cfg.servers == ["gw1.example.com:7700", "[::1]:7701"]
    assert (cfg.interval_s, cfg.splay_s, cfg.keepalive_s) == (120.0, 0.0, 30.0)
    assert cfg.traits_dir == Path("/etc/t.d") and cfg.root == Path("/srv/root")
    assert (cfg.reconnect_base_s, cfg.reconnect_cap_s, cfg.run_checkin_budget_s) == (0.5, 10.0, 2.0)


def test_missing_and_empty_files(tmp_path: Path):
    assert load_config(tmp_path / "absent.yaml", required=False) == EnvoyConfig()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml", required=True)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty, required=True) == EnvoyConfig()


@pytest.mark.parametrize(("text", "message"), [
    ("interval: 5\n", "interval: unknown setting"),
    ("interval_s: soon\n", "interval_s: expected a number of seconds, got 'soon'"),
    ("interval_s: 0\n", "interval_s: 0 is below the smallest allowed value"),
    ("splay_s: true\n", "splay_s: expected a number"),
    ("servers: [gw]\n", "HOST:PORT"),
    ("servers: []\n", "servers: expected a list of HOST:PORT"),
    ("traits_dir: 5\n", "traits_dir: expected a folder path"),
    ("reconnect_base_s: 5\nreconnect_cap_s: 1\n", "reconnect_cap_s (1.0) is below reconnect_base_s"),
    ("- just\n- a list\n", "expected a mapping of settings"),
    ("servers: [unclosed\n", "invalid YAML"),
])
def test_bad_files_name_the_key_and_the_value(tmp_path: Path, text: str, message: str):
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"envoy\.yaml") as info:
        load_config(path, required=True)
    assert message in str(info.value)


def test_flags_win_over_the_file_and_unset_flags_do_not(tmp_path: Path):
    cfg = EnvoyConfig(servers=["a:1"], interval_s=60.0, splay_s=5.0)
    merged = with_overrides(cfg, {"servers": None, "interval_s": 2.0, "splay_s": 0.0, "root": None})
    assert merged.servers == ["a:1"] and merged.interval_s == 2.0 and merged.splay_s == 0.0


def test_which_file_is_read(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("VIGO_ENVOY_CONFIG", raising=False)
    assert config_path(None) == (DEFAULT_CONFIG_PATH, False)
    assert config_path(tmp_path / "x.yaml") == (tmp_path / "x.yaml", True)
    monkeypatch.setenv("VIGO_ENVOY_CONFIG", str(tmp_path / "env.yaml"))
    assert config_path(None) == (tmp_path / "env.yaml", True)


def test_an_envoy_whose_newest_run_was_offline_shows_as_enforcing_from_cache():
    now = 10_000.0
    base = {"last_seen": now - 10, "interval_s": 60, "offline_runs": 0,
            "last_run": {"serial": 3, "counts": {"failed": 0}, "offline": False}}
    kw = {"now": now, "current_serial": 3, "offline_after_intervals": 3, "default_interval_s": 300}
    assert derive_status(base, **kw) == CONVERGED
    assert derive_status({**base, "offline_runs": 2}, **kw) == FROM_CACHE
    assert derive_status({**base, "last_run": {**base["last_run"], "offline": True}}, **kw) == FROM_CACHE
    assert derive_status({**base, "last_seen": now - 1000, "offline_runs": 2}, **kw) == OFFLINE
