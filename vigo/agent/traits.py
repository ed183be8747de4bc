"""Traits: the facts an envoy collects about its host at the start of every run.

A cached PolicyBundle is evaluated against *fresh* traits, so a host that changed while the
server was away (new IP, more memory, an upgraded OS) still converges to the right policy. That
puts collection on every run's critical path, which sets the rules for this module:

* **Fast and never hanging.** No subprocess for built-ins, no network lookups (see ``_fqdn``),
  no heavy imports at module load: ``json``, ``yaml``, ``subprocess`` and ``tempfile`` are
  imported only when a source needs them. A full collection takes well under a millisecond
  without custom sources (``benchmarks/traits_collect.py``).
* **Never fatal.** A built-in that cannot be read becomes ``None``; a broken custom source is
  recorded in ``traits["trait_errors"]``, logged, and skipped, and the other sources still apply.
* **Stable.** Only facts that change when the host changes are collected (total memory, not
  free memory), so ``traits_digest`` moves only when something an operator cares about moved.
  ``collected_at`` is the one volatile key, and the digest leaves it out.

Custom traits come from ``traits_dir`` (default ``/etc/vigo-envoy/traits.d``):

* ``*.yaml`` / ``*.yml`` / ``*.json`` files each hold a mapping (an empty YAML file counts as an
  empty mapping);
* any other regular file with an executable bit is run with no arguments, cwd ``traits_dir``,
  and must print a JSON object on stdout. Executables run concurrently under one shared
  deadline, and a timed-out one is killed with its whole process group;
* hidden files (``.name``), backups (``name~``), directories and non-executable files of other
  types are ignored.

Every source's top-level keys are merged *shallowly* into ``traits["custom"]`` in sorted
file-name order, whatever the source's kind: a later file replaces an earlier file's key
wholesale (nested mappings are not merged). Custom traits never shadow built-ins: they live only
under ``"custom"``. Keys must be strings at every level; values that are not JSON types (YAML
dates and timestamps) are converted to strings, so the result is always ``json.dumps``-able.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import vigo
from vigo import hostaddr
from vigo.errors import TraitError, clipped_repr

__all__ = ["TRAITS_DIR_DEFAULT", "collect", "traits_digest"]

log = logging.getLogger("vigo.agent.traits")

#: Where custom trait sources live on a managed host.
TRAITS_DIR_DEFAULT = Path("/etc/vigo-envoy/traits.d")
#: Default wall-clock limit for all custom trait executables together (they run concurrently).
SCRIPT_TIMEOUT_S = 5.0
#: Largest trait file or executable output accepted. Traits travel with every check-in, so a
#: source that produces more than this is a mistake, and refusing it keeps check-ins small.
MAX_SOURCE_BYTES = 1024 * 1024
#: Bytes of an executable's stderr quoted in its trait error (the tail, where the cause usually is).
STDERR_KEEP_BYTES = 300

_DATA_SUFFIXES = (".yaml", ".yml", ".json")

# ``ID`` / ``ID_LIKE`` words (os-release(5)) -> the family policies branch on. ``ID`` is tried
# first, then each ``ID_LIKE`` word in order, so a derivative (Mint: "ubuntu debian", Rocky:
# "rhel centos fedora") lands in its parent's family.
_OS_FAMILIES = {
    "debian": "debian",
    "ubuntu": "debian",
    "rhel": "redhat",
    "centos": "redhat",
    "fedora": "redhat",
    "rocky": "redhat",
    "almalinux": "redhat",
    "alma": "redhat",
    "ol": "redhat",
    "amzn": "redhat",
    "alpine": "alpine",
    "suse": "suse",
    "opensuse": "suse",
    "opensuse-leap": "suse",
    "opensuse-tumbleweed": "suse",
    "sles": "suse",
    "sled": "suse",
    "arch": "arch",
    "archarm": "arch",
}

def collect(
    traits_dir: Path | None = None,
    *,
    script_timeout_s: float = SCRIPT_TIMEOUT_S,
    proc_root: Path = Path("/"),
) -> dict[str, Any]:
    """Collect this host's traits as a plain, JSON-serialisable dict.

    ``traits_dir`` defaults to ``TRAITS_DIR_DEFAULT``; a missing directory means no custom
    traits. ``proc_root`` re-bases the files read for built-ins (``etc/os-release``,
    ``etc/hosts``, ``etc/resolv.conf``, ``proc/meminfo``, ``proc/net/if_inet6``) so tests can
    point them at fixtures. Never raises for a broken host file or trait source.
    """
    collected_at = time.time()
    root = Path(proc_root)
    hostname = socket.gethostname()
    interfaces = hostaddr.interfaces(root)
    traits: dict[str, Any] = {
        "hostname": hostname,
        "fqdn": _fqdn(hostname, root),
        "os": _os(root),
        "kernel": _kernel(),
        "arch": _uname()[2],
        "cpus": os.cpu_count(),
        "memory": {"total_mb": _memory_total_mb(root)},
        "ips": hostaddr.sort_addresses({a for addrs in interfaces.values() for a in addrs}),
        "interfaces": interfaces,
        "python": {
            "version": "{}.{}.{}".format(*sys.version_info[:3]),
            "implementation": sys.implementation.name,
        },
        "vigo": {"version": vigo.__version__},
        "collected_at": collected_at,
    }
    custom, errors = _custom(
        TRAITS_DIR_DEFAULT if traits_dir is None else Path(traits_dir), script_timeout_s
    )
    traits["custom"] = custom
    traits["trait_errors"] = errors
    return traits


def traits_digest(traits: dict[str, Any]) -> str:
    """A sha256 hex digest of ``traits`` that ignores ``collected_at``, for change detection.

    Canonical JSON (sorted keys, no whitespace), so two collections of an unchanged host give
    the same digest whatever order their dicts were built in.
    """
    import hashlib
    import json

    stable = {k: v for k, v in traits.items() if k != "collected_at"}
    text = json.dumps(stable, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- built-ins ---------------------------------------------------------------------------------


def _read_text(path: Path) -> str | None:
    """A host file's text, or None when it is absent or unreadable (a built-in is then None)."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        log.debug("cannot read %s: %s", path, exc)
        return None


