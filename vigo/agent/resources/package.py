"""package: a package installed (optionally at an exact version) or absent.

One resource, several package managers. Each manager is a small provider class in this module
(apt, dnf, apk, pip) that knows three things: how to read the installed version, how to install
(a version), and how to remove. The resource itself owns the decision: read, compare with the
desired state, then change only if they differ, and read again to verify. Under ``--noop`` it
reads and reports "would ...", never changing anything.

The provider is the ``provider`` attribute, or follows the host's ``os.family`` trait. Every
command runs with stdin at EOF and the manager's non-interactive switches, so a prompt fails
the resource instead of hanging the run. The environment (``ctx.env`` over the envoy's own)
passes through unchanged, so a manager's own settings work: ``PIP_INDEX_URL``,
``PIP_FIND_LINKS``, ``http_proxy`` for apt, and so on.

Not done here on purpose: refreshing package indexes (``apt-get update``) — that is a separate,
slow, network-bound step an operator schedules with an exec.
"""

from __future__ import annotations

from typing import ClassVar

from vigo.agent.resources.base import (
    CHANGED,
    FAILED,
    OK,
    CommandResult,
    Outcome,
    Resource,
    RunContext,
    run_command,
)
from vigo.errors import ProviderMissingError, ResourceError


class Provider:
    """How one package manager reads, installs and removes a package."""

    name: ClassVar[str] = ""

    def __init__(self, python: str | None = None) -> None:
        self.python = python or "python3"

    @property
    def tools(self) -> tuple[str, ...]:
        raise NotImplementedError

    def read(self, package: str, ctx: RunContext) -> str | None:
        """The installed version, or None when not installed. ResourceError if unknowable."""
        raise NotImplementedError

    def install(self, package: str, version: str | None, ctx: RunContext) -> CommandResult:
        raise NotImplementedError

    def remove(self, package: str, ctx: RunContext) -> CommandResult:
        raise NotImplementedError

    def matches(self, installed: str, wanted: str) -> bool:
        """Whether the installed version satisfies an exact ``version:`` attribute."""
        return installed == wanted

    def missing_message(self) -> str:
        return (
            f"package provider {self.name!r} needs {'/'.join(self.tools)}, "
            "which is not on this host"
        )

    def _run(
        self, argv: list[str], ctx: RunContext, env: dict[str, str] | None = None
    ) -> CommandResult:
        try:
            # Stdin at EOF: an unexpected prompt ends the command instead of waiting forever.
            return run_command(argv, ctx, env=env, input_text="")
        except ResourceError:
            raise
        except OSError as exc:
            # The tool is there but cannot be run (permissions, broken binary): host trouble.
            raise ResourceError(f"cannot run `{argv[0]}`: {exc}") from exc


class Apt(Provider):
    name = "apt"
    #: dpkg states in which the package's files are in place and usable.
    INSTALLED_STATES = frozenset({"installed", "triggers-awaited", "triggers-pending"})
    ENV: ClassVar[dict[str, str]] = {"DEBIAN_FRONTEND": "noninteractive"}
    #: Keep locally changed config files and take the default for new ones, never asking.
    DPKG_OPTIONS = (
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    )

    @property
    def tools(self) -> tuple[str, ...]:
        return ("apt-get", "dpkg-query")

    def read(self, package: str, ctx: RunContext) -> str | None:
        # One line per architecture instance (multi-arch), hence the newline in the format.
        result = self._run(["dpkg-query", "-W", "-f=${Status} ${Version}\n", package], ctx)
        if not result.ok:
            if "no packages found" in (result.stderr + result.stdout):
                return None
            raise ResourceError(result.describe())
        for line in result.stdout.splitlines():
            # "install ok installed 9.1-1"; "deinstall ok config-files 1.0" is not installed.
            words = line.split()
            if len(words) >= 4 and words[2] in self.INSTALLED_STATES:
                return words[3]
        return None

    def install(self, package: str, version: str | None, ctx: RunContext) -> CommandResult:
        spec = f"{package}={version}" if version else package
        # --allow-downgrades: an exact version: pin may be older than what is installed.
        argv = ["apt-get", "install", "-y", "-q", "--allow-downgrades", *self.DPKG_OPTIONS, spec]
        return self._run(argv, ctx, self.ENV)

    def remove(self, package: str, ctx: RunContext) -> CommandResult:
        return self._run(["apt-get", "remove", "-y", "-q", package], ctx, self.ENV)


