"""Every error vigo raises on purpose.

One root, so callers (the CLIs above all) can turn any of them into a short message and an
exit code without a traceback. Builtin mix-ins are added where a caller would reasonably catch
the builtin (a malformed stack *is* a ``ValueError``). Foreign errors (LMDB, cryptography,
Jinja2, YAML, OS) are translated at the boundary where they happen and chained with
``raise ... from exc``, so the original stays in the traceback for whoever debugs it.

    VigoError
    ├── ConfigError(ValueError)            a setting or command-line value out of range
    ├── PolicyError(ValueError)            the operator's policy source
    │   ├── StackError                     a stack that cannot be built (names file/policy/resource)
    │   │   └── PathEscapeError            a path that leaves the stack folder (.., symlink, absolute)
    │   ├── ConditionSyntaxError           a `when:` expression that does not parse
    │   ├── ConditionEvalError             a `when:` that cannot be evaluated against these traits
    │   └── TemplateError                  a template that does not compile or render
    ├── BundleError                        a PolicyBundle as bytes
    │   ├── BundleFormatError(ValueError)  not a bundle, truncated, unknown format version
    │   ├── SignatureError                 signature missing or not made by the trusted key
    │   ├── BundleRefusedError             valid but older than what this envoy already accepted
    │   └── SigningKeyError(ValueError)    a signing or trust key file that cannot be used
    ├── SecretError                        a secret that cannot be sealed or opened
    ├── CacheError(OSError)                the envoy's LMDB cache cannot be opened or written
    │   ├── CacheCorruptError(ValueError)  an entry that fails to decode (it gets quarantined)
    │   └── CacheLockedError               another envoy process holds the state directory
    ├── ResourceError                      one resource could not be converged (the run goes on)
    │   └── ProviderMissingError           the tool a resource needs is not on this host
    ├── TraitError                         a custom trait source that is broken (reported, not fatal)
    ├── ProtocolError                      a frame or message that breaks the wire protocol (has .code)
    ├── AdmissionError                     join tokens, certificates, revocation
    │   ├── TokenError                     a join token that is unknown, expired or used up
    │   └── RevokedError                   a certificate or envoy that was revoked
    ├── StoreError                         the server database cannot do what was asked
    ├── ReplicationError                   standbys, promotion and fencing
    │   ├── NotPrimaryError                a write reached a member that is not (or no longer) primary
    │   └── PromoteError                   `server promote` refused (behind, unknown, no standby)
    ├── ServerError                        the control plane answered with an error (has .code)
    │   └── UnavailableError(ConnectionError)  no gateway reachable / overloaded (retry later)
    └── AdminAuthError                     admin request without a valid Ray cluster token

Messages say what was attempted, what was expected and what arrived.
"""

from __future__ import annotations


class VigoError(Exception):
    """Root of every error vigo raises on purpose."""

    #: Process exit code a CLI uses when this error ends a command.
    exit_code = 1


class ConfigError(VigoError, ValueError):
    """A setting or command-line value is missing or out of range."""

    exit_code = 2


class PolicyError(VigoError, ValueError):
    """Something is wrong with the operator's policy source."""


class StackError(PolicyError):
    """A stack that cannot be built. Carries where (file, policy, resource) and what was expected."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        policy: str | None = None,
        resource: str | None = None,
        expected: str | None = None,
        got: object = None,
    ) -> None:
        self.file = file
        self.policy = policy
        self.resource = resource
        self.expected = expected
        self.got = got
        self.detail = message
        where = [
            part
            for part in (
                file,
                f"policy {policy!r}" if policy else None,
                f"resource {resource!r}" if resource else None,
            )
            if part
        ]
        text = ": ".join([*where, message])
        if expected is not None:
            text += f" (expected {expected}, got {_show(got)})"
        super().__init__(text)


class PathEscapeError(StackError):
    """A path in the stack that resolves outside the stack folder."""


class ConditionSyntaxError(PolicyError):
    """A `when:` expression that does not parse. ``position`` is the 0-based column."""

    def __init__(self, message: str, *, source: str, position: int) -> None:
        self.source = source
        self.position = position
        pointer = " " * position + "^"
        super().__init__(f"{message} at column {position + 1}\n    {source}\n    {pointer}")


class ConditionEvalError(PolicyError):
    """A `when:` expression that cannot be evaluated against the given traits."""


class TemplateError(PolicyError):
    """A template that does not compile, or fails to render (undefined variable, sandbox)."""


class BundleError(VigoError):
    """A PolicyBundle that cannot be used."""


class BundleFormatError(BundleError, ValueError):
    """Bytes that are not a PolicyBundle of a format this vigo understands."""


class SignatureError(BundleError):
    """A bundle whose signature is missing or was not made by the trusted key."""


class BundleRefusedError(BundleError):
    """A valid bundle refused because it would roll the envoy back (lower serial or term)."""


class SigningKeyError(BundleError, ValueError):
    """A signing key or trusted public key file that cannot be read or parsed."""


class SecretError(VigoError):
    """A secret that cannot be sealed or opened (wrong key, tampered ciphertext)."""


class CacheError(VigoError, OSError):
    """The envoy's LMDB cache cannot be opened, read or written."""


class CacheCorruptError(CacheError, ValueError):
    """A cache entry that fails to decode; it is quarantined and reported, never fatal."""


class CacheLockedError(CacheError):
    """Another envoy process holds the state directory's run lock."""


class ResourceError(VigoError):
    """A resource that could not be converged. The run reports it failed and goes on."""


class ProviderMissingError(ResourceError):
    """The tool a resource's provider needs (apt-get, systemctl, ...) is not on this host."""


class TraitError(VigoError):
    """A custom trait source (file or executable) that is broken. Reported, never fatal."""


class ProtocolError(VigoError):
    """A frame or message that breaks the wire protocol. ``code`` goes into the error frame."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


class AdmissionError(VigoError):
    """Enrolment went wrong: token, CSR, certificate, revocation."""


class TokenError(AdmissionError):
    """A join token that is unknown, expired or used up."""


class RevokedError(AdmissionError):
    """A certificate or envoy that was revoked."""


class StoreError(VigoError):
    """The server database cannot do what was asked."""


class ReplicationError(VigoError):
    """Peer replication: a standby, a promotion or a fenced member."""


class NotPrimaryError(ReplicationError):
    """A partition member that is a standby (or was fenced) was asked to serve a write."""


class PromoteError(ReplicationError):
    """`vigocli server promote` refused, saying why (behind, unknown standby, none)."""

    exit_code = 5


class ServerError(VigoError):
    """The control plane answered a request with an error frame."""

    def __init__(self, code: str, reason: str, *, retry_after_s: float | None = None) -> None:
        self.code = code
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(f"server refused ({code}): {reason}")


class UnavailableError(ServerError, ConnectionError):
    """No gateway reachable, or the gateway is overloaded: try again later."""

    exit_code = 3

    def __init__(self, code: str, reason: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(code, reason, retry_after_s=retry_after_s)
        wait = f" (retry after {retry_after_s:g} s)" if retry_after_s else ""
        self.args = (f"server unavailable ({code}): {reason}{wait}",)

    def __str__(self) -> str:
        return str(self.args[0])


class AdminAuthError(VigoError):
    """An admin request without a valid Ray cluster token."""

    exit_code = 4


def _show(value: object, limit: int = 80) -> str:
    """A short, printable rendering of a value that arrived where something else was expected."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
