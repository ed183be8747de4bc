"""How long `vigo-envoy apply` takes, and how much memory it uses, on a 1,000-file stack.

The figures an operator sees: the real CLI in a fresh process every time (interpreter start,
imports, bundle verification, LMDB, traits, converge, report), timed from outside with
``time.perf_counter`` around the child and its peak RSS taken from ``os.wait4``.

The stack is generated in a temporary folder and built with ``vigocli stack keygen`` /
``vigocli stack build``, as an operator would:

* 10 policies of 100 templated ``file`` resources each (``--files`` changes the total), every
  policy under a ``when:`` over traits and every other resource under its own ``when:`` (all
  true on any host, so every resource is evaluated *and* applied);
* the files spread over 4 managed ``directory`` resources under one managed base directory;
* content from 3 Jinja2 templates using traits (hostname, cpus), per-policy vars and a loop;
  mode 0644.

Scenarios, each repeated ``--repeat`` times with a fresh root and state dir (after one unmeasured
warm-up run that fills the page cache and a private .pyc cache, see ``python_env``):

* ``first``: apply to an empty root, every file and directory is created;
* ``unchanged``: apply the same bundle again, nothing may change.

When ``cf-agent`` is installed, an equivalent CFEngine 3 policy (same files, same bytes, same
modes, classes equivalent to the ``when:`` conditions, mustache templates through
``edit_template``) runs side by side with its own fresh work directory per repeat, and the
vigo/cf-agent ratios are printed. A wrong count or a wrong byte fails the benchmark (exit 1);
the targets (first run <= 2 s, unchanged run <= 0.5 s, peak RSS <= 60 MB) are informative only.

Writes ``benchmarks/results/envoy_apply.json``.

    .venv/bin/python benchmarks/envoy_apply.py [--repeat 5] [--files 1000] [--keep] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Runnable as a plain script from a checkout, without installing vigo into the interpreter.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vigo

RESULTS_PATH = Path(__file__).parent / "results" / "envoy_apply.json"

#: From the issue; compared against the medians (times) and the worst repeat (RSS).
TARGETS = {"first_run_s": 2.0, "unchanged_run_s": 0.5, "peak_rss_mb": 60.0}

POLICIES = 10
BASE_DIR = "/srv/vigo-bench"
SUBDIRS = ("alpha", "beta", "gamma", "delta")
# True on every host (cpus >= 1), but still parsed and evaluated like a real condition.
POLICY_WHEN = 'os.family == "debian" or cpus >= 1'
RESOURCE_WHEN = 'cpus >= 1 and hostname != ""'
# What `vigo-envoy apply` imports before converging this stack (the two resource modules are
# loaded lazily, on the first resource of their type).
APPLY_IMPORTS = (
    "vigo.agent, vigo.agent.cli, vigo.agent.engine, vigo.agent.runner, "
    "vigo.agent.resources.file, vigo.agent.resources.directory"
)

# Each template twice: Jinja2 for vigo, mustache for CFEngine. Loops end on a non-blank line so
# that mustache's "standalone tag" whitespace rule and Jinja2's (no trim_blocks) agree byte for
# byte; the benchmark checks that they do.
TEMPLATES: dict[str, tuple[str, str]] = {
    "service.conf": (
        "# Managed by vigo; generated for {{ traits.hostname }}.\n"
        "[service]\n"
        "policy = {{ vars.policy }}\n"
        "owner = {{ vars.owner }}\n"
        "threads = {{ traits.cpus }}\n"
        "{% for w in vars.workers %}worker = {{ w }}@{{ traits.hostname }}\n{% endfor %}"
        "# end of {{ vars.policy }}\n",
        "# Managed by vigo; generated for {{hostname}}.\n"
        "[service]\n"
        "policy = {{policy}}\n"
        "owner = {{owner}}\n"
        "threads = {{cpus}}\n"
        "{{#workers}}worker = {{.}}@{{hostname}}\n{{/workers}}"
        "# end of {{policy}}\n",
    ),
    "limits.conf": (
        "# {{ vars.policy }} limits on {{ traits.hostname }} ({{ traits.cpus }} cpus)\n"
        "nofile = {{ vars.nofile }}\n"
        "{% for w in vars.workers %}{{ w }}.nproc = {{ vars.nofile }}\n{% endfor %}"
        "# owner {{ vars.owner }}\n",
        "# {{policy}} limits on {{hostname}} ({{cpus}} cpus)\n"
        "nofile = {{nofile}}\n"
        "{{#workers}}{{.}}.nproc = {{nofile}}\n{{/workers}}"
        "# owner {{owner}}\n",
    ),
    "motd": (
        "Welcome to {{ traits.hostname }}, managed by {{ vars.owner }} (policy {{ vars.policy }}).\n"
        "Local edits are overwritten on the next run.\n",
        "Welcome to {{hostname}}, managed by {{owner}} (policy {{policy}}).\n"
        "Local edits are overwritten on the next run.\n",
    ),
}


class BenchmarkError(Exception):
    """A run did not do what it must (wrong counts, wrong bytes): the figures would be lies."""


def log(message: str) -> None:
    print(f"[envoy_apply {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The stack


@dataclass
class ManagedFile:
    path: str  # managed absolute path (re-based under the run's root)
    template: str
    conditional: bool  # carries its own resource-level `when:`


@dataclass
class Plan:
    files: int
    policies: list[list[ManagedFile]] = field(default_factory=list)

    @property
    def directories(self) -> list[str]:
        return [BASE_DIR] + [f"{BASE_DIR}/{d}" for d in SUBDIRS]


def make_plan(files: int) -> Plan:
    count = min(POLICIES, files)
    plan = Plan(files, [[] for _ in range(count)])
    names = sorted(TEMPLATES)
    for i in range(files):
        members = plan.policies[i * count // files]
        members.append(
            ManagedFile(
                path=f"{BASE_DIR}/{SUBDIRS[i % len(SUBDIRS)]}/p{i * count // files:02d}-f{i:04d}.conf",
                template=names[i % len(names)],
                conditional=len(members) % 2 == 0,
            )
        )
    return plan


def policy_vars(index: int) -> dict[str, Any]:
    return {
        "policy": f"p{index:02d}",
        "owner": f"team-{index % 3}",
        "nofile": 1024 * (index + 1),
        "workers": [f"w{index}-{k}" for k in range(4 + index % 3)],
    }


def q(value: Any) -> str:
    """Quoted for YAML and CFEngine alike: JSON strings and flow mappings are valid in both."""
    return json.dumps(value)


def write_vigo_stack(stack: Path, plan: Plan) -> None:
    (stack / "templates").mkdir(parents=True)
    for name, (jinja, _) in TEMPLATES.items():
        (stack / "templates" / f"{name}.j2").write_text(jinja)
    lines = ["name: bench-dirs", "resources:"]
    for d in plan.directories:
        lines += [f"  - directory: {q(d)}", '    mode: "0755"']
    (stack / "00-dirs.yaml").write_text("\n".join(lines) + "\n")
    for index, members in enumerate(plan.policies):
        lines = [
            f"name: bench-p{index:02d}",
            f"when: {q(POLICY_WHEN)}",
            f"vars: {q(policy_vars(index))}",
            "resources:",
        ]
        for m in members:
            lines += [f"  - file: {q(m.path)}", f"    template: {m.template}.j2", '    mode: "0644"']
            if m.conditional:
                lines.append(f"    when: {q(RESOURCE_WHEN)}")
        (stack / f"p{index:02d}.yaml").write_text("\n".join(lines) + "\n")


def write_cf_policy(policy_dir: Path, plan: Plan) -> Path:
    """The same desired state in CFEngine 3: one bundle (and file) per vigo policy.

    Conditions become classes: ``os.family == "debian" or cpus >= 1`` is ``debian|cpus_ge_1``
    and the resource-level ``cpus >= 1 and hostname != ""`` is ``cpus_ge_1.has_hostname``.
    Traits become ``sys.host`` (the kernel's node name, like Python's gethostname) and
    ``sys.cpus``. The root comes from the environment so that one policy serves every repeat,
    as ``--root`` does for vigo.
    """
    (policy_dir / "templates").mkdir(parents=True)
    for name, (_, mustache) in TEMPLATES.items():
        (policy_dir / "templates" / f"{name}.mustache").write_text(mustache)
    tdir = policy_dir / "templates"
    bundles = ["vigo_bench_dirs"] + [f"vigo_bench_p{i:02d}" for i in range(len(plan.policies))]
    inputs = [f"p{i:02d}.cf" for i in range(len(plan.policies))]
    main = [
        "body common control",
        "{",
        f"  bundlesequence => {{ {', '.join(q(b) for b in bundles)} }};",
        f"  inputs => {{ {', '.join(q(i) for i in inputs)} }};",
        "}",
        "",
        "bundle common vigo_bench",
        "{",
        "  vars:",
        '      "root" string => getenv("VIGO_BENCH_CF_ROOT", "4096");',
        "  classes:",
        '      "cpus_ge_1" expression => isgreaterthan("$(sys.cpus)", "0");',
        '      "has_hostname" not => strcmp("", "$(sys.host)");',
        "}",
        "",
        "bundle agent vigo_bench_dirs",
        "{",
        "  files:",
    ]
    for d in plan.directories:
        main += [f'      "$(vigo_bench.root){d}/."', '        create => "true", perms => vigo_bench_mode("0755");']
    main += [
        "}",
        "",
        "body perms vigo_bench_mode(m)",
        "{",
        '  mode => "$(m)";',
        '  rxdirs => "false";',
        "}",
        "",
        "# vigo keeps no backup of a replaced file either.",
        "body edit_defaults vigo_bench_no_backup",
        "{",
        '  edit_backup => "false";',
        "}",
    ]
    (policy_dir / "promises.cf").write_text("\n".join(main) + "\n")

    for index, members in enumerate(plan.policies):
        data = {"hostname": "$(sys.host)", "cpus": "$(sys.cpus)", **policy_vars(index)}
        text = [
            f"bundle agent vigo_bench_p{index:02d}",
            "{",
            "  vars:",
            f"      \"d\" data => parsejson('{json.dumps(data)}');",
            "  classes:",
            '      "policy_active" expression => "debian|cpus_ge_1";',
            "  files:",
        ]
        for cond in (False, True):
            text.append("    policy_active.cpus_ge_1.has_hostname::" if cond else "    policy_active::")
            for m in (m for m in members if m.conditional == cond):
                text += [
                    f'      "$(vigo_bench.root){m.path}"',
                    '        create => "true",',
                    '        perms => vigo_bench_mode("0644"),',
                    "        edit_defaults => vigo_bench_no_backup,",
                    f'        edit_template => "{tdir / m.template}.mustache",',
                    '        template_method => "mustache",',
                    "        template_data => @(d);",
                ]
        text.append("}")
        (policy_dir / f"p{index:02d}.cf").write_text("\n".join(text) + "\n")
    return policy_dir / "promises.cf"


# --------------------------------------------------------------------------------------------
# Measuring one process


@dataclass
class Proc:
    wall_s: float
    maxrss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run_measured(argv: list[str], *, env: dict[str, str] | None = None) -> Proc:
    """Run ``argv`` to completion: wall time, exit code, output, and *this child's* peak RSS.

    ``getrusage(RUSAGE_CHILDREN)`` is a maximum over every child ever reaped, so it cannot
    tell one run from the next; ``os.wait4`` returns the rusage of the one child it reaps
    (including descendants it reaped itself, such as cf-agent's cf-promises). Output goes to
    temporary files, not pipes, so a large JSON report cannot block the child while we wait.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        return Proc(
            wall_s=wall,
            maxrss_mb=usage.ru_maxrss / 1024,  # KiB on Linux; "MB" here means MiB
            returncode=proc.returncode,
            stdout=out.read().decode(errors="replace"),
            stderr=err.read().decode(errors="replace"),
        )


def must(ok: bool, message: str, proc: Proc | None = None) -> None:
    if not ok:
        detail = ""
        if proc is not None:
            detail = f"\n--- exit {proc.returncode}; stderr:\n{proc.stderr[-3000:]}\n--- stdout:\n{proc.stdout[:3000]}"
        raise BenchmarkError(message + detail)


REPO_VENV_BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"


def tool(name: str) -> str:
    """``name`` next to this interpreter, else in the checkout's .venv, else on PATH."""
    for folder in (Path(sys.executable).parent, REPO_VENV_BIN):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise BenchmarkError(f"{name} not found next to {sys.executable}, in {REPO_VENV_BIN} nor on PATH")
    return found


def envoy_python() -> str:
    """The interpreter `vigo-envoy` runs under (its shebang), so that import times are the
    envoy's even when this script is started with another Python."""
    with open(tool("vigo-envoy"), "rb") as f:
        first = f.readline().decode(errors="replace").strip()
    shebang = first[2:].strip() if first.startswith("#!") else ""
    return shebang if shebang and " " not in shebang and Path(shebang).exists() else sys.executable


def python_env(tmp: Path, *, bytecode_cache: bool) -> dict[str, str]:
    """Environment for the Python children (vigocli, vigo-envoy, import timing).

    A host gets vigo from pip, which writes .pyc files at install time. A development shell
    may set PYTHONDONTWRITEBYTECODE (this one's sandbox does), and then every envoy process
    recompiles every vigo module from source, about 70 ms per run. By default the children
    share a bytecode cache in the temp folder instead (filled by the warm-up run), which is
    what an installed envoy sees, and the checkout gets no __pycache__ folders.
    """
    env = dict(os.environ)
    if bytecode_cache:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    return env


# --------------------------------------------------------------------------------------------
# vigo


@dataclass
class Built:
    bundle: Path
    public_key: Path
    build_s: float
    env: dict[str, str]  # for every Python child that follows


def build_bundle(tmp: Path, stack: Path, env: dict[str, str]) -> Built:
    vigocli = tool("vigocli")
    key = tmp / "bench.key"
    proc = run_measured([vigocli, "stack", "keygen", "--out", str(key)], env=env)
    must(proc.returncode == 0, "vigocli stack keygen failed", proc)
    bundle = tmp / "bench.bundle"
    proc = run_measured(
        [vigocli, "stack", "build", str(stack), "--signing-key", str(key), "--out", str(bundle), "--json"],
        env=env,
    )
    must(proc.returncode == 0, "vigocli stack build failed", proc)
    return Built(bundle, key.with_name(key.name + ".pub"), proc.wall_s, env)


def vigo_apply(built: Built, root: Path, state: Path, traits_dir: Path) -> tuple[Proc, dict[str, Any]]:
    proc = run_measured([
        tool("vigo-envoy"), "apply", "--bundle", str(built.bundle), "--trust", str(built.public_key),
        "--root", str(root), "--state-dir", str(state), "--traits-dir", str(traits_dir), "--json",
    ], env=built.env)
    must(proc.returncode == 0, "vigo-envoy apply did not exit 0", proc)
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        raise BenchmarkError(f"vigo-envoy apply --json printed no JSON:\n{proc.stdout[:2000]}") from None
    return proc, report


def check_vigo_report(report: dict[str, Any], plan: Plan, *, first: bool, proc: Proc | None = None) -> None:
    counts = report["counts"]
    total = plan.files + len(plan.directories)
    files_changed = sum(1 for r in report["resources"] if r["type"] == "file" and r["status"] == "changed")
    must(counts["failed"] == 0, f"vigo: {counts['failed']} resources failed: {counts}", proc)
    must(counts["skipped"] == 0, f"vigo: {counts['skipped']} resources skipped (a when: was false?): {counts}", proc)
    if first:
        must(
            counts["changed"] == total and files_changed == plan.files,
            f"vigo first run: expected {plan.files} files + {len(plan.directories)} directories "
            f"changed, got {files_changed} files, counts {counts}",
        )
    else:
        must(counts["changed"] == 0 and counts["ok"] == total, f"vigo unchanged run changed something: {counts}")


def read_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file under ``root``: relative path -> (bytes, permission bits)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            out[str(path.relative_to(root))] = (path.read_bytes(), path.stat().st_mode & 0o7777)
    return out


def check_tree(tree: dict[str, tuple[bytes, int]], plan: Plan, who: str) -> None:
    expected = {m.path.lstrip("/") for members in plan.policies for m in members}
    extra, missing = sorted(set(tree) - expected), sorted(expected - set(tree))
    must(not extra and not missing, f"{who}: files differ from the plan: missing {missing[:5]}, extra {extra[:5]}")
    wrong_mode = [p for p, (_, mode) in tree.items() if mode != 0o644]
    must(not wrong_mode, f"{who}: files not mode 0644: {wrong_mode[:5]}")


# --------------------------------------------------------------------------------------------
# CFEngine


def cf_version(cf_agent: str) -> str:
    return subprocess.run([cf_agent, "--version"], capture_output=True, text=True, check=False).stdout.strip()


def cf_apply(cf_agent: str, promises: Path, root: Path, workdir: Path) -> Proc:
    env = {**os.environ, "VIGO_BENCH_CF_ROOT": str(root)}
    # -K: ignore ifelapsed locks, or the unchanged run would be skipped as "too soon" rather
    # than evaluated. -w: state in our temp dir, never /var/lib/cfengine3. -I: one line per
    # repair, so we can tell that the unchanged run repaired nothing.
    proc = run_measured([cf_agent, "-K", "-I", "-w", str(workdir), "-f", str(promises)], env=env)
    must(proc.returncode == 0, "cf-agent did not exit 0", proc)
    output = proc.stdout + proc.stderr
    must("error:" not in output and "warning:" not in output, "cf-agent reported errors or warnings", proc)
    return proc


def cf_workdir(path: Path) -> Path:
    # cf-agent validates a policy by running WORKDIR/bin/cf-promises (and falls back to a
    # failsafe policy without it), so a private workdir needs that binary linked in.
    (path / "bin").mkdir(parents=True)
    promises_bin = shutil.which("cf-promises") or "/usr/bin/cf-promises"
    (path / "bin" / "cf-promises").symlink_to(promises_bin)
    return path


def repairs(proc: Proc) -> int:
    """Promises repaired, from -I output (one "info:" line each, besides the workdir notice)."""
    lines = (proc.stdout + proc.stderr).splitlines()
    return sum(1 for line in lines if "info:" in line and "Setting workdir" not in line)


# --------------------------------------------------------------------------------------------
# Import time


def import_times(statement: str, rounds: int, env: dict[str, str]) -> list[float]:
    """Seconds to run ``statement`` first thing in a fresh interpreter (startup excluded)."""
    code = f"import time\nt = time.perf_counter()\n{statement}\nprint(time.perf_counter() - t)"
    samples = []
    for _ in range(rounds):
        done = subprocess.run([envoy_python(), "-c", code], capture_output=True, text=True, check=False, env=env)
        must(done.returncode == 0, f"{statement!r} failed: {done.stderr[-2000:]}")
        samples.append(float(done.stdout.strip()))
    return samples


# --------------------------------------------------------------------------------------------
# Figures


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "raw": [round(s, 4) for s in samples],
        "median": round(statistics.median(samples), 4),
        "min": round(min(samples), 4),
        "max": round(max(samples), 4),
    }


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def profile(built: Built, plan: Plan, tmp: Path) -> None:
    """cProfile one first and one unchanged run in this process (imports already paid)."""
    import cProfile
    import pstats

    from vigo.agent.runner import RunOptions, apply_once

    opts = RunOptions(
        state_dir=tmp / "profile-state", bundle_path=built.bundle, trust_path=built.public_key,
        root=tmp / "profile-root", traits_dir=tmp / "empty-traits",
    )
    for label in ("first", "unchanged"):
        prof = cProfile.Profile()
        start = time.perf_counter()
        prof.enable()
        report = apply_once(opts)
        prof.disable()
        elapsed = time.perf_counter() - start
        check_vigo_report(report, plan, first=label == "first")
        print(f"\n=== cProfile, {label} run in-process ({elapsed:.3f} s with profiling), top 15 cumulative")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(15)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Time `vigo-envoy apply` (fresh process per run) on a generated stack of templated "
            "files: a first run to an empty root and an unchanged re-run, with peak RSS and "
            "import time, side by side with cf-agent on an equivalent CFEngine policy when it "
            "is installed. Fails (exit 1) if a run does not create, or leaves changed, exactly "
            "what it must. Writes benchmarks/results/envoy_apply.json."
        ),
    )
    parser.add_argument("--repeat", type=int, default=5, help="first/unchanged pairs per tool, each with a fresh root (default 5)")
    parser.add_argument("--files", type=int, default=1000, help="templated file resources, spread over 10 policies (default 1000)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (stacks, bundles, roots) and print its path")
    parser.add_argument("--profile", action="store_true", help="also cProfile one first and one unchanged run in this process (top 15 cumulative; needs vigo's dependencies in this interpreter)")
    parser.add_argument("--no-cfengine", action="store_true", help="skip the cf-agent comparison even when it is installed")
    parser.add_argument(
        "--no-bytecode-cache", action="store_true",
        help="run Python children with the inherited environment; with PYTHONDONTWRITEBYTECODE "
             "set, vigo's modules are then compiled from source in every run (default: a "
             ".pyc cache in the temp folder, as on an installed host)",
    )
    args = parser.parse_args()
    if args.repeat < 1 or args.files < 1:
        parser.error("--repeat and --files must be at least 1")

    tmp = Path(tempfile.mkdtemp(prefix="vigo-envoy-bench-"))
    try:
        results = run(args, tmp)
    except BenchmarkError as exc:
        print(f"envoy_apply: FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(results)
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS_PATH}")
    return 0


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    plan = make_plan(args.files)
    traits_dir = tmp / "empty-traits"
    traits_dir.mkdir()
    stack = tmp / "stack"
    write_vigo_stack(stack, plan)
    log(f"stack: {len(plan.policies)} policies, {args.files} files, {len(plan.directories)} directories in {stack}")
    built = build_bundle(tmp, stack, python_env(tmp, bytecode_cache=not args.no_bytecode_cache))
    log(f"built {built.bundle} ({built.bundle.stat().st_size} bytes) in {built.build_s:.2f} s")

    # Warm-up run, not measured: it fills the bytecode cache and the page cache.
    vigo_apply(built, tmp / "warm-root", tmp / "warm-state", traits_dir)
    reference: dict[str, tuple[bytes, int]] = {}
    vigo_runs: dict[str, list[Proc]] = {"first": [], "unchanged": []}
    for r in range(args.repeat):
        root, state = tmp / f"vigo-root-{r}", tmp / f"vigo-state-{r}"
        for label in ("first", "unchanged"):
            proc, report = vigo_apply(built, root, state, traits_dir)
            check_vigo_report(report, plan, first=label == "first", proc=proc)
            vigo_runs[label].append(proc)
            log(f"vigo {label:9} #{r + 1}: {proc.wall_s:.3f} s, {proc.maxrss_mb:.1f} MB, counts {report['counts']}")
        tree = read_tree(root)
        check_tree(tree, plan, "vigo")
        if not reference:
            reference = tree
            sample = next(iter(sorted(tree)))
            must(
                socket.gethostname().encode() in tree[sample][0],
                f"vigo: {sample} does not mention the hostname, were traits rendered?",
            )
        must(tree == reference, f"vigo: repeat {r + 1} wrote different bytes than repeat 1")
        if not args.keep:
            shutil.rmtree(root)

    cf_agent = None if args.no_cfengine else shutil.which("cf-agent")
    cf_runs: dict[str, list[Proc]] = {"first": [], "unchanged": []}
    if cf_agent:
        promises = write_cf_policy(tmp / "cfengine", plan)
        cf_apply(cf_agent, promises, tmp / "cf-warm-root", cf_workdir(tmp / "cf-warm-work"))
        for r in range(args.repeat):
            root, work = tmp / f"cf-root-{r}", cf_workdir(tmp / f"cf-work-{r}")
            first = cf_apply(cf_agent, promises, root, work)
            check_tree(read_tree(root), plan, "cf-agent")
            unchanged = cf_apply(cf_agent, promises, root, work)
            must(repairs(first) >= args.files, f"cf-agent first run repaired only {repairs(first)} promises", first)
            must(repairs(unchanged) == 0, "cf-agent unchanged run repaired something", unchanged)
            different = [p for p, v in read_tree(root).items() if reference.get(p) != v]
            must(not different, f"cf-agent wrote other bytes or modes than vigo: {different[:5]}")
            for label, proc in (("first", first), ("unchanged", unchanged)):
                cf_runs[label].append(proc)
                log(f"cf-agent {label:9} #{r + 1}: {proc.wall_s:.3f} s, {proc.maxrss_mb:.1f} MB")
            if not args.keep:
                shutil.rmtree(root)
    else:
        log("cf-agent not installed (or --no-cfengine): no comparison")

    log("import times (5 fresh interpreters each)")
    import_times(f"import {APPLY_IMPORTS}", 1, built.env)  # warm-up, as above
    imports = {
        "import vigo.agent": summary(import_times("import vigo.agent", 5, built.env)),
        f"import {APPLY_IMPORTS}": summary(import_times(f"import {APPLY_IMPORTS}", 5, built.env)),
    }
    startup = summary([run_measured([envoy_python(), "-c", "pass"], env=built.env).wall_s for _ in range(5)])

    if args.profile:
        profile(built, plan, tmp)

    return assemble(args, plan, built, vigo_runs, cf_runs, cf_agent, imports, startup)


