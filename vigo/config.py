"""`server.yaml`: the server's settings, one documented dataclass per component.

Every field has a default, a unit in its name where it has one, and a comment saying why the
default is what it is. ``docs/configuration.md`` is the same table for people. A bad value is a
ConfigError naming the key, the expected form and the value found.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from vigo.errors import ConfigError


@dataclass
class ListenConfig:
    #: Address the gateway binds. 0.0.0.0 serves every interface; dev mode uses 127.0.0.1.
    host: str = "0.0.0.0"
    #: TCP port of the gateway (TLS). One gateway per node binds it.
    port: int = 7700


@dataclass
class CheckinConfig:
    #: Seconds between an envoy's runs, handed to envoys in every check-in answer.
    interval_s: float = 300.0
    #: Up to this many seconds of per-envoy delay, so a fleet does not check in in lockstep.
    splay_s: float = 60.0
    #: An envoy not heard from for this many intervals shows as `offline` (CFEngine's 3x rule).
    offline_after_intervals: int = 3


@dataclass
class GatewayConfig:
    #: Largest frame accepted, bytes. A bundle travels in one frame, so keep it above the bundle.
    max_frame_bytes: int = 8 * 1024 * 1024
    #: Most envoy requests carried by one actor call to the primary.
    batch_max: int = 256
    #: How long the first request of a batch waits for company, milliseconds.
    batch_wait_ms: float = 5.0
    #: Requests waiting for the primary before new ones are answered `overloaded`.
    queue_max: int = 5000
    #: What an `overloaded` answer asks the envoy to wait, seconds.
    retry_after_s: float = 5.0
    #: Time allowed for one whole frame once its first byte arrived (slowloris guard), seconds.
    frame_timeout_s: float = 30.0
    #: An idle connection is closed after this many seconds without a frame.
    idle_timeout_s: float = 900.0
    #: Connections beyond this are refused at accept time.
    max_connections: int = 20000


@dataclass
class AdmissionsConfig:
    #: Lifetime of a join token unless `token create --ttl` says otherwise, seconds.
    token_ttl_s: float = 24 * 3600.0
    #: Joins one token allows unless `token create --uses` says otherwise.
    token_uses: int = 1
    #: Lifetime of an envoy certificate, seconds (renewed over the authenticated channel).
    envoy_cert_lifetime_s: float = 30 * 24 * 3600.0


@dataclass
class RetentionConfig:
    #: Run reports kept per envoy (newest first); older ones are deleted.
    runs_per_envoy: int = 200
    #: Run reports older than this are deleted whatever their count, days.
    max_age_days: float = 30.0


@dataclass
class ArchiveConfig:
    #: Where the state stream is archived: ``file:///path`` or ``s3://bucket/prefix``. Empty
    #: means no archive. Dev mode archives to ``file://DATA_DIR-archive``.
    url: str = ""
    #: An S3-compatible endpoint (MinIO, Ceph, ...); empty means AWS. Credentials come from the
    #: usual boto3 sources (environment, ~/.aws, instance role), never from this file.
    endpoint_url: str = ""
    #: How often sealed WAL segments are shipped, seconds: the archive's recovery point. At 1 s
    #: a busy server makes ~2.6 M PUTs a month (about 13 USD on AWS S3, per litestream.io).
    sync_interval_s: float = 1.0
    #: A full snapshot this often (and at every new generation), seconds. Restore replays the
    #: WAL since the snapshot, so a write-heavy server wants this shorter.
    snapshot_interval_s: float = 24 * 3600.0
    #: Snapshots (and the WAL after them) are kept this long; the newest is always kept, seconds.
    retention_s: float = 24 * 3600.0
    #: How often retention runs, seconds.
    retention_check_s: float = 3600.0
    #: Local spool past which the archive is reported behind (loud log line, status flag), bytes.
    #: The spool keeps growing past it: serving never stops for the archive.
    spool_max_bytes: int = 1024 * 1024 * 1024


@dataclass
class ReplicationConfig:
    #: ``vigo-host`` labels of the nodes that each hold a standby of this partition (never the
    #: primary's own host). Empty: no standbys.
    standbys: list[str] = field(default_factory=list)
    #: Standbys that must hold a write before it is acknowledged: 0 = asynchronous (lag is
    #: bounded and reported), 1 = synchronous (RPO 0 for anything acknowledged).
    sync_standbys: int = 0
    #: In synchronous mode, how long a write waits for a standby before the envoy or operator
    #: is told to retry (the write stays committed on the primary; resends are idempotent), s.
    sync_timeout_s: float = 5.0
    #: WAL kept in memory for standbys that are behind, bytes; one further behind is sent a
    #: fresh snapshot instead (automatic, and reported).
    max_lag_bytes: int = 64 * 1024 * 1024
    #: Let the control actor promote the most up-to-date standby when the primary is dead for
    #: ``failover_after_s``. Off by default: a network split can then produce two primaries
    #: for a moment (the old one is fenced by term, but an envoy may have talked to it).
    auto_failover: bool = False
    #: How long the primary must be dead (as Ray reports its actor) before auto failover, s.
    failover_after_s: float = 5.0


@dataclass
class SpannerConfig:
    #: ``vigo-host`` labels of the bolts: each gets a bolt (``bolt-<label>``), a write-equal
    #: primary with its own database serving its slice of the envoys. Empty: spanner is off.
    bolts: list[str] = field(default_factory=list)
    #: A bolt failing liveness this long leaves the live set and its envoys move, s.
    suspicion_s: float = 4.0
    #: A bolt that left may take its envoys back only this long after leaving (flap damping), s.
    rejoin_hold_s: float = 60.0
    #: How often a bolt pushes roster deltas to its peers, s (revocations go at once).
    delta_interval_s: float = 0.25
    #: How often a bolt compares per-shard roster digests with one peer (anti-entropy), s.
    digest_interval_s: float = 2.0
    #: Standbys per bolt (peer replication inside each bolt's partition): bolt i's standbys run
    #: on the next N hosts of ``bolts``, wrapping around. 0: bolts have no standbys.
    standbys_per_bolt: int = 0


@dataclass
class ServerConfig:
    #: Partition name this server serves (spanner and replication add more later).
    partition: str = "p0"
    #: Where the partition's database and its trees live.
    data_dir: str = "/var/lib/vigo"
    listen: ListenConfig = field(default_factory=ListenConfig)
    checkin: CheckinConfig = field(default_factory=CheckinConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    admissions: AdmissionsConfig = field(default_factory=AdmissionsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    replication: ReplicationConfig = field(default_factory=ReplicationConfig)
    spanner: SpannerConfig = field(default_factory=SpannerConfig)

    @classmethod
    def default(cls) -> ServerConfig:
        return cls()

    @classmethod
    def local(cls, data_dir: str | Path, port: int = 7700) -> ServerConfig:
        """Dev mode: loopback only, short intervals so a demo shows results within seconds."""
        cfg = cls(data_dir=str(data_dir))
        cfg.listen = ListenConfig(host="127.0.0.1", port=port)
        cfg.checkin = CheckinConfig(interval_s=30.0, splay_s=5.0)
        cfg.archive = ArchiveConfig(url=Path(f"{Path(data_dir).resolve()}-archive").as_uri())
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def from_dict(data: Any, cls: type = ServerConfig, prefix: str = "") -> Any:
    """Build a config dataclass from plain data, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'server.yaml'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown setting (expected one of {', '.join(sorted(fields))})"
        )
    values: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = from_dict(value, kind, prefix=f"{key}.")
            continue
        values[name] = _coerce(key, kind, value)
    cfg = cls(**values)
    _check_ranges(cfg, prefix)
    return cfg


