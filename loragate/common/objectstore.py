"""Object-store access, configured one way, for the gateway's log store and the monitor alike.

A location is a local path, a ``file://`` URL, ``s3://bucket/prefix`` or any other URL
pyarrow's filesystems know (``gs://``, ``hdfs://``). S3 credentials come from the usual AWS
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, instance roles); the endpoint and region from :class:`S3Options`:
an explicit value (the gateway's settings, the monitor's config) first, then
``LORAGATE_REQUEST_LOG_S3_ENDPOINT`` / ``LORAGATE_REQUEST_LOG_S3_REGION``, then
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` and ``AWS_REGION`` / ``AWS_DEFAULT_REGION``.

pyarrow is imported only when a filesystem is built.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import urlparse

from loragate.common.atomicio import atomic_write

if TYPE_CHECKING:
    import pyarrow.fs as pafs

ENDPOINT_ENV = "LORAGATE_REQUEST_LOG_S3_ENDPOINT"
REGION_ENV = "LORAGATE_REQUEST_LOG_S3_REGION"
_AWS_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_AWS_REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class S3Options:
    """Where S3 is: ``endpoint`` for S3-compatible stores (``http://minio:9000``; None = AWS) and ``region``."""

    endpoint: str | None = None
    region: str | None = None

    @classmethod
    def resolve(
        cls, endpoint: str | None = None, region: str | None = None, environ: Mapping[str, str] | None = None
    ) -> "S3Options":
        """Explicit values first, then the LORAGATE_REQUEST_LOG_S3_* and AWS_* environment."""
        env = os.environ if environ is None else environ
        return cls(
            endpoint=_first(endpoint, env, (ENDPOINT_ENV, *_AWS_ENDPOINT_ENV)),
            region=_first(region, env, (REGION_ENV, *_AWS_REGION_ENV)),
        )


def _first(explicit: str | None, env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for value in (explicit, *(env.get(name) for name in names)):
        if value and value.strip():
            return value.strip()
    return None


def is_local(location: str) -> bool:
    return urlparse(str(location)).scheme in ("", "file")


def filesystem(location: str, s3: S3Options | None = None) -> tuple["pafs.FileSystem", str]:
    """(pyarrow filesystem, path inside it without a trailing slash) for ``location``."""
    import pyarrow.fs as pafs

    location = str(location)
    parsed = urlparse(location)
    if is_local(location):
        path = parsed.path if parsed.scheme == "file" else location
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path)).rstrip("/") or "/"
    if parsed.scheme == "s3":
        s3 = s3 if s3 is not None else S3Options.resolve()
        options: dict[str, str] = {}
        if s3.endpoint:
            endpoint = urlparse(s3.endpoint if "://" in s3.endpoint else f"https://{s3.endpoint}")
            options["endpoint_override"] = endpoint.netloc
            options["scheme"] = endpoint.scheme
        if s3.region:
            options["region"] = s3.region
        return pafs.S3FileSystem(**options), f"{parsed.netloc}{parsed.path}".rstrip("/")
    fs, path = pafs.FileSystem.from_uri(location)
    return fs, path.rstrip("/")


def open_input(location: str, s3: S3Options | None = None) -> BinaryIO:
    """A readable binary file (seekable: Parquet readers need that)."""
    fs, path = filesystem(location, s3)
    return fs.open_input_file(path)


def write_bytes(location: str, data: bytes, s3: S3Options | None = None) -> str:
    """Write ``data`` whole to ``location`` (local: parent folders made, replaced atomically by
    ``atomicio.atomic_write``; object store: one PUT). Returns ``location``."""
    fs, path = filesystem(location, s3)
    if is_local(location):
        atomic_write(path, data)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)
    return location


@contextlib.contextmanager
def open_output(location: str, s3: S3Options | None = None) -> Iterator[BinaryIO]:
    """A writable stream for ``location``, whose file appears whole when the block ends, or not at all.

    Written under a temporary dot-name beside it, then moved into place (local: a rename; object
    store: a server-side copy and a delete); an error removes the temporary file.
    """
    fs, path = filesystem(location, s3)
    parent, name = path.rsplit("/", 1) if "/" in path else ("", path)
    temporary = f"{parent}/.{name}.{uuid.uuid4().hex[:8]}.tmp" if parent else f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    if is_local(location):
        fs.create_dir(parent or ".", recursive=True)
    try:
        with fs.open_output_stream(temporary) as out:
            yield out
        fs.move(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(temporary)
        raise
