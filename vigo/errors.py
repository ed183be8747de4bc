"""Every error vigo raises on purpose, and the wire error codes they travel as.

One root, so callers (the CLIs above all) can turn any of them into a short message and an
exit code without a traceback. Builtin mix-ins are added where a caller would reasonably catch
the builtin (a malformed stack *is* a ``ValueError``). Foreign errors (LMDB, cryptography,
Jinja2, YAML, OS) are translated at the boundary where they happen and chained with
``raise ... from exc``, so the original stays in the traceback for whoever debugs it. No other
module of vigo defines an exception class (tests/unit/test_errors.py keeps it so).

    VigoError                                   [code] = the wire code it is answered with
    ├── ConfigError(ValueError)                 [bad_body]  a setting or command-line value out of range
    ├── PolicyError(ValueError)                 the operator's policy source
    │   ├── StackError                          [bad_body]  a stack that cannot be built (names file/policy/resource)
    │   │   └── PathEscapeError                 a path that leaves the stack folder (.., symlink, absolute)
    │   ├── ConditionSyntaxError                a `when:` expression that does not parse
    │   ├── ConditionEvalError                  a `when:` that cannot be evaluated against these traits
    │   ├── TemplateError                       a template that does not compile or render
    │   └── CycleError                          resources that require or notify each other in a ring (.cycle)
    ├── BundleError                             a PolicyBundle as bytes
    │   ├── BundleFormatError(ValueError)       not a bundle, truncated, unknown format version
    │   ├── SignatureError                      signature missing or not made by the trusted key
    │   ├── BundleRefusedError                  valid but older than what this envoy already accepted
    │   └── SigningKeyError(ValueError)         a signing or trust key file that cannot be used
    ├── SecretError                             [bad_body]  a secret that cannot be sealed or opened
    ├── CacheError(OSError)                     the envoy's LMDB cache cannot be opened or written
    │   ├── CacheCorruptError(ValueError)       an entry that fails to decode (it gets quarantined)
    │   └── CacheLockedError                    another envoy process holds the state directory
    ├── ResourceError                           one resource could not be converged (the run goes on)
    │   └── ProviderMissingError                the tool a resource needs is not on this host
    ├── TraitError                              a custom trait source that is broken (reported, not fatal)
    ├── AdmissionError                          [forbidden]  join tokens, certificates, revocation
    │   ├── TokenError                          [bad_token]  a join token that is unknown, expired or used up
    │   └── RevokedError                        [revoked]  a certificate or envoy that was revoked
    ├── RosterError                             the admissions roster (a CRDT) cannot do what was asked
    │   ├── RosterFormatError(ValueError)       bytes, a message or an argument that breaks the roster
    │   │                                       format (junk, wrong version, bad invariant)
    │   └── RosterRefusedError                  a well-formed operation the semantics forbid
    │                                           (forget of a revoked agent)
    ├── StoreError                              [unavailable]  the server database cannot do what was asked
    ├── StreamError                             the WAL stream: reading, shipping and applying segments
    │   ├── WalFormatError                      a WAL header or frame that is not what SQLite writes
    │   ├── StreamGap                           a segment that does not start where the receiver is (.position)
    │   │   └── NeedSnapshot                    the receiver has no state in that generation: send a snapshot
    │   └── CorruptSegment                      a segment's bytes are not the committed frames it claims
    ├── TargetError                             an archive target (file, s3) refused or failed an operation (.key)
    │   ├── TargetUnavailable(ConnectionError)  cannot be reached now: spool and retry later (exit 3)
    │   ├── NotFound                            no object under that key
    │   ├── ObjectCorrupt                       an object whose bytes do not hash to its stored sha256
    │   ├── ObjectConflict                      a put of different bytes to a write-once key
    │   └── InvalidRequest(ValueError)          a key, prefix or metadata entry the interface refuses
    ├── BackupError                             a backup that cannot be written, read or restored
    │   │                                       (also: a non-empty restore target, an existing --out)
    │   ├── BackupFormatError(ValueError)       not a vigo backup, or a format this vigo cannot read
    │   ├── BackupKeyError                      wrong passphrase or key
    │   └── BackupCorruptError                  truncated, damaged header, an entry or the manifest that
    │                                           fails authentication, integrity_check, trees
    ├── RestoreError                            a restore from the archive that cannot go on
    ├── ReplicationError                        standbys, promotion and fencing
    │   ├── NotPrimaryError                     a write reached a member that is not (or no longer) primary
    │   └── PromoteError                        `server promote` refused (behind, unknown, no standby; exit 5)
    ├── ActorLostError                          a vigo actor died or cannot be reached now (Ray's RayActorError)
    ├── ProtocolError                           [.code]  a frame or message that breaks the wire protocol
    ├── ServerError                             [.code]  the control plane answered with an error code
    ├── TransportError(ConnectionError)         [.code]  no answer, as a client sees it (exit 3)
    │   └── UnavailableError                    not reachable, connection lost, timed out, or told to
    │       │                                   retry later (overloaded, unavailable)
    │       └── ConnectError                    no connection was made: the request was certainly not sent
    ├── AdminAuthError                          admin request without a valid Ray cluster token (exit 4)
    └── ConsoleRefusal                          a web console request answered with an HTTP error (.status)
        └── BadQueryError(ValueError)           a query string or path the console refuses (HTTP 400)

Wire error codes (docs/protocol.md, "Error codes") map to classes in both directions here and
nowhere else: a server answers an error of ours with ``code_of(exc)`` (the class's ``code``,
``conflict`` for any other VigoError, ``internal`` for anything else: a bug); a client turns
an error frame into ``error_from_code(code, reason)``, the class ``CODES`` names for the code:
a ``TransportError`` for the retry-later codes, a ``ServerError`` (the server's answer) for the
rest. ``ServerError`` and ``TransportError`` describe what a client received, so they carry the
code they arrived with; ``ProtocolError`` carries the one it is made with.

Messages say what was attempted, what was expected and what arrived.
"""

