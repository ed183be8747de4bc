"""`vigocli stack ...`: build, check and sign policy stacks. Works with no server and no Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vigo.cli import client, output
from vigo.cli.options import Address, JsonFlag
from vigo.durable import OPEN_MODE, atomic_write
from vigo.errors import ConfigError, StackError

app = typer.Typer(
    help="Build, check, sign and push policy stacks (build/check/keygen work offline: no server, no Ray).",
    no_args_is_help=True,
)


@app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option("--out", help="private key file to write (mode 0600); KEY.pub is written beside it")],
    force: Annotated[bool, typer.Option("--force", help="overwrite existing key files")] = False,
) -> None:
    """Create an Ed25519 bundle-signing key pair: KEY (private, 0600) and KEY.pub.

    Keep KEY where bundles are built; give KEY.pub to envoys (`vigo-envoy apply --trust`).
    This key signs policy only; it is separate from any TLS key on purpose.
    """
    from vigo.crypto.keys import generate_keypair, key_id, load_public_key

    private, public = generate_keypair(out, force=force)
    typer.echo(f"wrote {private} (private, 0600) and {public} (public), key id {key_id(load_public_key(public))}")


@app.command("check")
def check(
    stack_dir: Annotated[Path, typer.Argument(help="the stack folder")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Validate a stack without signing anything: YAML schema, conditions, templates, paths, cycles."""
    from vigo.policy.stack import load_stack

    stack = load_stack(stack_dir)
    info = _stack_info(stack)
    if as_json:
        typer.echo(json.dumps(info))
    else:
        typer.echo(f"stack {stack.root}: {info['policies']} policies, {info['resources']} resources, "
                   f"{info['templates']} templates, {info['files']} files: ok")


@app.command("build")
def build(
    stack_dir: Annotated[Path, typer.Argument(help="the stack folder")],
    signing_key: Annotated[Path, typer.Option("--signing-key", help="private key from `vigocli stack keygen`")],
    out: Annotated[Path, typer.Option("--out", help="bundle file to write")],
    serial: Annotated[int | None, typer.Option("--serial", help="bundle serial; default: max(now in unix seconds, serial of the bundle at --out + 1)")] = None,
    secrets_file: Annotated[Path | None, typer.Option("--secrets", help="YAML/JSON mapping of secret name -> value, for the secrets policies reference")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the bundle summary as JSON")] = False,
) -> None:
    """Validate STACK_DIR and write a signed PolicyBundle.

    Every problem names the file, policy and resource and what was expected. The bundle is
    msgpack, self-contained (templates and referenced files inside), versioned by content
    hash, with a serial that only grows, signed with Ed25519. Only the secrets the policies
    reference are included.
    """
    from vigo.crypto.keys import load_private_key
    from vigo.policy import bundle as bundle_mod
    from vigo.policy.stack import load_stack

    key = load_private_key(signing_key)
    stack = load_stack(stack_dir)
    secrets = _load_secrets(secrets_file) if secrets_file else {}
    chosen = serial if serial is not None else max(int(time.time()), _previous_serial(out, key) + 1)
    built = bundle_mod.build(stack, signing_key=key, serial=chosen, secrets=secrets)
    data = built.encode()
    try:
        atomic_write(out, data, mode=OPEN_MODE, tmp=out.with_name(f".{out.name}.tmp"))
    except OSError as exc:
        raise ConfigError(f"cannot write bundle {out}: {exc.strerror or exc}") from exc
    info = {**built.summary(), "out": str(out), "bytes": len(data), "key_id": built.key_id,
            "secrets": sorted(built.secrets)}
    if as_json:
        typer.echo(json.dumps(info))
    else:
        typer.echo(
            f"wrote {out}: version {built.version} serial {built.serial}, "
            f"{info['policies']} policies, {info['resources']} resources, {len(data)} bytes, "
            f"signed by key {built.key_id}"
        )


def _stack_info(stack: Any) -> dict[str, Any]:
    return {
        "stack": str(stack.root),
        "policies": len(stack.policies),
        "resources": sum(len(p.resources) for p in stack.policies),
        "templates": len(stack.templates),
        "files": len(stack.files),
        "secrets": stack.secret_names(),
    }


def _previous_serial(out: Path, key: Any) -> int:
    """Serial of the bundle already at ``out`` (if it verifies with our key), else 0."""
    from vigo.errors import BundleError
    from vigo.policy import bundle as bundle_mod

    try:
        return bundle_mod.decode(out.read_bytes(), key.public_key(), origin=str(out)).serial
    except (OSError, BundleError):
        return 0


def _load_secrets(path: Path) -> dict[str, str]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read secrets file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise StackError(f"secrets file is not valid YAML/JSON: {exc}", file=str(path)) from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str | int | float) for k, v in data.items()):
        raise StackError("secrets file must map names to values", file=str(path), expected="name: value pairs", got=type(data).__name__)
    return {k: str(v) for k, v in data.items()}


def stack_files(stack_dir: Path) -> dict[str, bytes]:
    """What `stack push` uploads: the policies, templates/ and files/ of a validated stack."""
    from vigo.policy.stack import load_stack

    stack = load_stack(stack_dir)
    root = stack.root
    out: dict[str, bytes] = {}
    for policy in stack.policies:
        out[policy.file] = (root / policy.file).read_bytes()
    for rel, text in stack.templates.items():
        out[f"templates/{rel}"] = text.encode()
    for rel, data in stack.files.items():
        out[f"files/{rel}"] = data
    return out


@app.command("push")
def push(
    stack_dir: Annotated[Path, typer.Argument(help="the stack folder")],
    address: Address = client.DEFAULT_ADDRESS,
    as_json: JsonFlag = False,
) -> None:
    """Validate STACK_DIR here, upload it; the server validates again, builds and signs a
    bundle with the next serial and its term, and tells connected envoys to converge."""
    files = stack_files(stack_dir)
    result = client.admin(address, "stack.push", {"files": files, "name": stack_dir.resolve().name})
    if as_json:
        output.emit_json(result)
    else:
        typer.echo(f"pushed {stack_dir}: bundle {result['version']} serial {result['serial']} term {result['term']}, "
                   f"{result['policies']} policies, {result['resources']} resources"
                   + (f", secrets {', '.join(result['secrets'])}" if result["secrets"] else ""))


@app.command("show")
def show(address: Address = client.DEFAULT_ADDRESS, as_json: JsonFlag = False) -> None:
    """The bundle the server hands out now, and the last pushes."""
    result = client.admin(address, "stack.show")
    if as_json:
        output.emit_json(result)
        return
    if result is None:
        typer.echo("no stack pushed yet: vigocli stack push DIR")
        return
    s = result["summary"]
    typer.echo(output.kv([("version", result["version"]), ("serial", result["serial"]), ("term", result["term"]),
                          ("pushed", output.when(result["pushed_at"])), ("policies", s["policies"]),
                          ("resources", s["resources"]), ("secrets", ", ".join(s["secrets"]) or "none"),
                          ("files", len(s["files"]))]))
    typer.echo("\n" + output.table([(h["serial"], h["version"], output.when(h["pushed_at"])) for h in result["history"]],
                                   ["SERIAL", "VERSION", "PUSHED"]))