class Dnf(Provider):
    name = "dnf"

    @property
    def tools(self) -> tuple[str, ...]:
        return ("dnf", "rpm")

    def read(self, package: str, ctx: RunContext) -> str | None:
        result = self._run(["rpm", "-q", "--qf", "%{VERSION}-%{RELEASE}\n", package], ctx)
        if not result.ok:
            if "is not installed" in (result.stdout + result.stderr):
                return None
            raise ResourceError(result.describe())
        # Install-only packages (kernels) may list several versions; the first answers "is it
        # installed", and a version: pin is then checked against it.
        lines = result.stdout.split()
        return lines[0] if lines else None

    def install(self, package: str, version: str | None, ctx: RunContext) -> CommandResult:
        # dnf installs exactly NAME-VERSION, up or down, when the version is spelled out.
        spec = f"{package}-{version}" if version else package
        return self._run(["dnf", "install", "-y", "-q", spec], ctx)

    def remove(self, package: str, ctx: RunContext) -> CommandResult:
        return self._run(["dnf", "remove", "-y", "-q", package], ctx)

    def matches(self, installed: str, wanted: str) -> bool:
        # "1.2.3" is satisfied by any release of it ("1.2.3-4.el9"); "1.2.3-4.el9" only by itself.
        return installed == wanted or installed.startswith(wanted + "-")


class Apk(Provider):
    name = "apk"

    @property
    def tools(self) -> tuple[str, ...]:
        return ("apk",)

    def read(self, package: str, ctx: RunContext) -> str | None:
        # "musl-1.2.4-r2 x86_64 {musl} (MIT) [installed]"; nothing at all when not installed.
        result = self._run(["apk", "list", "--installed", package], ctx)
        if not result.ok:
            raise ResourceError(result.describe())
        prefix = package + "-"
        for line in result.stdout.splitlines():
            first = line.split(maxsplit=1)[0] if line.strip() else ""
            rest = first[len(prefix) :]
            # The version starts with a digit; "py3-foo-1.0" is not a version of "py3".
            if first.startswith(prefix) and rest[:1].isdigit():
                return rest
        return None

    def install(self, package: str, version: str | None, ctx: RunContext) -> CommandResult:
        spec = f"{package}={version}" if version else package
        return self._run(["apk", "add", "--no-progress", spec], ctx)

    def remove(self, package: str, ctx: RunContext) -> CommandResult:
        return self._run(["apk", "del", "--no-progress", package], ctx)

    def matches(self, installed: str, wanted: str) -> bool:
        # "1.2.4" is satisfied by any package release of it ("1.2.4-r2").
        return installed == wanted or installed.startswith(wanted + "-r")


class Pip(Provider):
    name = "pip"

    @property
    def tools(self) -> tuple[str, ...]:
        return (f"{self.python} (with pip)",)

    def _pip(self, *args: str) -> list[str]:
        return [self.python, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]

    def read(self, package: str, ctx: RunContext) -> str | None:
        result = self._run(self._pip("show", package), ctx)
        if not result.ok:
            output = result.stdout + result.stderr
            if "No module named pip" in output:
                raise ProviderMissingError(f"{self.python} has no pip module")
            if "not found" in output:
                return None
            raise ResourceError(result.describe())
        for line in result.stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Version":
                return value.strip()
        raise ResourceError(f"`pip show {package}` printed no Version: line")

    def install(self, package: str, version: str | None, ctx: RunContext) -> CommandResult:
        spec = f"{package}=={version}" if version else package
        return self._run(self._pip("install", "-q", spec), ctx)

    def remove(self, package: str, ctx: RunContext) -> CommandResult:
        return self._run(self._pip("uninstall", "-y", "-q", package), ctx)


PROVIDERS: dict[str, type[Provider]] = {p.name: p for p in (Apt, Dnf, Apk, Pip)}
#: Default provider per os.family trait; anything else must say `provider:`.
FAMILY_PROVIDERS = {"debian": "apt", "redhat": "dnf", "alpine": "apk"}