def assemble(
    args: argparse.Namespace,
    plan: Plan,
    built: Built,
    vigo_runs: dict[str, list[Proc]],
    cf_runs: dict[str, list[Proc]],
    cf_agent: str | None,
    imports: dict[str, Any],
    startup: dict[str, Any],
) -> dict[str, Any]:
    def figures(runs: dict[str, list[Proc]]) -> dict[str, Any]:
        return {
            label: {
                "wall_s": summary([p.wall_s for p in procs]),
                "peak_rss_mb": summary([p.maxrss_mb for p in procs]),
            }
            for label, procs in runs.items()
        }

    vigo_fig = figures(vigo_runs)
    out: dict[str, Any] = {
        "benchmark": "envoy_apply",
        "machine": {
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "kernel": platform.release(),
            "python": sys.version.split()[0],
            "vigo": vigo.__version__,
            "cf_agent": cf_version(cf_agent) if cf_agent else None,
            # Other work on the machine shows up as spread between repeats; this says how busy it was.
            "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "parameters": {
            "repeat": args.repeat,
            "files": plan.files,
            "policies": len(plan.policies),
            "directories": len(plan.directories),
            "templates": len(TEMPLATES),
            "resources_with_own_when": sum(m.conditional for ms in plan.policies for m in ms),
            "policy_when": POLICY_WHEN,
            "resource_when": RESOURCE_WHEN,
            "bundle_bytes": built.bundle.stat().st_size,
            "build_s": round(built.build_s, 4),
            "bytecode_cache": not args.no_bytecode_cache,
        },
        "vigo": vigo_fig,
        "imports_s": imports,
        "python_startup_s": startup,
        "cfengine": None,
        "ratios_vigo_over_cf": None,
    }
    if cf_agent:
        cf_fig = figures(cf_runs)
        out["cfengine"] = {
            "method": "files promises with edit_template + template_method mustache "
                      "(template_data from parsejson of sys.host/sys.cpus and per-policy vars), "
                      "perms mode 0644, create true, edit_backup false; cf-agent -K -I -w WORKDIR -f",
            **cf_fig,
        }
        out["ratios_vigo_over_cf"] = {
            "first_run_wall": ratio(vigo_fig["first"]["wall_s"]["median"], cf_fig["first"]["wall_s"]["median"]),
            "unchanged_run_wall": ratio(vigo_fig["unchanged"]["wall_s"]["median"], cf_fig["unchanged"]["wall_s"]["median"]),
            "first_run_peak_rss": ratio(vigo_fig["first"]["peak_rss_mb"]["max"], cf_fig["first"]["peak_rss_mb"]["max"]),
            "unchanged_run_peak_rss": ratio(vigo_fig["unchanged"]["peak_rss_mb"]["max"], cf_fig["unchanged"]["peak_rss_mb"]["max"]),
        }
    measured = {
        "first_run_s": vigo_fig["first"]["wall_s"]["median"],
        "unchanged_run_s": vigo_fig["unchanged"]["wall_s"]["median"],
        "peak_rss_mb": max(vigo_fig[k]["peak_rss_mb"]["max"] for k in ("first", "unchanged")),
    }
    out["targets"] = {
        name: {"target": limit, "measured": measured[name], "meets": measured[name] <= limit}
        for name, limit in TARGETS.items()
    }
    return out