def _uname() -> tuple[str, str, str]:
    """(kernel name, kernel release, machine)."""
    # os.uname is one syscall; platform.uname would cost ~12 ms of imports for the same answer.
    if hasattr(os, "uname"):
        u = os.uname()
        return u.sysname, u.release, u.machine
    import platform  # Windows has no os.uname; the envoy does not target it, but stay correct.

    p = platform.uname()
    return p.system, p.release, p.machine


def _kernel() -> dict[str, str]:
    sysname, release, _ = _uname()
    return {"name": sysname, "release": release}


def _fqdn(hostname: str, root: Path) -> str:
    """The host's fully qualified name, derived from local files only: never a DNS query.

    ``socket.getfqdn`` and ``getaddrinfo(AI_CANONNAME)`` go through NSS, which falls through to
    DNS when the name is not in ``/etc/hosts``; with an unreachable resolver that blocks for the
    resolver timeout (5 s per attempt by default), on every run, exactly when the network is
    down — when an offline-first envoy most needs to run on time. ``getfqdn`` is also often
    wrong on real hosts (it returns "localhost" when the hostname is an alias on the 127.0.0.1
    line). So, in order, like Facter's fallbacks:

    1. a hostname that already contains a dot is the FQDN;
    2. ``/etc/hosts``: on a line that names the hostname, the first dotted name whose first
       label is the hostname (the Debian ``127.0.1.1 web1.example.com web1`` convention);
    3. ``/etc/resolv.conf``: hostname + ``domain``, else + the first ``search`` domain;
    4. the bare hostname.
    """
    if "." in hostname.strip("."):
        return hostname
    short = hostname.lower()

    hosts = _read_text(root / "etc/hosts") or ""
    for line in hosts.splitlines():
        names = line.split("#", 1)[0].split()[1:]
        if short not in (n.lower() for n in names):
            continue
        for name in names:
            first, dot, rest = name.partition(".")
            if dot and rest and first.lower() == short:
                return name

    domain = search = None
    for line in (_read_text(root / "etc/resolv.conf") or "").splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "domain":
            domain = words[1]
        elif len(words) >= 2 and words[0] == "search" and search is None:
            search = words[1]
    suffix = (domain or search or "").strip(".")
    return f"{hostname}.{suffix}" if suffix else hostname


def _parse_os_release(text: str) -> dict[str, str]:
    """os-release(5) is shell-compatible ``KEY=value`` with optional quotes and backslashes."""
    fields: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            quote, value = value[0], value[1:-1]
            if quote == '"':
                for escaped in ("\\\\", '\\"', "\\$", "\\`"):
                    value = value.replace(escaped, escaped[1])
        fields[key.strip()] = value
    return fields