class Package(Resource):
    type: ClassVar[str] = "package"

    def provider(self, ctx: RunContext) -> Provider:
        """The provider to use: the attribute, else the one for this host's os.family."""
        name = self.attrs.get("provider")
        if name is None:
            os_traits = ctx.traits.get("os")
            family = os_traits.get("family") if isinstance(os_traits, dict) else None
            name = FAMILY_PROVIDERS.get(family) if isinstance(family, str) else None
            if name is None:
                shown = family if family is not None else "<unknown>"
                raise ResourceError(f"no package provider for os.family={shown}; set provider:")
        return PROVIDERS[name](self.attrs.get("python"))

    def read(self, ctx: RunContext, provider: Provider) -> dict[str, str | None]:
        """The host's state of this package: ``{"installed": version or None}``."""
        return {"installed": provider.read(self.name, ctx)}

    def apply(self, ctx: RunContext) -> Outcome:
        if (
            not self.name.strip()
            or self.name.startswith("-")
            or any(c.isspace() for c in self.name)
        ):
            # A leading "-" would be taken as an option by every package manager.
            return Outcome(FAILED, ctx.redact(f"{self.name!r} is not a package name"))
        try:
            provider = self.provider(ctx)
        except ResourceError as exc:
            return Outcome(FAILED, ctx.redact(str(exc)))

        # Read.
        try:
            installed = self.read(ctx, provider)["installed"]
        except ProviderMissingError as exc:
            return Outcome(FAILED, ctx.redact(_missing(provider, exc)))
        except ResourceError as exc:
            return Outcome(
                FAILED, ctx.redact(f"cannot read whether {self.name} is installed: {exc}")
            )

        # Compare.
        plan = self._plan(provider, installed)
        if plan is None:
            if installed is None:
                return Outcome(OK, ctx.redact(f"{self.name} is absent"))
            return Outcome(OK, ctx.redact(f"{self.name} {installed} is installed"))
        verb, what, change = plan
        if ctx.noop:
            return Outcome(CHANGED, ctx.redact(f"would {verb} {what}"), changes=[change])

        # Change, then read again: a manager that exits 0 without doing the job is a failure.
        try:
            if verb == "remove":
                result = provider.remove(self.name, ctx)
            else:
                result = provider.install(self.name, self.attrs.get("version"), ctx)
            if not result.ok:
                return Outcome(FAILED, ctx.redact(f"could not {verb} {what}: {result.describe()}"))
            now = self.read(ctx, provider)["installed"]
        except ProviderMissingError as exc:
            return Outcome(FAILED, ctx.redact(_missing(provider, exc)))
        except ResourceError as exc:
            return Outcome(FAILED, ctx.redact(f"could not {verb} {what}: {exc}"))
        if self._plan(provider, now) is not None:
            got = f"{self.name} {now}" if now else f"{self.name} not installed"
            return Outcome(
                FAILED,
                ctx.redact(f"{verb} {what}: `{provider.name}` reported success but found {got}"),
            )
        done = {"install": "installed", "change": "changed", "remove": "removed"}[verb]
        if verb == "install":
            # Say the version that arrived, also when none was pinned.
            what, change = f"{self.name} {now}", f"installed {now}"
        return Outcome(CHANGED, ctx.redact(f"{done} {what}"), changes=[change])

    def _plan(self, provider: Provider, installed: str | None) -> tuple[str, str, str] | None:
        """What to do: (verb, what, short change name), or None when already converged."""
        wanted = self.attrs.get("version")
        if self.attrs.get("state", "present") == "absent":
            if installed is None:
                return None
            return ("remove", f"{self.name} {installed}", "removed")
        if installed is None:
            what = f"{self.name} {wanted}" if wanted else self.name
            return ("install", what, f"installed {wanted}" if wanted else "installed")
        if wanted and not provider.matches(installed, wanted):
            return (
                "change",
                f"{self.name} {installed} -> {wanted}",
                f"version {installed} -> {wanted}",
            )
        return None


def _missing(provider: Provider, exc: ProviderMissingError) -> str:
    # A tool not found on PATH is fully said by the provider's message; anything subtler
    # (python3 present but without pip) keeps its own detail.
    detail = "" if isinstance(exc.__cause__, FileNotFoundError) else f" ({exc})"
    return provider.missing_message() + detail


RESOURCE = Package
