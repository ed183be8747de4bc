"""The envoy daemon's local config file: ``/etc/vigo-envoy/envoy.yaml`` (or ``--config`` /
``VIGO_ENVOY_CONFIG``), documented in docs/envoy.md.

Read if present; a file that was named must exist. Every key is optional (``EnvoyConfig``: None
means the server's answer or the built-in default applies); flags on the command line win over
the file (``with_overrides``). An unknown key or a value of the wrong kind is refused with the
key and the value named. Each key's kind, default and smallest value are declared once, on its
field (``vigo.fields``, the engine server.yaml uses too).

This module is imported by the envoy: standard library and PyYAML only.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigo import fields
from vigo.agent import backoff as bo
from vigo.agent.transport import parse_server
from vigo.errors import ConfigError
from vigo.fields import field

#: The local config file read when neither --config nor VIGO_ENVOY_CONFIG names one (a missing
#: default file means "all defaults"; a missing file that was named is an error).
DEFAULT_CONFIG_PATH = Path("/etc/vigo-envoy/envoy.yaml")
TRAITS_DIR_DEFAULT = Path("/etc/vigo-envoy/traits.d")
#: Seconds between runs when neither the local config nor a server answer says.
DEFAULT_INTERVAL_S = 300.0
#: Splay bound (seconds) when neither the local config nor a server answer says.
DEFAULT_SPLAY_S = 60.0
#: How long a run waits for its check-in answer on a live connection before it converges from
#: the cache (offline) instead, seconds. The run never waits longer on the network.
RUN_CHECKIN_BUDGET_S = 5.0
#: A ping on an idle connection every this many seconds (dead peers are noticed, and the
#: gateway's idle timeout, 900 s by default, never closes a healthy envoy).
KEEPALIVE_S = 60.0


def _is_servers(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value))


def _servers(value: str | list[str]) -> list[str]:
    """One HOST:PORT or a list of them, each checked (``parse_server``'s refusal names it)."""
    servers = [value] if isinstance(value, str) else value
    for server in servers:
        parse_server(server)
    return [v.strip() for v in servers]


#: The kinds of envoy.yaml values, worded as its errors have always said them.
SECONDS = dataclasses.replace(fields.FLOAT, expect="a number of seconds")
FOLDER = fields.Kind("a folder path", lambda v: isinstance(v, str) and bool(v), Path)
SERVERS = fields.Kind("a list of HOST:PORT", _is_servers, _servers)
#: envoy.yaml's own words: "expected a mapping of settings", "0 is below the smallest allowed value 0.1".
WORDING = fields.Wording(mapping="a mapping of settings", below_minimum=True)


@dataclass
class EnvoyConfig:
    """The daemon's local settings. None means "not set here" (the server's answer or the
    built-in default applies); so does a key set to null in the file."""

    #: Gateways, HOST:PORT, tried in this order and no others (a pin: the list learned from
    #: the server is not dialled); None: the gateways learned from the server and the list
    #: `vigo-envoy join` stored, in this envoy's rendezvous order (vigo.agent.gateways).
    servers: list[str] | None = field(None, kind=SERVERS)
    #: Seconds between runs; None: the server's answer, else DEFAULT_INTERVAL_S.
    interval_s: float | None = field(None, kind=SECONDS, min=0.1)
    #: Bound of this host's per-run offset (and of the flush delay after a reconnect), seconds;
    #: None: the server's answer, else DEFAULT_SPLAY_S.
    splay_s: float | None = field(None, kind=SECONDS, min=0.0)
    #: Custom traits folder; None: VIGO_ENVOY_TRAITS_DIR, else /etc/vigo-envoy/traits.d.
    traits_dir: Path | None = field(None, kind=FOLDER)
    #: Re-base every managed path under this folder (tests, demos); None: the real root.
    root: Path | None = field(None, kind=FOLDER)
    #: Seconds between keepalive pings on an idle connection.
    keepalive_s: float = field(KEEPALIVE_S, kind=SECONDS, min=0.5)
    #: Reconnect backoff bounds, seconds (see vigo.agent.backoff); the cap is at least the base.
    reconnect_base_s: float = field(bo.RECONNECT_BASE_S, kind=SECONDS, min=0.01)
    reconnect_cap_s: float = field(bo.RECONNECT_CAP_S, kind=SECONDS, min=0.01)
    #: How long a run waits for its check-in answer, seconds.
    run_checkin_budget_s: float = field(RUN_CHECKIN_BUDGET_S, kind=SECONDS, min=0.1)

    def resolved_traits_dir(self) -> Path:
        if self.traits_dir is not None:
            return self.traits_dir
        return Path(os.environ.get("VIGO_ENVOY_TRAITS_DIR", str(TRAITS_DIR_DEFAULT)))

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def config_path(explicit: Path | None) -> tuple[Path, bool]:
    """The config file to read and whether it must exist (it must when it was named)."""
    if explicit is not None:
        return explicit, True
    env = os.environ.get("VIGO_ENVOY_CONFIG")
    if env:
        return Path(env), True
    return DEFAULT_CONFIG_PATH, False


def load_config(path: Path, *, required: bool) -> EnvoyConfig:
    """Read and check the local config file; ConfigError naming the key and the value."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError(f"envoy config {path} does not exist") from None
        return EnvoyConfig()
    except OSError as exc:
        raise ConfigError(f"cannot read envoy config {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    cfg = fields.from_mapping(EnvoyConfig, data, f"{path}: ", null_is_unset=True, wording=WORDING)
    if cfg.reconnect_cap_s < cfg.reconnect_base_s:
        raise ConfigError(f"{path}: reconnect_cap_s ({cfg.reconnect_cap_s}) is below reconnect_base_s "
                          f"({cfg.reconnect_base_s})")
    return cfg


def with_overrides(cfg: EnvoyConfig, overrides: dict[str, Any]) -> EnvoyConfig:
    """``cfg`` with every override that is not None (command-line flags win over the file)."""
    return dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})