def _os(root: Path) -> dict[str, str | None]:
    """``{family, name, version, codename}``; ``name`` is os-release's lower-case ``ID``."""
    sysname, release, _ = _uname()
    system = sysname.lower()
    if system != "linux":
        return {"family": system, "name": system, "version": release, "codename": None}

    # os-release(5): /etc/os-release wins, /usr/lib/os-release is the vendor's fallback.
    text = _read_text(root / "etc/os-release")
    if text is None:
        text = _read_text(root / "usr/lib/os-release")
    fields = _parse_os_release(text or "")
    os_id = fields.get("ID", "").lower() or system
    family = os_id
    for word in [os_id, *fields.get("ID_LIKE", "").lower().split()]:
        if word in _OS_FAMILIES:
            family = _OS_FAMILIES[word]
            break
    else:
        if os_id.startswith("opensuse"):
            family = "suse"
    return {
        "family": family,
        "name": os_id,
        "version": fields.get("VERSION_ID") or None,
        "codename": fields.get("VERSION_CODENAME") or fields.get("UBUNTU_CODENAME") or None,
    }


def _memory_total_mb(root: Path) -> int | None:
    for line in (_read_text(root / "proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            words = line.split()
            # The kernel always reports kB; anything else means a file we do not understand.
            if len(words) >= 3 and words[1].isdigit() and words[2] == "kB":
                return int(words[1]) // 1024
            return None
    return None


# --- custom traits -----------------------------------------------------------------------------


def _custom(traits_dir: Path, timeout_s: float) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Load every custom source in ``traits_dir``; returns (merged traits, trait errors)."""
    try:
        entries = sorted(os.scandir(traits_dir), key=lambda e: e.name)
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        message = f"expected a readable traits directory, got {exc.strerror or exc}"
        log.warning("custom traits in %s ignored: %s", traits_dir, message)
        return {}, [_error(traits_dir, message)]

    # Classify first, so executables can all be started before any data file is parsed.
    data_files: list[Path] = []
    executables: list[Path] = []
    errors: dict[Path, str] = {}
    for entry in entries:
        if entry.name.startswith(".") or entry.name.endswith("~"):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir():
                continue
            if entry.name.endswith(_DATA_SUFFIXES):
                data_files.append(path)  # Read errors (a dangling link) are reported on load.
            elif entry.is_file() and entry.stat().st_mode & 0o111:
                executables.append(path)
            else:
                log.debug("ignoring %s: not a data file and not executable", path)
        except OSError as exc:
            errors[path] = f"cannot inspect the file: {exc}"

    results: dict[Path, dict[str, Any]] = {}
    if executables:
        for path, outcome in _run_executables(executables, traits_dir, timeout_s).items():
            _settle(path, outcome, results, errors)
    for path in data_files:
        try:
            outcome: dict[str, Any] | TraitError = _load_data_file(path)
        except TraitError as exc:
            outcome = exc
        except Exception as exc:
            # PyYAML raises plain ValueError for some values (`day: 2024-13-45`), and one odd
            # file must never cost the envoy its run.
            outcome = TraitError(f"expected a loadable mapping, got an error: {exc}")
        _settle(path, outcome, results, errors)

    # Merge in file-name order whatever the kind, so the outcome never depends on which
    # executable happened to finish first.
    custom: dict[str, Any] = {}
    for path in sorted(results, key=lambda p: p.name):
        custom.update(results[path])
    trait_errors = []
    for path in sorted(errors, key=lambda p: p.name):
        log.warning("custom trait source %s ignored: %s", path, errors[path])
        trait_errors.append(_error(path, errors[path]))
    return custom, trait_errors


def _settle(
    path: Path,
    outcome: dict[str, Any] | TraitError,
    results: dict[Path, dict[str, Any]],
    errors: dict[Path, str],
) -> None:
    """Normalise one source's mapping into ``results``, or record why it is unusable."""
    if isinstance(outcome, TraitError):
        errors[path] = str(outcome)
        return
    try:
        results[path] = _jsonable(outcome, "")
    except TraitError as exc:
        errors[path] = str(exc)
    except RecursionError:
        # A self-referencing YAML anchor (`&a [*a]`) loads as a cyclic structure.
        errors[path] = "expected a finite tree of values, got a self-referencing structure"


def _error(source: Path, message: str) -> dict[str, str]:
    return {"source": str(source), "error": message}


def _read_source(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SOURCE_BYTES + 1)
    except OSError as exc:
        raise TraitError(f"cannot read the file: {exc.strerror or exc}") from exc
    if len(data) > MAX_SOURCE_BYTES:
        raise TraitError(f"expected at most {MAX_SOURCE_BYTES} bytes, got more")
    return data


def _load_data_file(path: Path) -> dict[str, Any]:
    data = _read_source(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TraitError(f"expected UTF-8 text, got undecodable bytes ({exc.reason})") from exc

    if path.suffix == ".json":
        import json

        try:
            value = json.loads(text)
        except ValueError as exc:
            raise TraitError(f"expected a JSON object, got invalid JSON ({exc})") from exc
        return _require_mapping(value, "a JSON object")

    try:
        import yaml
    except ImportError as exc:  # pyyaml is a dependency, but a broken install must not kill runs.
        raise TraitError("cannot load YAML: PyYAML is not installed") from exc
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # The C loader is ~10x faster.
    try:
        value = yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        # The file is parsed from a string, so PyYAML's "<unicode string>" names nothing useful.
        detail = " ".join(str(exc).replace(' in "<unicode string>",', " at").split())
        raise TraitError(f"expected a YAML mapping, got invalid YAML ({detail})") from exc
    if value is None:
        return {}  # An empty file (or only comments) is a placeholder, not a mistake.
    return _require_mapping(value, "a YAML mapping")


def _require_mapping(value: object, expected: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TraitError(f"expected {expected} at the top level, got {_describe(value)}")
    return value


def _run_executables(
    paths: list[Path], cwd: Path, timeout_s: float
) -> dict[Path, dict[str, Any] | TraitError]:
    """Run every executable at once and give each what is left of one shared deadline.

    Output goes to unnamed temporary files, not pipes: a chatty script cannot block on a full
    pipe while we wait on a slower one, and a background grandchild that keeps the write end
    open cannot make us wait past the deadline.
    """
    import contextlib
    import subprocess
    import tempfile

    outcomes: dict[Path, dict[str, Any] | TraitError] = {}
    with contextlib.ExitStack() as files:
        running = []
        deadline = time.monotonic() + timeout_s
        for path in paths:
            out = files.enter_context(tempfile.TemporaryFile())
            err = files.enter_context(tempfile.TemporaryFile())
            try:
                proc = subprocess.Popen(
                    [str(path)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=cwd,
                    # Its own process group, so a timeout kills the script's children too.
                    start_new_session=True,
                )
            except OSError as exc:
                outcomes[path] = TraitError(f"cannot execute: {exc.strerror or exc}")
                continue
            running.append((path, proc, out, err))

        for path, proc, out, err in running:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                outcomes[path] = TraitError(
                    f"expected to finish within {timeout_s:g} s, "
                    "got still running at the deadline (killed)"
                )
                continue
            try:
                outcomes[path] = _parse_script_output(proc.returncode, out, err)
            except OSError as exc:  # Reading our own temp file back: unlikely, never fatal.
                outcomes[path] = TraitError(f"cannot read its output back: {exc}")
    return outcomes


def _kill_group(proc: Any) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, AttributeError):
        proc.kill()
    proc.wait()


def _parse_script_output(returncode: int, out: Any, err: Any) -> dict[str, Any] | TraitError:
    import json

    if returncode != 0:
        err.seek(0, os.SEEK_END)
        err.seek(max(0, err.tell() - STDERR_KEEP_BYTES))
        tail = err.read().decode("utf-8", "replace").strip()
        status = (
            f"killed by signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        )
        message = f"expected exit status 0, got {status}"
        return TraitError(f"{message}; stderr: {clipped_repr(tail)}" if tail else message)

    out.seek(0)
    data = out.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        return TraitError(f"expected at most {MAX_SOURCE_BYTES} bytes on stdout, got more")
    text = data.decode("utf-8", "replace")
    try:
        value = json.loads(text)
    except ValueError as exc:
        return TraitError(
            f"expected a JSON object on stdout, got non-JSON output {clipped_repr(text)} ({exc})"
        )
    if not isinstance(value, dict):
        return TraitError(f"expected a JSON object on stdout, got {_describe(value)}")
    return value


def _jsonable(value: Any, where: str) -> Any:
    """``value`` with only JSON types: string keys required, other scalars turned to strings.

    Keys are not coerced, because YAML turns ``on:``/``yes:`` into ``True`` and ``80:`` into
    ``80``; saying so is kinder than silently renaming a trait. Values such as YAML dates become
    their ISO text, which is what an operator wrote.
    """
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                at = f" under {where!r}" if where else ""
                raise TraitError(
                    f"expected string keys, got {key!r} ({type(key).__name__}){at}; "
                    "quote it in YAML"
                )
            out[key] = _jsonable(item, f"{where}.{key}" if where else key)
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, where) for item in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _describe(value: object) -> str:
    """What arrived, for a message: its JSON kind and a clipped rendering."""
    kinds = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    if value is None:
        return "null"
    return f"{kinds.get(type(value), type(value).__name__)} {clipped_repr(value)}"
