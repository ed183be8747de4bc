"""Traits: built-ins from fixture host files, custom sources from real files and real scripts."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vigo
from vigo.agent import traits
from vigo.agent.traits import TRAITS_DIR_DEFAULT, collect, traits_digest
from vigo.hostaddr import sort_addresses


def write(path: Path, text: str, *, executable: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if executable:
        path.chmod(0o755)
    return path


def script(directory: Path, name: str, body: str) -> Path:
    return write(directory / name, "#!/bin/sh\n" + body, executable=True)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty host root: built-ins read nothing from the real /etc and /proc."""
    r = tmp_path / "root"
    r.mkdir()
    return r


@pytest.fixture
def tdir(tmp_path: Path) -> Path:
    d = tmp_path / "traits.d"
    d.mkdir()
    return d


# --- built-ins ---------------------------------------------------------------------------------


def test_builtins_present_with_right_types(tmp_path: Path) -> None:
    t = collect(tmp_path / "absent")

    assert t["hostname"] == socket.gethostname()
    assert isinstance(t["fqdn"], str) and t["fqdn"]
    assert set(t["os"]) == {"family", "name", "version", "codename"}
    assert isinstance(t["os"]["family"], str) and t["os"]["family"]
    assert t["kernel"] == {"name": os.uname().sysname, "release": os.uname().release}
    assert t["arch"] == os.uname().machine
    assert t["cpus"] == os.cpu_count()
    assert isinstance(t["memory"]["total_mb"], int) and t["memory"]["total_mb"] > 0
    assert isinstance(t["ips"], list) and all(isinstance(a, str) for a in t["ips"])
    assert isinstance(t["interfaces"], dict)
    assert t["python"] == {
        "version": "{}.{}.{}".format(*sys.version_info[:3]),
        "implementation": sys.implementation.name,
    }
    assert t["vigo"] == {"version": vigo.__version__}
    assert isinstance(t["collected_at"], float)
    assert abs(t["collected_at"] - time.time()) < 60
    assert t["custom"] == {} and t["trait_errors"] == []


def test_output_is_json_serialisable_and_round_trips(tdir: Path) -> None:
    write(tdir / "a.yaml", "when: 2024-05-01\nat: 2024-05-01 10:00:00\nlist: [1, 2.5, null]\n")
    t = collect(tdir)

    assert json.loads(json.dumps(t, allow_nan=False)) == t
    assert t["custom"] == {
        "when": "2024-05-01",
        "at": "2024-05-01T10:00:00",
        "list": [1, 2.5, None],
    }


def test_ips_skip_loopback_and_link_local_and_are_sorted(root: Path) -> None:
    write(
        root / "proc/net/if_inet6",
        "00000000000000000000000000000001 01 80 10 80       lo\n"
        "fe800000000000000000000000000001 02 40 20 80     eth0\n"
        "fd000000000000000000000000000002 02 40 00 80     eth0\n"
        "20010db8000000000000000000000001 03 40 00 80     eth1\n"
        "garbage line\n",
    )
    t = collect(root / "no-traits", proc_root=root)

    v6 = [a for a in t["ips"] if ":" in a]
    assert v6 == ["2001:db8::1", "fd00::2"]
    assert "fd00::2" in t["interfaces"]["eth0"] and "2001:db8::1" in t["interfaces"]["eth1"]
    assert "lo" not in t["interfaces"]
    # IPv4 comes from the real kernel via ioctl: never loopback, and listed before IPv6.
    v4 = [a for a in t["ips"] if ":" not in a]
    assert not any(a.startswith("127.") for a in v4)
    assert t["ips"] == v4 + v6
    assert sorted(t["ips"]) == sorted({a for addrs in t["interfaces"].values() for a in addrs})


def test_addresses_sort_numerically() -> None:
    assert sort_addresses({"10.0.0.1", "9.0.0.1", "::2", "10.0.0.10"}) == [
        "9.0.0.1",
        "10.0.0.1",
        "10.0.0.10",
        "::2",
    ]


