"""fsspec URIs everywhere: a local path, ``file://`` or ``s3://`` (s3fs).

The S3 endpoint, region and credentials come from ``configure_s3`` or from the standard AWS
environment variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), so a
MinIO or any S3-compatible endpoint works. Library code never assumes a local disk.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec

from ray_ad.errors import DataError

_S3_OPTIONS: dict[str, Any] = {}


def configure_s3(endpoint_url: str | None = None, **options: Any) -> None:
    """Set process-wide s3fs options (e.g. a test's loopback endpoint)."""
    _S3_OPTIONS.clear()
    if endpoint_url:
        _S3_OPTIONS["endpoint_url"] = endpoint_url
    _S3_OPTIONS.update(options)


def s3_options() -> dict[str, Any]:
    options = dict(_S3_OPTIONS)
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in options:
        options["endpoint_url"] = endpoint
    # s3fs caches listings by default; a registry pointer that changes under us must be re-read.
    options.setdefault("use_listings_cache", False)
    return options


def protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it."""
    proto = protocol(uri)
    options = s3_options() if proto in ("s3", "s3a") else {}
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except (ImportError, ValueError) as exc:
        raise DataError(f"cannot open URI {uri!r}: {exc}") from exc
    return fs, path


def absolute(uri: str) -> str:
    """A local path made absolute against this process's directory; any other URI unchanged.

    For values handed to other processes (Serve replicas, submitted jobs) whose working directory
    is not ours.
    """
    return os.path.abspath(uri) if protocol(uri) == "file" and not uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {uri}") from exc
    except (IsADirectoryError, PermissionError) as exc:
        raise DataError(f"cannot read {uri}: {exc}") from exc


def read_text(uri: str) -> str:
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{uri} is not UTF-8 text") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` so that no reader ever sees half of it.

    On a local disk: write a temporary sibling, then rename (atomic on POSIX). An S3 PUT is atomic by
    itself: the object appears whole or not at all.
    """
    fs, path = filesystem(uri)
    parent = posixpath.dirname(path) if protocol(uri) != "file" else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if protocol(uri) == "file":
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str) -> list[str]:
    """All files below ``uri`` (recursively), as full URIs of the same scheme."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise DataError(f"folder not found: {uri}")
    found = fs.find(path)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        return sorted(f"{scheme}://{p}" if not p.startswith(f"{scheme}://") else p for p in found)
    return sorted(found)


def arrow_filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and path for ``uri`` (Ray Train storage, Ray Data Parquet I/O).

    Local URIs give ``(None, absolute path)`` so pyarrow picks its own local filesystem; anything else
    wraps the same fsspec filesystem (and so the same S3 endpoint and credentials) as the rest of
    ray_ad, which keeps s3fs, pyarrow and Ray pointed at one endpoint.
    """
    if protocol(uri) == "file":
        path = uri.split("://", 1)[1] if uri.startswith("file://") else uri
        return None, os.path.abspath(path)
    import pyarrow.fs

    fs, path = filesystem(uri)
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def environment_for_workers() -> dict[str, str]:
    """The S3 settings of this process as environment variables, for Ray's ``runtime_env``.

    Ray workers are other processes (other machines, on a cluster): ``configure_s3`` done here does
    not reach them, the standard AWS variables do.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    if "endpoint_url" in _S3_OPTIONS:
        env["AWS_ENDPOINT_URL_S3"] = _S3_OPTIONS["endpoint_url"]
    return env