from __future__ import annotations

from collections.abc import Sequence


class VigoError(Exception):
    """Root of every error vigo raises on purpose."""

    #: Process exit code a CLI uses when this error ends a command.
    exit_code = 1


class ConfigError(VigoError, ValueError):
    """A setting or command-line value is missing or out of range."""

    exit_code = 2
    code = "bad_body"


class PolicyError(VigoError, ValueError):
    """Something is wrong with the operator's policy source."""


class StackError(PolicyError):
    """A stack that cannot be built. Carries where (file, policy, resource) and what was expected."""

    code = "bad_body"

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
            text += f" (expected {expected}, got {clipped_repr(got)})"
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


class CycleError(PolicyError):
    """Resources that require or notify each other in a ring; ``cycle`` lists their ids in order,
    the first repeated at the end."""

    def __init__(self, cycle: Sequence[str]) -> None:
        self.cycle = list(cycle)
        super().__init__("dependency cycle: " + " -> ".join(self.cycle))


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

    code = "bad_body"


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


class AdmissionError(VigoError):
    """Enrolment went wrong: token, CSR, certificate, revocation."""

    code = "forbidden"


class TokenError(AdmissionError):
    """A join token that is unknown, expired or used up."""

    code = "bad_token"


class RevokedError(AdmissionError):
    """A certificate or envoy that was revoked."""

    code = "revoked"


class RosterError(VigoError):
    """The admissions roster cannot do what was asked."""


class RosterFormatError(RosterError, ValueError):
    """Bytes, a message or an argument that is not what the roster format allows."""


class RosterRefusedError(RosterError):
    """A well-formed roster operation that the semantics refuse (e.g. forgetting a revoked agent)."""


class StoreError(VigoError):
    """The server database cannot do what was asked."""

    code = "unavailable"


class StreamError(VigoError):
    """The WAL stream (vigo.state): reading committed frames, shipping and applying segments."""


class WalFormatError(StreamError):
    """A WAL header or frame is not what SQLite writes (bad magic, broken chain, torn frame)."""


class StreamGap(StreamError):
    """A segment does not start where this receiver is; the sender resends from ``position``."""

    def __init__(self, message: str, position: tuple[str, int, int] | None) -> None:
        super().__init__(message)
        self.position = position


class NeedSnapshot(StreamGap):
    """This receiver has no state in the segment's generation: it must be sent a snapshot."""


class CorruptSegment(StreamError):
    """A segment's bytes do not form the committed frames its header claims."""