OS_RELEASES = {
    "debian": ('ID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n', "debian", "12"),
    "ubuntu": (
        'ID=ubuntu\nID_LIKE=debian\nVERSION_ID="22.04"\nUBUNTU_CODENAME=jammy\n',
        "debian",
        "22.04",
    ),
    "mint": ('ID=linuxmint\nID_LIKE="ubuntu debian"\nVERSION_ID="21.3"\n', "debian", "21.3"),
    "rhel": ('ID="rhel"\nID_LIKE="fedora"\nVERSION_ID="9.3"\n', "redhat", "9.3"),
    "rocky": ('ID="rocky"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.3"\n', "redhat", "9.3"),
    "alma": ('ID="almalinux"\nID_LIKE="rhel centos fedora"\nVERSION_ID="9.3"\n', "redhat", "9.3"),
    "fedora": ("ID=fedora\nVERSION_ID=40\n", "redhat", "40"),
    "alpine": ("ID=alpine\nVERSION_ID=3.19.1\n", "alpine", "3.19.1"),
    "suse": ('ID="opensuse-leap"\nID_LIKE="suse opensuse"\nVERSION_ID="15.5"\n', "suse", "15.5"),
    "arch": ("ID=arch\nBUILD_ID=rolling\n", "arch", None),
    "unknown": ('ID=nixos\nVERSION_ID="24.05"\n', "nixos", "24.05"),
}


@pytest.mark.parametrize("distro", sorted(OS_RELEASES))
def test_os_family_from_os_release(root: Path, distro: str) -> None:
    text, family, version = OS_RELEASES[distro]
    write(root / "etc/os-release", "# a comment\n\n" + text)

    got = collect(root / "none", proc_root=root)["os"]

    assert got["family"] == family
    assert got["version"] == version
    assert got["name"] == traits._parse_os_release(text)["ID"]


def test_os_codename_and_vendor_fallback(root: Path) -> None:
    # No /etc/os-release: os-release(5) says read /usr/lib/os-release.
    write(root / "usr/lib/os-release", 'ID=ubuntu\nVERSION_ID="24.04"\nUBUNTU_CODENAME=noble\n')
    assert collect(root / "none", proc_root=root)["os"] == {
        "family": "debian",
        "name": "ubuntu",
        "version": "24.04",
        "codename": "noble",
    }


def test_os_without_any_os_release_is_the_kernel_name(root: Path) -> None:
    got = collect(root / "none", proc_root=root)["os"]
    assert got == {"family": "linux", "name": "linux", "version": None, "codename": None}


def test_os_release_quoting() -> None:
    fields = traits._parse_os_release(
        'PRETTY_NAME="Debian \\"GNU\\"/Linux"\nNAME=\'Single\'\nID=debian\nBROKEN\n'
    )
    assert fields == {"PRETTY_NAME": 'Debian "GNU"/Linux', "NAME": "Single", "ID": "debian"}


def test_memory_from_meminfo(root: Path) -> None:
    write(root / "proc/meminfo", "MemTotal:        8048576 kB\nMemFree:  1000 kB\n")
    # kB rounded down to whole MiB: 8048576 / 1024 = 7859.9.
    assert collect(root / "none", proc_root=root)["memory"] == {"total_mb": 7859}


@pytest.mark.parametrize("text", ["", "MemTotal: lots\n", "MemFree: 1 kB\n"])
def test_memory_unknown_is_none_not_an_error(root: Path, text: str) -> None:
    write(root / "proc/meminfo", text)
    assert collect(root / "none", proc_root=root)["memory"] == {"total_mb": None}


