"""Stack loading and validation: each error names the file, policy, resource and what was expected."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE_STACK, write_stack
from vigo.errors import PathEscapeError, StackError
from vigo.policy.stack import load_stack


def one(resources, **policy):
    return {"app.yaml": {"name": "app", **policy, "resources": resources}}


def test_example_stack_loads():
    stack = load_stack(EXAMPLE_STACK)
    names = [p.name for p in stack.policies]
    assert names == sorted(names, key=lambda n: [p.name for p in stack.policies].index(n))
    assert {"base", "web", "big-hosts"} == set(names)
    assert "motd.j2" in stack.templates and "README.txt" in stack.files
    assert stack.secret_names() == ["api_token"]


def test_defaults_filled(tmp_path):
    stack = load_stack(write_stack(tmp_path / "s", one([{"file": "/etc/x", "content": "hi"}])))
    attrs = stack.policies[0].resources[0].attrs
    assert attrs["state"] == "present" and attrs["requires"] == [] and attrs["mode"] is None


@pytest.mark.parametrize(
    ("resources", "policy", "needles"),
    [
        ([{"file": "/etc/x", "colour": "red"}], {}, ["app.yaml", "'app'", "file:/etc/x", "unknown attribute 'colour'"]),
        ([{"file": "/etc/x", "mode": 644}], {}, ["mode", "octal mode string", "644"]),
        ([{"file": "etc/x"}], {}, ["absolute path", "etc/x"]),
        ([{"file": "/etc/x", "content": "a", "source": "b"}], {}, ["at most one"]),
        ([{"file": "/etc/x", "state": "gone"}], {}, ["present | absent", "'gone'"]),
        ([{"package": "nginx", "service": "nginx"}], {}, ["exactly one resource type"]),
        ([{"exec": "x"}], {}, ["needs a command"]),
        ([{"service": "nginx"}], {}, ["needs state and/or enabled"]),
        ([{"file": "/etc/x", "requires": ["package:nope"]}], {}, ["requires names a resource that is not in the stack", "package:nope"]),
        ([{"file": "/etc/x", "requires": ["nope"]}], {}, ["not a resource id", "type:name"]),
        ([{"file": "/a", "notify": ["file:/b"]}, {"file": "/b"}], {}, ["notify target cannot be refreshed"]),
        ([{"file": "/etc/x", "when": "os.family =="}], {}, ["`when` does not parse", "column"]),
        ([{"file": "/etc/x", "template": "missing.j2"}], {}, ["template not found", "templates/missing.j2"]),
        ([{"file": "/etc/x", "source": "missing.bin"}], {}, ["source file not found", "files/missing.bin"]),
        ([{"file": "/etc/x"}], {"when": 3}, ["`when` must be an expression string"]),
        ([{"file": "/etc/x"}], {"secrets": ["bad-name"]}, ["secret names"]),
        ([{"file": "/etc/x"}, {"file": "/etc/x"}], {}, ["duplicate resource"]),
        ("not a list", {}, ["resources must be a list"]),
    ],
)
def test_validation_errors_say_where_and_what(tmp_path, resources, policy, needles):
    write_stack(tmp_path / "s", one(resources, **policy))
    with pytest.raises(StackError) as info:
        load_stack(tmp_path / "s")
    text = str(info.value)
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


def test_broken_yaml_names_line(tmp_path):
    write_stack(tmp_path / "s", {"bad.yaml": "name: x\nresources:\n  - file: /a\n   content: [\n"})
    with pytest.raises(StackError, match=r"bad.yaml: invalid YAML: line \d+ column \d+"):
        load_stack(tmp_path / "s")


def test_unknown_policy_key_and_non_mapping(tmp_path):
    write_stack(tmp_path / "a", {"p.yaml": {"name": "p", "resourcez": []}})
    with pytest.raises(StackError, match="unknown policy key 'resourcez'"):
        load_stack(tmp_path / "a")
    write_stack(tmp_path / "b", {"p.yaml": "- just\n- a list\n"})
    with pytest.raises(StackError, match="holds one mapping"):
        load_stack(tmp_path / "b")


def test_empty_or_missing_stack(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(StackError, match="no policies"):
        load_stack(tmp_path / "empty")
    with pytest.raises(StackError, match="no such folder"):
        load_stack(tmp_path / "nope")


def test_duplicate_policy_names(tmp_path):
    write_stack(tmp_path / "s", {"a.yaml": {"name": "same"}, "b.yaml": {"name": "same"}})
    with pytest.raises(StackError, match="duplicate policy name"):
        load_stack(tmp_path / "s")


@pytest.mark.parametrize("ref", ["../secret.txt", "/etc/passwd", "a/../../x", "..\\x"])
def test_source_path_cannot_escape(tmp_path, ref):
    write_stack(tmp_path / "s", one([{"file": "/etc/x", "source": ref}]), files={"ok": b"1"})
    with pytest.raises(PathEscapeError, match="leaves its folder"):
        load_stack(tmp_path / "s")


def test_symlink_out_of_the_stack_is_refused(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("host secret")
    stack = write_stack(tmp_path / "s", one([{"file": "/etc/x", "source": "link"}]), files={"real": b"1"})
    os.symlink(outside, stack / "files" / "link")
    with pytest.raises(PathEscapeError, match="escapes the stack folder"):
        load_stack(stack)


def test_symlinked_template_out_of_the_stack_is_refused(tmp_path):
    (tmp_path / "evil.j2").write_text("{{ 1 }}")
    stack = write_stack(tmp_path / "s", one([{"file": "/etc/x", "content": "a"}]), templates={"ok.j2": "x"})
    os.symlink(tmp_path / "evil.j2", stack / "templates" / "evil.j2")
    with pytest.raises(PathEscapeError, match=r"templates/evil.j2"):
        load_stack(stack)


def test_symlink_inside_the_stack_is_fine(tmp_path):
    stack = write_stack(tmp_path / "s", one([{"file": "/etc/x", "source": "alias"}]), files={"real": b"1"})
    os.symlink(stack / "files" / "real", stack / "files" / "alias")
    assert load_stack(stack).files == {"alias": b"1"}


def test_template_syntax_error_names_template_and_line(tmp_path):
    write_stack(tmp_path / "s", one([{"file": "/etc/x", "template": "t.j2"}]), templates={"t.j2": "ok\n{% if %}\n"})
    with pytest.raises(StackError, match=r"templates/t.j2: template 't.j2' line 2"):
        load_stack(tmp_path / "s")


def test_cycle_is_a_build_error_naming_the_cycle(tmp_path):
    resources = [
        {"exec": "a", "command": "true", "requires": ["exec:b"]},
        {"exec": "b", "command": "true", "requires": ["exec:c"]},
        {"exec": "c", "command": "true", "requires": ["exec:a"]},
    ]
    write_stack(tmp_path / "s", one(resources))
    with pytest.raises(StackError, match=r"dependency cycle: exec:\w -> exec:\w -> exec:\w -> exec:\w"):
        load_stack(tmp_path / "s")


def test_cycle_through_parent_directory_edge(tmp_path):
    resources = [
        {"directory": "/srv/app", "requires": ["file:/srv/app/conf"]},
        {"file": "/srv/app/conf", "content": "x"},
    ]
    write_stack(tmp_path / "s", one(resources))
    with pytest.raises(StackError, match="dependency cycle"):
        load_stack(tmp_path / "s")


def test_templates_in_subfolders_and_non_utf8(tmp_path):
    stack = write_stack(tmp_path / "s", one([{"file": "/etc/x", "template": "sub/t.j2"}]), templates={"sub/t.j2": "x"})
    assert "sub/t.j2" in load_stack(stack).templates
    (stack / "templates" / "bin.j2").write_bytes(b"\xff\xfe")
    with pytest.raises(StackError, match="not UTF-8"):
        load_stack(stack)


def test_policy_name_defaults_to_file_stem(tmp_path):
    write_stack(tmp_path / "s", {"motd.yaml": {"resources": [{"file": "/etc/motd", "content": "x"}]}})
    assert load_stack(tmp_path / "s").policies[0].name == "motd"


def test_only_referenced_files_are_shipped(tmp_path):
    stack = write_stack(tmp_path / "s", one([{"file": "/etc/x", "source": "used"}]),
                        files={"used": b"1", "unused": b"2" * 1000})
    assert set(load_stack(stack).files) == {"used"}


def test_policy_file_path_given_is_a_file_not_folder(tmp_path):
    root = write_stack(tmp_path / "s", one([{"file": "/etc/x"}]))
    (root / "dir.yaml").mkdir()
    with pytest.raises(StackError, match="regular file"):
        load_stack(Path(root))
