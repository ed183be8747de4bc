"""A partition member's roles, without Ray: which role control's route gives a member, its data
dir as it becomes a primary or a standby (a former primary's database set aside), a primary's
upkeep steps, what a member says about itself, and the synchronous-replication check.

vigo/actors/member.py is the actor around these: its lock, its threads, the order it takes a
role in, and every message to another actor (the replication sender, the roster loop).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vigo import config as config_mod
from vigo.durable import replace_durably
from vigo.server.partition import Partition
from vigo.server.peer.replication import ReplicationLog
from vigo.server.peer.standby import StandbyCore
from vigo.server.spanner.bolt import BoltCore

#: The replication log's bound on a standby's lag when there is no config (a member started by
#: hand), bytes.
DEFAULT_MAX_LAG_BYTES = 64 << 20


def role_for(birth_role: str, name: str, route: dict[str, Any] | None) -> str:
    """The role a member takes at its start: its birth role, unless control's route names a
    primary. A partition that moved on while the member was away makes it a standby; a route
    naming it makes it the primary."""
    if route and route.get("primary") not in (None, name):
        return "standby"
    if route and route.get("primary") == name:
        return "primary"
    return birth_role


def configured_standbys(cfg: config_mod.ServerConfig | None) -> list[str]:
    """The standbys server.yaml gives a partition, by actor name."""
    return [f"standby-{cfg.partition}-{host}" for host in cfg.replication.standbys] if cfg else []


def start_new_generation(data_dir: Path) -> None:
    """A promoted standby: its stream starts a new generation (nothing it applied can be proven
    to continue a log it did not write), and no applier state may linger."""
    shutil.rmtree(data_dir / "stream", ignore_errors=True)


def replication_log(standbys: list[str], cfg: config_mod.ServerConfig | None) -> ReplicationLog | None:
    """What a primary keeps for its standbys; None without any."""
    if not standbys:
        return None
    return ReplicationLog(standbys, max_lag_bytes=cfg.replication.max_lag_bytes if cfg else DEFAULT_MAX_LAG_BYTES)


def prepare_standby_dir(data_dir: Path) -> None:
    """The data dir of a member about to be a standby: there, and without the stream state of a
    primary (a standby's own position is the applier's)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    (data_dir / "stream" / "state.json").unlink(missing_ok=True)


def set_aside_fenced_database(data_dir: Path, standby: StandbyCore) -> Path | None:
    """A former primary (a standby that has applied nothing, over an existing database):
    whatever it wrote after the fork is not in the new primary's history. Its database is kept
    aside for the operator as ``state.db.fenced-<time>``, never served; returns that path, or
    None when there was nothing to set aside."""
    if standby.applier.state is not None or not (data_dir / "state.db").exists():
        return None
    aside = data_dir / f"state.db.fenced-{int(time.time())}"
    replace_durably(data_dir / "state.db", aside)
    for suffix in ("-wal", "-shm"):
        Path(f"{data_dir / 'state.db'}{suffix}").unlink(missing_ok=True)
    return aside


def upkeep_steps(partition: Partition, bolt: BoltCore | None,
                 rlog: ReplicationLog | None) -> list[tuple[str, Callable[[], object]]]:
    """A primary's upkeep round, step by step (named for the log): the partition's own steps,
    the roster's save when it is a bolt, a snapshot when its standbys want one."""
    steps = partition.upkeep_steps()
    if bolt is not None:
        steps.append(("roster save", bolt.save))
    if rlog is not None:
        def standby_snapshot() -> None:
            if rlog.snapshot_wanted:
                partition.store.stream.snapshot()
        steps.append(("snapshot for the standbys", standby_snapshot))
    return steps


def member_info(name: str, pid: int, partition: Partition | None, replication: ReplicationLog | None,
                standby: StandbyCore | None) -> dict[str, Any]:
    """A member's role, term and position, as `server promote` and `server status` read them."""
    if partition is not None:
        pos = partition.store.stream.position()
        return {"name": name, "role": "primary", "term": partition.term, "pid": pid,
                "position": list(pos) if pos else None,
                "committed_at": replication.head_at if replication else None}
    if standby is None:  # the start thread has not taken a role yet (or is between roles)
        return {"name": name, "role": "starting", "term": 0, "pid": pid, "position": None,
                "committed_at": None}
    st = standby.applier.state
    return {"name": name, "role": "standby", "term": standby.term, "pid": pid,
            "position": list(standby.applier.position()) if st else None,
            "committed_at": st.committed_at if st else None}


def bolt_info(name: str, bolt: BoltCore | None, partition: Partition | None,
              replication: ReplicationLog | None) -> dict[str, Any]:
    """A spanner bolt's roster stats and what its partition holds (`vigocli spanner status`)."""
    if bolt is None:
        return {"name": name, "bolt": False}
    info = bolt.stats()
    info["name"] = bolt.name
    info["member"] = name
    info["standbys"] = replication_status(partition, replication)["standbys"]
    info["bundle_serial"] = partition.current_serial()
    info["envoys_here"] = partition.store.one("SELECT COUNT(*) FROM envoys")[0]
    info["runs_here"] = partition.store.one("SELECT COUNT(*) FROM runs")[0]
    return info


def replication_status(partition: Partition | None, replication: ReplicationLog | None) -> dict[str, Any]:
    """A primary's replication: its mode, the head position, each standby's state."""
    if replication is None:
        return {"mode": "none", "standbys": []}
    cfg = partition.cfg.replication
    return {"mode": "synchronous" if cfg.sync_standbys else "asynchronous",
            "head": list(replication.head) if replication.head else None,
            "standbys": replication.status()}


def unconfirmed(partition: Partition | None, rlog: ReplicationLog | None,
                position: tuple[str, int, int] | None) -> str | None:
    """In synchronous mode, None once enough standbys hold ``position`` (everything the caller
    committed), else why the caller must not be told its write is safe. Waits for them, up to
    the configured timeout; None at once when replication is not synchronous."""
    if partition is None or rlog is None or partition.cfg.replication.sync_standbys < 1:
        return None
    need = partition.cfg.replication.sync_standbys
    if rlog.wait_acked(position, need, partition.cfg.replication.sync_timeout_s):
        return None
    return (f"committed on the primary but not yet confirmed by {need} standby within "
            f"{partition.cfg.replication.sync_timeout_s:.1f} s (synchronous replication); resend")
