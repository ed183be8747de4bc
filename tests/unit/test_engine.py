"""The converge engine: conditions, templates, ordering, failure isolation, notify, noop, redaction."""

from __future__ import annotations

import pytest

from tests.conftest import write_stack
from vigo.agent.engine import converge
from vigo.agent.resources.file import File
from vigo.policy import bundle as bundle_mod
from vigo.policy.stack import load_stack

TRAITS = {"hostname": "web1", "os": {"family": "debian", "name": "debian"}, "cpus": 2, "custom": {"roles": ["web"]}}


def make(tmp_path, keypair, policies, templates=None, files=None, secrets=None):
    private, *_ = keypair
    stack = load_stack(write_stack(tmp_path / "stack", policies, templates, files))
    return bundle_mod.build(stack, signing_key=private, serial=1, secrets=secrets)


def run(bundle, tmp_path, traits=TRAITS, **kw):
    report = converge(bundle, traits, root=tmp_path / "root", **kw)
    return report, {r["id"]: r for r in report["resources"]}


def test_conditions_select_policies_and_resources(tmp_path, keypair):
    b = make(tmp_path, keypair, {
        "web.yaml": {"when": '"web" in custom.roles', "resources": [
            {"file": "/etc/web", "content": "w"},
            {"file": "/etc/big", "content": "b", "when": "cpus >= 8"},
        ]},
        "db.yaml": {"when": 'os.family == "redhat"', "resources": [{"file": "/etc/db", "content": "d"}]},
    })
    report, res = run(b, tmp_path)
    assert res["file:/etc/web"]["status"] == "changed"
    assert res["file:/etc/big"]["status"] == "skipped" and "cpus >= 8" in res["file:/etc/big"]["message"]
    assert "file:/etc/db" not in res
    assert {p["name"]: p["active"] for p in report["policies"]} == {"db": False, "web": True}
    assert (tmp_path / "root/etc/web").read_text() == "w" and not (tmp_path / "root/etc/db").exists()
    assert report["counts"] == {"ok": 0, "changed": 1, "failed": 0, "skipped": 1}


def test_same_bundle_adapts_to_fresh_traits(tmp_path, keypair):
    b = make(tmp_path, keypair, {"p.yaml": {"resources": [
        {"file": "/etc/motd", "template": "motd.j2"},
        {"file": "/etc/canary", "content": "1", "when": "custom.canary == true"},
    ]}}, templates={"motd.j2": "host {{ traits.hostname }} cpus {{ traits.cpus }}\n"})
    run(b, tmp_path)
    assert (tmp_path / "root/etc/motd").read_text() == "host web1 cpus 2\n"
    changed = {**TRAITS, "cpus": 4, "custom": {"canary": True}}
    _, res = run(b, tmp_path, changed)
    assert (tmp_path / "root/etc/motd").read_text() == "host web1 cpus 4\n"
    assert res["file:/etc/canary"]["status"] == "changed"


def test_failure_skips_dependents_only(tmp_path, keypair):
    b = make(tmp_path, keypair, {"p.yaml": {"resources": [
        {"exec": "broken", "command": "exit 3"},
        {"file": "/etc/needs-broken", "content": "x", "requires": ["exec:broken"]},
        {"file": "/etc/needs-needs", "content": "x", "requires": ["file:/etc/needs-broken"]},
        {"file": "/etc/independent", "content": "x"},
    ]}})
    report, res = run(b, tmp_path)
    assert res["exec:broken"]["status"] == "failed" and "exited 3" in res["exec:broken"]["message"]
    assert res["file:/etc/needs-broken"]["status"] == "skipped"
    assert "exec:broken failed" in res["file:/etc/needs-broken"]["message"]
    assert res["file:/etc/needs-needs"]["status"] == "skipped"
    assert res["file:/etc/independent"]["status"] == "changed"
    assert report["counts"]["failed"] == 1


def test_requires_on_inactive_policy_is_skipped_with_reason(tmp_path, keypair):
    b = make(tmp_path, keypair, {
        "a.yaml": {"when": "false", "resources": [{"exec": "setup", "command": "true"}]},
        "b.yaml": {"resources": [{"file": "/etc/x", "content": "1", "requires": ["exec:setup"]}]},
    })
    _, res = run(b, tmp_path)
    assert res["file:/etc/x"]["status"] == "skipped" and "not active on this host" in res["file:/etc/x"]["message"]


def test_notify_runs_refreshonly_exec_only_on_change(tmp_path, keypair):
    b = make(tmp_path, keypair, {"p.yaml": {"resources": [
        {"file": "/etc/app.conf", "content": "v1", "notify": ["exec:reload"]},
        {"exec": "reload", "command": "echo x >> \"$VIGO_ROOT/reloads\"", "refreshonly": True},
    ]}})
    _, res = run(b, tmp_path)
    assert res["exec:reload"]["status"] == "changed" and res["exec:reload"]["notified_by"] == ["file:/etc/app.conf"]
    _, res = run(b, tmp_path)
    assert res["exec:reload"]["status"] == "ok"
    assert (tmp_path / "root/reloads").read_text() == "x\n"