def print_table(res: dict[str, Any]) -> None:
    cf = res["cfengine"]
    ratios = res["ratios_vigo_over_cf"] or {}
    p = res["parameters"]
    print(
        f"\nvigo-envoy apply: {p['files']} templated files in {p['policies']} policies "
        f"(+{p['directories']} directories), {p['repeat']} repeats, fresh process per run"
    )
    m = res["machine"]
    print(f"machine: {m['cpus']} cpus, load {'/'.join(map(str, m['loadavg_at_end']))}, Python {m['python']}, "
          f"vigo {m['vigo']}, {m['cf_agent'] or 'no cf-agent'}")
    print(f"bundle: {p['bundle_bytes']} bytes, built in {p['build_s']:.2f} s; "
          f"Python bytecode cache {'on' if p['bytecode_cache'] else 'as inherited'}\n")

    def cell(fig: dict[str, Any], unit: str) -> str:
        return f"{fig['median']:7.3f} {unit} [{fig['min']:.3f}-{fig['max']:.3f}]"

    header = f"{'':24}{'vigo-envoy (median [min-max])':34}" + (f"{'cf-agent':34}vigo/cf" if cf else "")
    print(header)
    print("-" * len(header))
    rows = [
        ("first run", "first", "wall_s", "s", "first_run_wall"),
        ("unchanged run", "unchanged", "wall_s", "s", "unchanged_run_wall"),
        ("peak RSS, first", "first", "peak_rss_mb", "MB", "first_run_peak_rss"),
        ("peak RSS, unchanged", "unchanged", "peak_rss_mb", "MB", "unchanged_run_peak_rss"),
    ]
    for title, label, metric, unit, key in rows:
        other = cell(cf[label][metric], unit) if cf else ""
        r = ratios.get(key)
        line = f"{title:24}{cell(res['vigo'][label][metric], unit):34}{other:34}{'' if r is None else f'{r:.2f}x'}"
        print(line.rstrip())
    print("(RSS ratios compare the worst repeat of each; times compare medians)")
    if cf:
        print(f"cf-agent policy: {cf['method']}")

    print("\nimport time in a fresh interpreter (median [min-max], startup excluded):")
    for stmt, fig in res["imports_s"].items():
        print(f"  {fig['median'] * 1000:6.1f} ms [{fig['min'] * 1000:.1f}-{fig['max'] * 1000:.1f}]  {stmt}")
    s = res["python_startup_s"]
    print(f"  {s['median'] * 1000:6.1f} ms  python -c pass (interpreter start, for reference)")

    print("\ntargets (informative; the exit code does not depend on them):")
    units = {"first_run_s": "s (median)", "unchanged_run_s": "s (median)", "peak_rss_mb": "MB (worst run)"}
    for name, t in res["targets"].items():
        verdict = "meets" if t["meets"] else "misses"
        print(f"  {name:16} {t['measured']:8.3f} {units[name]:15} target <= {t['target']:<5}  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
