"""`server.yaml`: the server's settings, one documented dataclass per component.

Every field has a default, a unit in its name where it has one, the range it allows (declared
with ``vigo.fields.field`` beside it; a plain default allows any value of its type), and a
comment saying why the default is what it is. ``docs/configuration.md`` is the same table for
people (tests/unit/test_config.py keeps its defaults true). A bad value is a ConfigError naming
the key, the expected form and the value found (``vigo.fields`` words them).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vigo import fields
from vigo.errors import ConfigError
from vigo.fields import field, section


@dataclass
class ListenConfig:
    #: Address the gateway binds. 0.0.0.0 serves every interface; dev mode uses 127.0.0.1;
    #: ``node-ip`` makes each gateway bind only its node's Ray address (``--node-ip-address``).
    host: str = "0.0.0.0"
    #: TCP port of the gateway (TLS). One gateway per node binds it.
    port: int = field(7700, min=1, max=65535)


@dataclass
class CheckinConfig:
    #: Seconds between an envoy's runs, handed to envoys in every check-in answer.
    interval_s: float = field(300.0, min=1)
    #: Up to this many seconds of per-envoy delay, so a fleet does not check in in lockstep.
    splay_s: float = field(60.0, min=0)
    #: An envoy not heard from for this many intervals shows as `offline` (CFEngine's 3x rule).
    offline_after_intervals: int = field(3, min=1)


@dataclass
class GatewayConfig:
    #: Largest frame accepted, bytes. A bundle travels in one frame, so keep it above the bundle.
    max_frame_bytes: int = field(8 * 1024 * 1024, min=1024, max=1024 * 1024 * 1024)
    #: Most envoy requests carried by one actor call to the primary.
    batch_max: int = field(256, min=1, max=100000)
    #: How long the first request of a batch waits for company, milliseconds.
    batch_wait_ms: float = field(5.0, min=0, max=10000)
    #: Requests waiting for the primary before new ones are answered `overloaded`.
    queue_max: int = field(5000, min=1)
    #: What an `overloaded` answer asks the envoy to wait, seconds.
    retry_after_s: float = field(5.0, min=0, max=3600)
    #: Time allowed for one whole frame once its first byte arrived (slowloris guard), seconds.
    frame_timeout_s: float = field(30.0, min=0.1)
    #: An idle connection is closed after this many seconds without a frame.
    idle_timeout_s: float = field(900.0, min=1)
    #: Connections beyond this are refused at accept time.
    max_connections: int = field(20000, min=1)


@dataclass
class AdmissionsConfig:
    #: Lifetime of a join token unless `token create --ttl` says otherwise, seconds.
    token_ttl_s: float = field(24 * 3600.0, min=1)
    #: Joins one token allows unless `token create --uses` says otherwise.
    token_uses: int = field(1, min=1)
    #: Lifetime of an envoy certificate, seconds (renewed over the authenticated channel).
    envoy_cert_lifetime_s: float = field(30 * 24 * 3600.0, min=60)


@dataclass
class RetentionConfig:
    #: Run reports kept per envoy (newest first); older ones are deleted.
    runs_per_envoy: int = field(200, min=1)
    #: Run reports older than this are deleted whatever their count, days.
    max_age_days: float = field(30.0, min=0.01)


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
    sync_interval_s: float = field(1.0, min=0.05, max=3600)
    #: A full snapshot this often (and at every new generation), seconds. Restore replays the
    #: WAL since the snapshot, so a write-heavy server wants this shorter.
    snapshot_interval_s: float = field(24 * 3600.0, min=1)
    #: Snapshots (and the WAL after them) are kept this long; the newest is always kept, seconds.
    retention_s: float = field(24 * 3600.0, min=1)
    #: How often retention runs, seconds.
    retention_check_s: float = field(3600.0, min=1)
    #: Local spool past which the archive is reported behind (loud log line, status flag), bytes.
    #: The spool keeps growing past it: serving never stops for the archive.
    spool_max_bytes: int = field(1024 * 1024 * 1024, min=1024 * 1024)


@dataclass
class ReplicationConfig:
    #: ``vigo-host`` labels of the nodes that each hold a standby of this partition (never the
    #: primary's own host). Empty: no standbys.
    standbys: list[str] = field([])
    #: Standbys that must hold a write before it is acknowledged: 0 = asynchronous (lag is
    #: bounded and reported), 1 = synchronous (RPO 0 for anything acknowledged).
    sync_standbys: int = field(0, min=0, max=1)
    #: In synchronous mode, how long a write waits for a standby before the envoy or operator
    #: is told to retry (the write stays committed on the primary; resends are idempotent), s.
    sync_timeout_s: float = field(5.0, min=0.1, max=3600)
    #: WAL kept in memory for standbys that are behind, bytes; one further behind is sent a
    #: fresh snapshot instead (automatic, and reported).
    max_lag_bytes: int = field(64 * 1024 * 1024, min=1024 * 1024)
    #: Let the control actor promote the most up-to-date standby when the primary is dead for
    #: ``failover_after_s``. Off by default: a network split can then produce two primaries
    #: for a moment (the old one is fenced by term, but an envoy may have talked to it).
    auto_failover: bool = False
    #: How long the primary must be dead (as Ray reports its actor) before auto failover, s.
    failover_after_s: float = field(5.0, min=0.5)


@dataclass
class SpannerConfig:
    #: ``vigo-host`` labels of the bolts: each gets a bolt (``bolt-<label>``), a write-equal
    #: primary with its own database serving its slice of the envoys. Empty: spanner is off.
    bolts: list[str] = field([])
    #: A bolt failing liveness this long leaves the live set and its envoys move, s.
    suspicion_s: float = field(4.0, min=0.1)
    #: A bolt that left may take its envoys back only this long after leaving (flap damping), s.
    rejoin_hold_s: float = field(60.0, min=0)
    #: How often a bolt pushes roster deltas to its peers, s (revocations go at once).
    delta_interval_s: float = field(0.25, min=0.01, max=60)
    #: How often a bolt compares per-shard roster digests with one peer (anti-entropy), s.
    digest_interval_s: float = field(2.0, min=0.1, max=3600)
    #: Standbys per bolt (peer replication inside each bolt's partition): bolt i's standbys run
    #: on the next N hosts of ``bolts``, wrapping around. 0: bolts have no standbys.
    standbys_per_bolt: int = field(0, min=0, max=16)


@dataclass
class ConsoleConfig:
    #: Run the web console (one actor, on control's host) with the deployment (docs/console.md).
    enabled: bool = True
    #: TCP port of the console (HTTPS, a certificate from the fleet CA). It binds ``listen.host``.
    port: int = field(7780, min=1, max=65535)
    #: How long a console login lasts before the cluster token is asked for again, s (8 h: a
    #: working day; the cookie carries the same expiry).
    session_ttl_s: float = field(8 * 3600.0, min=60, max=7 * 86400)


@dataclass
class ServerConfig:
    #: Partition name this server serves (spanner and replication add more later).
    partition: str = "p0"
    #: Where the partition's database and its trees live.
    data_dir: str = "/var/lib/vigo"
    listen: ListenConfig = section(ListenConfig)
    checkin: CheckinConfig = section(CheckinConfig)
    gateway: GatewayConfig = section(GatewayConfig)
    admissions: AdmissionsConfig = section(AdmissionsConfig)
    retention: RetentionConfig = section(RetentionConfig)
    archive: ArchiveConfig = section(ArchiveConfig)
    replication: ReplicationConfig = section(ReplicationConfig)
    spanner: SpannerConfig = section(SpannerConfig)
    console: ConsoleConfig = section(ConsoleConfig)

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
    """Build a config dataclass from plain data, checking every key, type and range."""
    return fields.from_mapping(cls, data, prefix, name="server.yaml")


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