FQDN_CASES = {
    "hosts canonical": ("web1", "127.0.1.1 web1.example.com web1\n", "", "web1.example.com"),
    "hosts alias": ("web1", "10.0.0.5 web1 web1.corp.example  # c\n", "", "web1.corp.example"),
    "localhost line skipped": (
        "web1",
        "127.0.0.1 localhost localhost.localdomain web1\n",
        "domain corp.example\n",
        "web1.corp.example",
    ),
    "other host ignored": ("web1", "10.0.0.6 web2.example.com web2\n", "", "web1"),
    "resolv search": ("web1", "", "search a.example b.example\n", "web1.a.example"),
    "resolv domain beats search": (
        "web1",
        "",
        "search a.example\ndomain d.example\n",
        "web1.d.example",
    ),
    "already dotted": ("web1.example.org", "127.0.1.1 other.example.com\n", "", "web1.example.org"),
    "nothing known": ("web1", "", "", "web1"),
}


@pytest.mark.parametrize("case", sorted(FQDN_CASES))
def test_fqdn_from_local_files(root: Path, case: str) -> None:
    hostname, hosts, resolv, expected = FQDN_CASES[case]
    write(root / "etc/hosts", hosts)
    write(root / "etc/resolv.conf", resolv)
    assert traits._fqdn(hostname, root) == expected


