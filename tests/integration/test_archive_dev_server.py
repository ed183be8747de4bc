"""Total loss, rehearsed: a dev server archiving to S3 (moto on loopback) under write load, its
primary killed with SIGKILL, a restore into a new data dir, and a new server on the restored
state that an envoy (joined to the old one, results queued meanwhile) reconnects to and
flushes into."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import apsw
import pytest

from tests.devserver import dev_server, run
from tests.raycluster import join_envoy, run_envoy_once
from tests.s3server import S3Server
from vigo.cli import client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
SYNC_INTERVAL_S = 1.0
#: Upload time on top of the interval before a write counts as "older than the sync interval".
UPLOAD_SLACK_S = 0.5


def primary_pids(data: Path) -> list[int]:
    """The primary's member actor worker process (Ray titles it ``ray::Member...``) of the dev
    head on ``data``: not another Ray's on this machine."""
    from vigo.cli.server import DEV_MARKER, dev_head_pids

    marker = json.loads((data / DEV_MARKER).read_text())
    pids = []
    for pid in dev_head_pids(marker["temp_dir"], marker.get("session")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::Member"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def archiving(s3: S3Server) -> tuple:
    """`server start` options: archive to the S3 server on loopback every SYNC_INTERVAL_S."""
    return ("--archive", "s3://archive/dev", "--archive-endpoint", s3.endpoint_url,
            "--archive-interval", SYNC_INTERVAL_S)


def test_kill_the_primary_restore_and_serve_again(tmp_path, monkeypatch):
    with S3Server() as s3:
        s3.create_bucket("archive")
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        data, restored = tmp_path / "data", tmp_path / "restored"
        with dev_server(data, *archiving(s3), env=s3.env) as info:
            env = info["env"]
            envoy = join_envoy(tmp_path / "envoy", info["gateway"], info["join_token"])
            assert run_envoy_once(envoy)["exit_code"] == 0
            acked: list[tuple[str, float]] = []
            stop = threading.Event()

            def writer():  # through the gateway's admin channel, as vigocli does
                i = 0
                while not stop.is_set():
                    try:
                        client.admin(env["VIGO_ADDRESS"], "secrets.set", {"name": f"w{i}", "value": b"x" * 200})
                        acked.append((f"w{i}", time.time()))
                    except Exception:
                        pass  # the primary is gone: unacknowledged, so not counted
                    i += 1

            thread = threading.Thread(target=writer, daemon=True)
            thread.start()
            time.sleep(6)
            pids = primary_pids(data)
            assert len(pids) == 1, pids
            killed_at = time.time()
            os.kill(pids[0], signal.SIGKILL)
            time.sleep(0.5)
            stop.set()
            thread.join(timeout=30)
        assert len(acked) > 20

        proc = run("vigocli", "restore", "--from", "s3://archive/dev", "--endpoint-url", s3.endpoint_url,
                   "--data-dir", restored, "--json", env=env, check=0)
        result = json.loads(proc.stdout)
        conn = apsw.Connection(str(restored / "state.db"), flags=apsw.SQLITE_OPEN_READONLY)
        names = {r[0] for r in conn.execute("SELECT path FROM trees WHERE tree = 'secrets'")}
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        conn.close()
        old_enough = [n for n, at in acked if at < killed_at - SYNC_INTERVAL_S - UPLOAD_SLACK_S]
        missing = [n for n in old_enough if f"values/{n}.sealed" not in names]
        assert not missing, f"{len(missing)} writes older than the sync interval were lost: {missing[:5]}"
        assert result["reached_at"] >= killed_at - SYNC_INTERVAL_S - UPLOAD_SLACK_S

        # The envoy runs while no server is up: its report is queued.
        offline = run_envoy_once(envoy)
        assert offline["exit_code"] == 0 and offline.get("flushed", 0) == 0
        # A server on the restored data dir serves the same fleet (same CA, same envoys) and
        # archives a new generation.
        with dev_server(restored, *archiving(s3), env=s3.env, gateway_port=info["port"]) as again:
            back = run_envoy_once(envoy)
            assert back["exit_code"] == 0 and back["flushed"] >= 2, back
            listed = json.loads(run("vigocli", "envoys", "show", envoy["id"], "--json", env=again["env"]).stdout)
            assert offline["run_id"] in json.dumps(listed)
        from vigo.snapshots.layout import list_generations
        from vigo.snapshots.targets import open_target

        gens = list_generations(open_target("s3://archive/dev", endpoint_url=s3.endpoint_url), "p0")
        assert len(gens) >= 2 and gens[-1].generation != result["generation"]
