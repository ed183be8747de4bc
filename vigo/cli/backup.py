"""`vigocli backup ...`: the partition's whole state as one encrypted, verifiable file.

`create` runs on the server (the admin channel carries a key derived here, never the
passphrase); `list`, `verify` and `restore` run here, on files or file:// / s3:// URLs, and need
no server. The unit format is described in vigo/snapshots/backupformat.py.
"""

from __future__ import annotations

import getpass
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from vigo.cli import client, output
from vigo.cli.options import Address, JsonFlag
from vigo.errors import ConfigError
from vigo.snapshots import backup

app = typer.Typer(
    help=(
        "Create, list, verify and restore encrypted backups: one file holding the database, the "
        "stack, server.yaml, the secrets and the TLS material. The passphrase comes from "
        "--key-file FILE, else env VIGO_BACKUP_PASSPHRASE, else a prompt on the terminal."
    ),
    no_args_is_help=True,
)
ADDR = client.DEFAULT_ADDRESS
PASSPHRASE_ENV = "VIGO_BACKUP_PASSPHRASE"
#: Shortest passphrase or key file `create` accepts, bytes: the unit guards the CA key and
#: every secret, so a typo'd two-letter passphrase must not make it past the prompt.
MIN_PASSPHRASE_BYTES = 12
#: Least time between two progress updates on a terminal, seconds.
PROGRESS_INTERVAL_S = 0.1

KeyFile = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        help="read the passphrase from FILE (its bytes, less one trailing newline)",
        show_default=f"env {PASSPHRASE_ENV}, else a prompt on the terminal",
        dir_okay=False,
    ),
]
EndpointUrl = Annotated[
    str | None,
    typer.Option(
        "--endpoint-url", envvar="AWS_ENDPOINT_URL", metavar="URL",
        help="the S3-compatible service (MinIO, Ceph, ...) for s3:// locations; credentials come "
             "from the usual boto3 sources",
        show_default="AWS",
    ),
]
Location = Annotated[str, typer.Argument(help="a backup file, or a file:// or s3:// URL of one", metavar="PATH|URL")]


def _unwrapped(fn: Any) -> Any:
    """Join each docstring paragraph into one line: Typer keeps the line breaks of every
    paragraph after the first, which breaks `--help` at odd places on any terminal width."""
    paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
    fn.__doc__ = "\n\n".join(" ".join(p.split()) for p in paragraphs)
    return fn



@app.command("create")
@_unwrapped
def create(
    out: Annotated[str, typer.Option(
        "--out", metavar="PATH|URL",
        help=("where the server writes the backup: a file path on the server host (relative paths are "
              "made absolute here, which is right when the server runs on this machine), an existing "
              "folder (named vigo-PARTITION-TIMESTAMP.vgb inside it), or a file:// or s3:// URL "
              "(ending in / for a generated name; s3:// uses the archive's endpoint_url from "
              "server.yaml). An existing file is never overwritten."))],
    key_file: KeyFile = None,
    address: Address = ADDR,
    as_json: JsonFlag = False,
) -> None:
    """Write an encrypted backup of the running partition (on the server).

    A consistent snapshot of the database, taken while the server keeps serving, plus the
    stack, server.yaml, secrets/ and tls/, encrypted with AES-256-GCM under a key derived from
    your passphrase (scrypt, n=2^17, r=8, p=1).

    The key is derived on this machine and only the key goes to the server, over the
    certificate-pinned admin channel; the passphrase never leaves here. Asked twice when
    prompted. Without the passphrase nobody can restore this backup, including you: keep it
    apart from the backup.
    """
    secret = _passphrase(key_file, confirm=True)
    if len(secret) < MIN_PASSPHRASE_BYTES:
        raise ConfigError(f"a backup passphrase needs at least {MIN_PASSPHRASE_BYTES} characters (it guards "
                          f"the CA key and every secret), got {len(secret)}")
    where = out if out.startswith(("file://", "s3://")) else os.path.abspath(os.path.expanduser(out))
    _say("deriving the key (scrypt) ...")
    key = backup.BackupKey.from_passphrase(secret)
    _say(f"writing the backup on the server to {where} ...")
    result = client.admin(address, "backup.create",
                          {"out": where, "key": key.key, "salt": key.salt, "kdf": key.kdf()})
    if as_json:
        output.emit_json(result)
        return
    typer.echo(output.kv([
        ("backup", result["path"]),
        ("partition", result["partition"]),
        ("created", output.when(result["created_at"])),
        ("size", _size(result["size"])),
        ("entries", f"{result['entries']} (the database, {result['database_pages']} pages, and "
                    f"{result['entries'] - 1} tree files)"),
        ("took", f"{result['seconds']:.1f} s"),
    ]))
    typer.echo(f"\ncheck it with: vigocli backup verify {result['path']}")