class TargetError(VigoError):
    """An archive target refused or failed an operation for a reason that will not pass by itself."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        #: The key the operation was about, when there was one.
        self.key = key
        super().__init__(message)


class TargetUnavailable(TargetError, ConnectionError):
    """The target cannot be reached right now (refused, timed out, 5xx): spool and retry later."""

    exit_code = 3


class NotFound(TargetError):
    """No object under that key."""


class ObjectCorrupt(TargetError):
    """An object whose bytes do not hash to the sha256 stored when it was put."""


class ObjectConflict(TargetError):
    """A put to a key that already holds different bytes: archive objects are write-once."""


class InvalidRequest(TargetError, ValueError):
    """A key, prefix or metadata entry the interface refuses; a bug in the caller."""


class BackupError(VigoError):
    """A backup that cannot be written, read or restored."""


class BackupFormatError(BackupError, ValueError):
    """Bytes that are not a vigo backup, or one of an unknown format version."""


class BackupKeyError(BackupError):
    """The passphrase or key does not open this backup."""


class BackupCorruptError(BackupError):
    """A backup that is damaged or was altered."""


class RestoreError(VigoError):
    """A restore from the archive that cannot go on (no snapshot, a gap, a failed check)."""


class ReplicationError(VigoError):
    """Peer replication: a standby, a promotion or a fenced member."""


class NotPrimaryError(ReplicationError):
    """A partition member that is a standby (or was fenced) was asked to serve a write."""


class PromoteError(ReplicationError):
    """`vigocli server promote` refused, saying why (behind, unknown standby, none)."""

    exit_code = 5


class ActorLostError(VigoError):
    """A vigo actor died or cannot be reached now; translated from Ray's ``RayActorError`` by
    the one wrapper of Ray calls (vigo.actors.runtime). Whether the call ran is unknown."""


class ProtocolError(VigoError):
    """A frame or message that breaks the wire protocol. ``code`` goes into the error frame."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"{code}: {reason}")


class ServerError(VigoError):
    """The control plane answered a request with an error frame (``code``: what it said)."""

    def __init__(self, code: str, reason: str, *, retry_after_s: float | None = None) -> None:
        self.code = code
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(f"server refused ({code}): {reason}")


class TransportError(VigoError, ConnectionError):
    """No answer from the control plane, as a client sees it: not a refusal. ``code`` is
    ``unavailable`` (or ``overloaded`` when the gateway said so), ``retry_after_s`` its hint."""

    exit_code = 3

    def __init__(self, code: str, reason: str, *, retry_after_s: float | None = None) -> None:
        self.code = code
        self.reason = reason
        self.retry_after_s = retry_after_s
        wait = f" (retry after {retry_after_s:g} s)" if retry_after_s else ""
        super().__init__(f"server unavailable ({code}): {reason}{wait}")


class UnavailableError(TransportError):
    """No gateway reachable, the connection lost or timed out, or the gateway overloaded or
    unable to serve now: try again later."""


class ConnectError(UnavailableError):
    """The gateway could not be reached at all: the request was certainly not sent."""


class AdminAuthError(VigoError):
    """An admin request without a valid Ray cluster token."""

    exit_code = 4


class ConsoleRefusal(VigoError):
    """A web console request answered with HTTP ``status`` and this message (vigo/console)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BadQueryError(ConsoleRefusal, ValueError):
    """A query string or path the console refuses: HTTP 400 with what was wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(400, message)


# --- wire error codes ----------------------------------------------------------------------------

#: Every wire error code (``vigo.protocol.ERROR_CODES`` says what each means) and the class a
#: client raises for an error frame carrying it. Codes that ask to retry later are transport
#: errors (nobody could serve the request); every other code is the server's answer. A code this
#: table does not know (a newer server's) is a ``ServerError`` too, meaning ``internal``.
CODES: dict[str, type[ServerError] | type[TransportError]] = {
    "frame_too_large": ServerError,
    "truncated": ServerError,
    "timeout": ServerError,
    "bad_msgpack": ServerError,
    "bad_envelope": ServerError,
    "unknown_version": ServerError,
    "unknown_type": ServerError,
    "bad_body": ServerError,
    "unauthenticated": ServerError,
    "forbidden": ServerError,
    "bad_token": ServerError,
    "revoked": ServerError,
    "expired": ServerError,
    "overloaded": UnavailableError,
    "not_found": ServerError,
    "conflict": ServerError,
    "internal": ServerError,
    "unavailable": UnavailableError,
}


def error_from_code(code: str, reason: str, *, retry_after_s: float | None = None) -> ServerError | TransportError:
    """The exception a client raises for an error frame: the class ``CODES`` names for ``code``."""
    return CODES.get(code, ServerError)(code, reason, retry_after_s=retry_after_s)


def code_of(exc: BaseException) -> str:
    """The wire code a server answers ``exc`` with, raised while handling a request: a
    ``ProtocolError``'s own code, else its class's ``code``; ``conflict`` for any other
    VigoError, ``internal`` for anything else (a bug)."""
    if isinstance(exc, ProtocolError):
        return exc.code
    if isinstance(exc, VigoError):
        return getattr(type(exc), "code", None) or "conflict"
    return "internal"


def clipped_repr(value: object, limit: int = 80) -> str:
    """A short, printable rendering of a value that arrived where something else was expected
    (its repr, cut to ``limit`` characters): for error messages all over vigo."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
