"""vigo.actors.runtime: what the Ray wrapper does beyond passing calls through."""

from __future__ import annotations


def test_ray_cluster_events_go_to_stderr_not_the_clis_answer(capsys) -> None:
    """A node marked dead while `vigocli ... --json` runs must not land in its JSON."""
    from ray._private import worker

    from vigo.actors.runtime import route_ray_prints_to_stderr

    original = worker.print_to_stdstream
    try:
        route_ray_prints_to_stderr()
        route_ray_prints_to_stderr()  # idempotent: wrapped once
        worker.print_to_stdstream({"lines": ["The node with node id: 41fc has been marked dead"],
                                   "pid": "raylet", "is_err": False}, ignore_prefix=False)
        out, err = capsys.readouterr()
        assert out == "" and "marked dead" in err
    finally:
        worker.print_to_stdstream = original