def _coerce(key: str, kind: Any, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if kind is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if kind == list[str]:
        if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of names, got {value!r}")
    raise AssertionError(f"unsupported setting type {kind!r} for {key}")


_POSITIVE = {
    "listen.port": (1, 65535),
    "checkin.interval_s": (1, None),
    "checkin.splay_s": (0, None),
    "checkin.offline_after_intervals": (1, None),
    "gateway.max_frame_bytes": (1024, 1024 * 1024 * 1024),
    "gateway.batch_max": (1, 100000),
    "gateway.batch_wait_ms": (0, 10000),
    "gateway.queue_max": (1, None),
    "gateway.retry_after_s": (0, 3600),
    "gateway.frame_timeout_s": (0.1, None),
    "gateway.idle_timeout_s": (1, None),
    "gateway.max_connections": (1, None),
    "admissions.token_ttl_s": (1, None),
    "admissions.token_uses": (1, None),
    "admissions.envoy_cert_lifetime_s": (60, None),
    "retention.runs_per_envoy": (1, None),
    "retention.max_age_days": (0.01, None),
    "archive.sync_interval_s": (0.05, 3600),
    "archive.snapshot_interval_s": (1, None),
    "archive.retention_s": (1, None),
    "archive.retention_check_s": (1, None),
    "archive.spool_max_bytes": (1024 * 1024, None),
    "replication.sync_standbys": (0, 1),
    "replication.sync_timeout_s": (0.1, 3600),
    "replication.max_lag_bytes": (1024 * 1024, None),
    "replication.failover_after_s": (0.5, None),
    "spanner.suspicion_s": (0.1, None),
    "spanner.rejoin_hold_s": (0, None),
    "spanner.delta_interval_s": (0.01, 60),
    "spanner.digest_interval_s": (0.1, 3600),
    "spanner.standbys_per_bolt": (0, 16),
}


def _check_ranges(cfg: Any, prefix: str) -> None:
    for dotted, (low, high) in _POSITIVE.items():
        head, _, leaf = dotted.rpartition(".")
        if head != prefix.rstrip(".") or not hasattr(cfg, leaf):
            continue
        value = getattr(cfg, leaf)
        if value < low or (high is not None and value > high):
            allowed = f"{low}..{high}" if high is not None else f">= {low}"
            raise ConfigError(f"{dotted}: {value!r} is out of range (allowed {allowed})")


def load(path: str | Path) -> ServerConfig:
    """Read and validate a server.yaml."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    try:
        return from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def dump(cfg: ServerConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def dev_data_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "vigo" / "dev"