def test_collection_never_asks_dns(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError("traits must not resolve names")

    for name in ("getaddrinfo", "gethostbyname", "gethostbyaddr", "getfqdn", "gethostbyname_ex"):
        monkeypatch.setattr(socket, name, no_dns)
    assert collect(root / "none", proc_root=root)["fqdn"]


def test_import_is_light_and_never_imports_ray() -> None:
    code = (
        "import sys; import vigo.agent.traits as t; t.collect(t.Path('/nonexistent'));"
        "print(sorted(m for m in ('ray', 'yaml', 'subprocess', 'tempfile', 'platform')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_default_traits_dir() -> None:
    assert Path("/etc/vigo-envoy/traits.d") == TRAITS_DIR_DEFAULT


# --- custom traits: files ----------------------------------------------------------------------


def test_missing_traits_dir_means_no_custom_traits(tmp_path: Path) -> None:
    t = collect(tmp_path / "nope")
    assert t["custom"] == {} and t["trait_errors"] == []


def test_files_and_scripts_merge_in_file_name_order(tdir: Path) -> None:
    write(tdir / "10-base.yaml", "role: web\nshared: yaml\nnested: {a: 1, b: 2}\n")
    write(tdir / "20-more.json", '{"shared": "json", "dc": "ams1", "nested": {"c": 3}}')
    script(tdir, "30-script", 'echo \'{"shared": "script", "rack": 7}\'\n')
    write(tdir / "40-last.yml", "shared: yml\n")

    custom = collect(tdir)["custom"]

    # Later files win key by key; nested mappings are replaced whole (shallow merge).
    assert custom == {
        "role": "web",
        "dc": "ams1",
        "rack": 7,
        "shared": "yml",
        "nested": {"c": 3},
    }


def test_ignored_entries(tdir: Path) -> None:
    write(tdir / ".hidden.yaml", "hidden: true\n")
    write(tdir / "backup.yaml~", "backup: true\n")
    write(tdir / "README", "not executable, not data\n")
    script(tdir, ".hidden-script", "echo '{\"x\": 1}'\n")
    (tdir / "subdir.yaml").mkdir()
    write(tdir / "ok.json", '{"ok": true}')

    t = collect(tdir)

    assert t["custom"] == {"ok": True}
    assert t["trait_errors"] == []


def test_custom_never_shadows_builtins(tdir: Path) -> None:
    write(tdir / "evil.json", '{"hostname": "evil", "os": "none"}')
    t = collect(tdir)
    assert t["hostname"] == socket.gethostname()
    assert isinstance(t["os"], dict)
    assert t["custom"] == {"hostname": "evil", "os": "none"}


def test_empty_yaml_is_an_empty_mapping(tdir: Path) -> None:
    write(tdir / "empty.yaml", "# nothing yet\n")
    t = collect(tdir)
    assert t["custom"] == {} and t["trait_errors"] == []


def the_error(t: dict, name: str) -> str:
    """The one trait error for ``name``, after checking it names the full path."""
    matching = [e for e in t["trait_errors"] if Path(e["source"]).name == name]
    assert len(matching) == 1, t["trait_errors"]
    assert set(matching[0]) == {"source", "error"}
    assert Path(matching[0]["source"]).is_absolute()
    return matching[0]["error"]


def test_broken_yaml_is_reported_and_others_still_apply(
    tdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write(tdir / "a.yaml", "good: 1\n")
    write(tdir / "b.yaml", "bad: [unclosed\n")
    write(tdir / "c.json", '{"also_good": 2}')

    with caplog.at_level(logging.WARNING, logger="vigo.agent.traits"):
        t = collect(tdir)

    assert t["custom"] == {"good": 1, "also_good": 2}
    error = the_error(t, "b.yaml")
    assert "expected a YAML mapping" in error and "invalid YAML" in error
    assert any("b.yaml" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("list.json", "[1, 2]", "expected a JSON object at the top level, got a list [1, 2]"),
        ("str.yaml", "just a string\n", "expected a YAML mapping at the top level, got a string"),
        ("bad.json", "{nope", "expected a JSON object, got invalid JSON"),
        ("key.yaml", "80: http\n", "expected string keys, got 80 (int)"),
        ("nested.yaml", "ports:\n  on: 1\n", "got True (bool) under 'ports'"),
        ("loop.yaml", "a: &x [*x]\n", "self-referencing"),
        ("date.yaml", "day: 2024-13-45\n", "expected a loadable mapping, got an error: month"),
        ("binary.json", None, "expected UTF-8 text"),
    ],
)
def test_unusable_files_are_reported(
    tdir: Path, name: str, text: str | None, expected: str
) -> None:
    if text is None:
        (tdir / name).write_bytes(b'{"a": "\xff"}')
    else:
        write(tdir / name, text)
    write(tdir / "zz.json", '{"still": "here"}')

    t = collect(tdir)

    assert expected in the_error(t, name)
    assert t["custom"] == {"still": "here"}


def test_unreadable_file_is_reported(tdir: Path) -> None:
    # A dangling symlink: unreadable even for root, who ignores permission bits.
    (tdir / "gone.json").symlink_to(tdir / "missing-target.json")
    assert "cannot read the file" in the_error(collect(tdir), "gone.json")


def test_oversized_file_is_refused(tdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(traits, "MAX_SOURCE_BYTES", 16)
    write(tdir / "big.json", '{"a": "' + "x" * 64 + '"}')
    assert "expected at most 16 bytes" in the_error(collect(tdir), "big.json")


# --- custom traits: executables ----------------------------------------------------------------


def test_script_runs_in_traits_dir_with_no_arguments(tdir: Path) -> None:
    script(tdir, "where", 'printf \'{"cwd": "%s", "argc": %d}\' "$(pwd -P)" "$#"\n')
    assert collect(tdir)["custom"] == {"cwd": str(tdir.resolve()), "argc": 0}


def test_script_exit_status_is_reported_with_stderr(tdir: Path) -> None:
    script(tdir, "fails", 'echo "no database here" >&2\necho \'{"x": 1}\'\nexit 1\n')
    t = collect(tdir)
    error = the_error(t, "fails")
    assert "expected exit status 0, got exit status 1" in error
    assert "no database here" in error
    assert t["custom"] == {}


def test_script_non_json_output_is_reported(tdir: Path) -> None:
    script(tdir, "chatty", "echo hello world\n")
    script(tdir, "listy", "echo '[1, 2]'\n")
    t = collect(tdir)
    assert "expected a JSON object on stdout, got non-JSON output 'hello world" in the_error(
        t, "chatty"
    )
    assert "expected a JSON object on stdout, got a list" in the_error(t, "listy")


def test_unexecutable_script_is_reported(tdir: Path) -> None:
    write(tdir / "no-shebang", "\x00\x01 not a program", executable=True)
    assert "cannot execute" in the_error(collect(tdir), "no-shebang")


def test_script_timeout_kills_it_and_its_children(tdir: Path, tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    script(tdir, "slow", f"sleep 10 &\necho $! > {pidfile}\nwait\n")
    script(tdir, "fast", "echo '{\"fast\": true}'\n")

    start = time.monotonic()
    t = collect(tdir, script_timeout_s=0.3)
    elapsed = time.monotonic() - start

    assert elapsed < 2.0  # 6x the timeout: proves it does not wait for `sleep 10`.
    assert "expected to finish within 0.3 s" in the_error(t, "slow")
    assert t["custom"] == {"fast": True}
    # The whole process group was killed, not just the shell.
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 2.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_scripts_run_concurrently(tdir: Path, tmp_path: Path) -> None:
    # A rendezvous: each script marks itself started, then waits (up to 3 s) for the other's
    # mark. Run one after the other, the first would give up and report seen=false.
    for me, other in (("a", "b"), ("b", "a")):
        script(
            tdir,
            me,
            f"touch {tmp_path}/{me}.started\n"
            f"i=0\n"
            f"while [ ! -e {tmp_path}/{other}.started ] && [ $i -lt 60 ]; do\n"
            f"  sleep 0.05; i=$((i+1))\n"
            f"done\n"
            f"if [ -e {tmp_path}/{other}.started ]; then s=true; else s=false; fi\n"
            f'echo "{{\\"{me}_saw_{other}\\": $s}}"\n',
        )

    t = collect(tdir, script_timeout_s=5.0)

    assert t["trait_errors"] == []
    assert t["custom"] == {"a_saw_b": True, "b_saw_a": True}


def test_large_script_output_does_not_block(tdir: Path) -> None:
    # 200 kB is more than a pipe buffer: with pipes read one by one this could stall.
    payload = "x" * 200_000
    script(tdir, "big", f'printf \'{{"big": "%s"}}\' {payload}\n')
    script(tdir, "small", "echo '{\"small\": 1}'\n")
    custom = collect(tdir)["custom"]
    assert custom["small"] == 1 and len(custom["big"]) == 200_000


# --- digest ------------------------------------------------------------------------------------


def test_digest_is_stable_and_ignores_collected_at(tdir: Path, root: Path) -> None:
    write(root / "proc/meminfo", "MemTotal: 2048000 kB\n")
    write(tdir / "a.json", '{"b": 1, "a": [1, 2]}')

    first = collect(tdir, proc_root=root)
    time.sleep(0.01)
    second = collect(tdir, proc_root=root)

    assert first["collected_at"] != second["collected_at"]
    assert traits_digest(first) == traits_digest(second)
    assert len(traits_digest(first)) == 64
    # Key order does not matter, content does.
    assert traits_digest(dict(reversed(list(first.items())))) == traits_digest(first)
    write(tdir / "a.json", '{"b": 2, "a": [1, 2]}')
    assert traits_digest(collect(tdir, proc_root=root)) != traits_digest(first)


def test_collection_is_fast(tmp_path: Path) -> None:
    collect(tmp_path / "none")  # warm the lazy imports
    start = time.perf_counter()
    for _ in range(10):
        collect(tmp_path / "none")
    # A generous bound (real figures are ~1 ms): catches an accidental DNS lookup or fork.
    assert (time.perf_counter() - start) / 10 < 0.1


def test_traits_dir_that_is_a_file_is_reported(tmp_path: Path) -> None:
    not_a_dir = write(tmp_path / "traits.d", "oops")
    t = collect(not_a_dir)
    assert t["custom"] == {}
    assert t["trait_errors"] == [
        {
            "source": str(not_a_dir),
            "error": "expected a readable traits directory, got Not a directory",
        }
    ]