def test_template_errors_fail_only_their_resource(tmp_path, keypair):
    b = make(tmp_path, keypair, {"p.yaml": {"resources": [
        {"file": "/etc/undefined", "template": "undef.j2"},
        {"file": "/etc/escape", "template": "escape.j2"},
        {"file": "/etc/fine", "content": "ok"},
    ]}}, templates={"undef.j2": "{{ vars.nope }}", "escape.j2": "{{ ''.__class__.__mro__ }}"})
    _report, res = run(b, tmp_path)
    assert res["file:/etc/undefined"]["status"] == "failed" and "undefined" in res["file:/etc/undefined"]["message"]
    assert res["file:/etc/escape"]["status"] == "failed"
    assert "sandbox" in res["file:/etc/escape"]["message"] or "unsafe" in res["file:/etc/escape"]["message"]
    assert res["file:/etc/fine"]["status"] == "changed"


def test_policy_condition_that_cannot_be_evaluated_fails_its_resources(tmp_path, keypair):
    b = make(tmp_path, keypair, {
        "p.yaml": {"when": "custom.size > 3", "resources": [{"file": "/etc/a", "content": "1"}]},
        "q.yaml": {"resources": [{"file": "/etc/b", "content": "1"}]},
    })
    report, res = run(b, tmp_path, {**TRAITS, "custom": {"size": "big"}})
    assert res["file:/etc/a"]["status"] == "failed" and "cannot be evaluated" in res["file:/etc/a"]["message"]
    assert res["file:/etc/b"]["status"] == "changed"
    assert report["policy_errors"] == 1


def test_noop_changes_nothing_and_shows_diffs(tmp_path, keypair):
    b = make(tmp_path, keypair, {"p.yaml": {"resources": [
        {"directory": "/etc/app"},
        {"file": "/etc/app/conf", "content": "new\n", "mode": "0600"},
        {"exec": "touch", "command": "touch \"$VIGO_ROOT/touched\""},
    ]}})
    report, res = run(b, tmp_path, noop=True)
    assert report["noop"] is True
    assert all(r["status"] == "changed" for r in res.values())
    assert "+new" in res["file:/etc/app/conf"]["diff"]
    assert res["exec:touch"]["message"].startswith("would ")
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").rglob("*"))


def test_secrets_redacted_everywhere_in_the_report(tmp_path, keypair):
    b = make(tmp_path, keypair, {"p.yaml": {"secrets": ["token"], "resources": [
        {"file": "/etc/conf", "template": "conf.j2"},
        {"exec": "show", "command": "cat \"$VIGO_ROOT/etc/conf\"; exit 1", "requires": ["file:/etc/conf"]},
    ]}}, templates={"conf.j2": "token={{ secrets.token }}\n"}, secrets={"token": "hunter2-very-secret"})
    (tmp_path / "root/etc").mkdir(parents=True)
    (tmp_path / "root/etc/conf").write_text("token=old\n")  # an update carries a diff
    report, res = run(b, tmp_path)
    assert (tmp_path / "root/etc/conf").read_text() == "token=hunter2-very-secret\n"
    assert "hunter2" not in repr(report)
    assert "[redacted:token]" in res["file:/etc/conf"]["diff"]
    assert "[redacted:token]" in res["exec:show"]["message"]


def test_template_only_sees_declared_secrets(tmp_path, keypair):
    b = make(tmp_path, keypair, {
        "a.yaml": {"secrets": ["token"], "resources": [{"file": "/etc/a", "content": "x"}]},
        "b.yaml": {"resources": [{"file": "/etc/b", "template": "b.j2"}]},
    }, templates={"b.j2": "{{ secrets.token }}"}, secrets={"token": "t"})
    _, res = run(b, tmp_path)
    assert res["file:/etc/b"]["status"] == "failed" and "token" in res["file:/etc/b"]["message"]


def test_a_crashing_resource_is_reported_not_raised(tmp_path, keypair, monkeypatch):
    b = make(tmp_path, keypair, {"p.yaml": {"resources": [
        {"file": "/etc/a", "content": "1"}, {"exec": "after", "command": "true"}]}})

    def boom(self, ctx):
        raise RuntimeError("resource bug")

    monkeypatch.setattr(File, "apply", boom)
    _, res = run(b, tmp_path)
    assert res["file:/etc/a"]["status"] == "failed" and "internal error" in res["file:/etc/a"]["message"]
    assert res["exec:after"]["status"] == "changed"


def test_second_run_is_all_ok(tmp_path, keypair):
    b = make(tmp_path, keypair, {"p.yaml": {"resources": [
        {"directory": "/srv/app", "mode": "0750"},
        {"file": "/srv/app/a", "content": "1", "mode": "0600"},
        {"file": "/srv/app/b", "source": "b.bin"},
        {"symlink": "/srv/current", "target": "/srv/app"},
        {"exec": "init", "command": "touch \"$VIGO_ROOT/srv/app/inited\"", "creates": "/srv/app/inited"},
    ]}}, files={"b.bin": bytes(range(256))})
    first, _ = run(b, tmp_path)
    assert first["counts"]["changed"] == 5
    second, _ = run(b, tmp_path)
    assert second["counts"] == {"ok": 5, "changed": 0, "failed": 0, "skipped": 0}
    assert (tmp_path / "root/srv/app/b").read_bytes() == bytes(range(256))


@pytest.mark.parametrize("field", ["run_id", "bundle_version", "serial", "counts", "resources", "started_at"])
def test_report_shape(tmp_path, keypair, field):
    b = make(tmp_path, keypair, {"p.yaml": {"resources": [{"file": "/etc/a", "content": "1"}]}})
    report, _ = run(b, tmp_path)
    assert field in report
