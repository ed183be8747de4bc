"""Archive targets: where WAL segments, snapshots and backups go, chosen by URL.

    open_target("file:///srv/vigo-archive")
    open_target("s3://bucket/prefix", endpoint_url="http://127.0.0.1:9000")

The interface is in `base` (its errors, ``TargetError`` and below, in `vigo.errors`); one
module per backend (`file`, `s3`). The S3 module imports boto3, so it is loaded only when an
``s3://`` URL asks for it.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from vigo.errors import ConfigError
from vigo.snapshots.targets.base import ObjectInfo, Progress, Target

__all__ = [
    "ObjectInfo",
    "Progress",
    "Target",
    "open_target",
]

_EXAMPLES = "expected file:///absolute/path or s3://bucket/prefix"


def open_target(url: str, *, endpoint_url: str | None = None, region: str | None = None) -> Target:
    """The target a URL names. Nothing is contacted yet: the first operation reports problems.

    ``endpoint_url`` (an S3-compatible service, e.g. ``http://127.0.0.1:9000``) and ``region``
    apply to ``s3://`` only; credentials come from the usual boto3 sources, never the URL.
    Raises `ConfigError` for anything malformed.
    """
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"archive target URL is empty; {_EXAMPLES}")
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("file", "s3"):
        shown = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ConfigError(f"archive target URL {url!r} has {shown}; {_EXAMPLES}")
    if "@" in parts.netloc:
        # Do not echo the URL: what precedes '@' is probably a secret.
        raise ConfigError(
            f"archive target URL {scheme}://***@{parts.netloc.rpartition('@')[2]}/... carries "
            "credentials; give them through the environment, ~/.aws or an instance role"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"archive target URL {url!r} has a query or fragment; {_EXAMPLES}")
    if scheme == "file":
        return _open_file(url, parts.netloc, unquote(parts.path), endpoint_url, region)
    return _open_s3(url, parts.netloc, unquote(parts.path), endpoint_url, region)


def _open_file(url: str, host: str, path: str, endpoint_url: str | None, region: str | None) -> Target:
    from vigo.snapshots.targets.file import FileTarget

    if endpoint_url is not None or region is not None:
        raise ConfigError(
            f"endpoint_url and region apply to s3:// targets only, got "
            f"endpoint_url={endpoint_url!r}, region={region!r} for {url!r}"
        )
    if host not in ("", "localhost"):
        raise ConfigError(
            f"file URL {url!r} names host {host!r}; expected file:///absolute/path (three slashes)"
        )
    if not path.startswith("/"):
        raise ConfigError(f"file URL {url!r} has a relative path; expected file:///absolute/path")
    if ".." in path.split("/"):
        raise ConfigError(f"file URL {url!r} contains '..'; expected a normalised absolute path")
    return FileTarget(path)


def _open_s3(url: str, bucket: str, path: str, endpoint_url: str | None, region: str | None) -> Target:
    if not bucket:
        raise ConfigError(f"S3 URL {url!r} names no bucket; expected s3://bucket/prefix")
    if ":" in bucket:
        raise ConfigError(
            f"S3 URL {url!r} has a port; expected s3://bucket/prefix, with the service's "
            "address in endpoint_url (like http://127.0.0.1:9000)"
        )
    if endpoint_url is not None:
        endpoint = urlsplit(endpoint_url)
        if "@" in endpoint.netloc:
            raise ConfigError(  # not echoed: what precedes '@' is probably a secret
                "S3 endpoint_url carries credentials; expected http(s)://host[:port], with "
                "credentials in the environment, ~/.aws or an instance role"
            )
        if endpoint.scheme not in ("http", "https") or not endpoint.hostname:
            raise ConfigError(
                f"S3 endpoint_url must look like http(s)://host[:port], got {endpoint_url!r}"
            )
    if region is not None and not region.strip():
        raise ConfigError("S3 region is empty; expected a region name like us-east-1, or none")

    # boto3 is a server-only dependency: import it only for s3:// URLs.
    from vigo.snapshots.targets.s3 import S3Target

    return S3Target(bucket, path.strip("/"), endpoint_url=endpoint_url, region=region)