@app.command("list")
@_unwrapped
def list_cmd(
    location: Annotated[str, typer.Argument(
        help="a folder (or one file), or a file:// or s3:// URL prefix", metavar="FOLDER|URL")],
    endpoint_url: EndpointUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """List backups in a folder or under a URL prefix, newest first.

    Shows the facts from their plaintext headers (created, partition, size). Needs no passphrase, and so proves nothing about the contents:
    `backup verify` does. A file that looks like a backup but cannot be read is listed with
    the reason instead of stopping the listing."""
    rows = backup.list_backups(location, progress=_Progress(), endpoint_url=endpoint_url)
    if as_json:
        output.emit_json(rows)
        return
    headers = ["CREATED", "PARTITION", "SIZE", "NAME"]
    errors = any(r["error"] for r in rows)
    table = [(output.when(r["created_at"]), r["partition"], _size(r["size"]), r["name"],
              *([r["error"] or ""] if errors else [])) for r in rows]
    typer.echo(output.table(table, headers + (["ERROR"] if errors else [])))


@app.command("verify")
@_unwrapped
def verify(location: Location, key_file: KeyFile = None, endpoint_url: EndpointUrl = None,
           as_json: JsonFlag = False) -> None:
    """Check every byte of a backup without restoring it.

    Decrypts every entry (each one authenticated), compares every sha256 with the manifest,
    runs PRAGMA integrity_check on the database snapshot and compares the tree files with the database's rows. Exits 0 only if all
    of it holds; otherwise names the entry that failed (a wrong passphrase is reported as such).
    The decrypted database lives in a private temp folder while it is checked, then is deleted."""
    secret = _passphrase(key_file, confirm=False)
    result = backup.verify_backup(location, secret, progress=_Progress(), endpoint_url=endpoint_url)
    if as_json:
        output.emit_json(result)
        return
    db = result["database"]
    trees = result["entry_count"] - 1
    typer.echo(output.kv([
        ("backup", result["path"]),
        ("partition", result["partition"]),
        ("created", f"{output.when(result['created_at'])} ({output.ago(result['created_at'])})"),
        ("vigo version", result["vigo_version"]),
        ("entries", f"{result['entry_count']} (database {_size(result['entries'][0]['size'])}, {trees} tree files)"),
        ("database", f"{db['page_count']} pages, integrity_check {db['integrity']}"),
        ("rows", ", ".join(f"{name} {count}" for name, count in db["tables"].items())),
    ]))
    typer.echo(f"\nok: every entry authenticates and matches the manifest ({result['seconds']:.1f} s)")


@app.command("restore")
@_unwrapped
def restore(
    location: Location,
    data_dir: Annotated[Path, typer.Option(
        "--data-dir", help="the server data dir to create; must be empty or missing unless --force",
        file_okay=False)],
    force: Annotated[bool, typer.Option(
        "--force", help=("replace the database (with its -wal/-shm) and the trees of a non-empty data dir; "
                         "other files there are left and listed"))] = False,
    key_file: KeyFile = None,
    endpoint_url: EndpointUrl = None,
    as_json: JsonFlag = False,
) -> None:
    """Restore a backup into a new server data dir.

    Verifies the whole backup first (as `backup verify`), then writes its database into
    DATA_DIR atomically and the stack, server.yaml, secrets/ and tls/ from it. Nothing is written before
    the whole backup checked out. Stop any server using DATA_DIR first.

    Replication and archive state is not in a backup: the restored server starts a fresh
    archive generation, and standbys are added again."""
    secret = _passphrase(key_file, confirm=False)
    result = backup.restore_backup(location, secret, data_dir, force=force, progress=_Progress(),
                                   endpoint_url=endpoint_url)
    if as_json:
        output.emit_json(result)
        return
    rows: list[tuple[str, Any]] = [
        ("restored", result["path"]),
        ("into", result["data_dir"]),
        ("partition", f"{result['partition']} (backup of {output.when(result['created_at'])})"),
        ("database", _size(result["database_bytes"])),
        ("tree files", result["tree_files"]),
    ]
    if result["replaced"]:
        rows.append(("replaced", ", ".join(result["replaced"])))
    if result["kept"]:
        rows.append(("left as is", ", ".join(result["kept"])))
    typer.echo(output.kv(rows))
    typer.echo(f"\nstart it with: vigocli server start --dev --data-dir {result['data_dir']}"
               "  (or set data_dir in server.yaml and `vigocli server deploy`)")


def _passphrase(key_file: Path | None, *, confirm: bool) -> bytes:
    """--key-file, else the environment, else the terminal; never a command-line value (it would
    show in the process list and the shell history)."""
    if key_file is not None:
        try:
            return backup.key_file_secret(key_file.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read the backup key file {key_file}: {exc.strerror or exc}") from exc
    env = os.environ.get(PASSPHRASE_ENV)
    if env is not None:
        if not env:
            raise ConfigError(f"{PASSPHRASE_ENV} is set but empty; set the passphrase or unset it to be asked")
        return env.encode()
    if not sys.stdin.isatty():
        raise ConfigError(f"no backup passphrase: pass --key-file FILE or set {PASSPHRASE_ENV} "
                          "(standard input is not a terminal, so it cannot be asked for)")
    first = getpass.getpass("backup passphrase (not echoed): ")
    if not first:
        raise ConfigError("the backup passphrase is empty")
    if confirm and getpass.getpass("the same passphrase again: ") != first:
        raise ConfigError("the two passphrases differ; nothing was written")
    return first.encode()


class _Progress:
    """Progress on stderr: one line rewritten in place on a terminal; elsewhere (logs, CI) one
    line per finished phase, so the output stays readable."""

    LABELS = {"snapshot": ("copying the database", "pages"), "write": ("encrypting", "bytes"),
              "download": ("downloading", "bytes"), "read": ("decrypting and checking", "bytes"),
              "check": ("PRAGMA integrity_check and trees", "steps"), "restore": ("writing the trees", "steps"),
              "list": ("reading headers", "files")}

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self.started: dict[str, float] = {}

    def __call__(self, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        start = self.started.setdefault(phase, now)
        finished = done >= total
        if not finished and (not self.tty or now - self.last < PROGRESS_INTERVAL_S):
            return
        self.last = now
        label, unit = self.LABELS.get(phase, (phase, "steps"))
        if unit == "bytes":
            amount = f"{_size(done)} of {_size(total)}"
        elif unit == "steps":
            amount = "done" if finished else "..."
        else:
            amount = f"{done} of {total} {unit}"
        percent = f"{100 * done // total:3d}% " if total and unit != "steps" else ""
        line = f"{label}: {percent}{amount}" + (f" ({now - start:.1f} s)" if finished else "")
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line + ("\n" if finished else ""))
            sys.stderr.flush()
        else:
            _say(line)


def _say(text: str) -> None:
    typer.echo(text, err=True)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
