"""The versioned model registry in object storage (DESIGN.md section 3).

    <root>/models/<line>/<version>/   a bundle (weights.safetensors, metrics.json, config.json)
    <root>/models/<line>/CURRENT      the name of the served version
    <root>/models/<line>/LAST_GOOD    the last version that loaded and scored in the service

A version is published by writing its bundle first (the bundle's own config.json is its last file),
checking that it loads, and only then rewriting CURRENT; a reader that follows CURRENT never finds
half a model. Rolling back is rewriting CURRENT to an older complete version.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

from ray_ad import storage
from ray_ad.bundle import CONFIG_FILE, load_bundle, save_bundle
from ray_ad.errors import BundleError, ConfigError
from ray_ad.methods import Detector

POINTER = "CURRENT"
LAST_GOOD = "LAST_GOOD"  # the newest version that loaded and scored in the service (its fallback)
# Matched whole (fullmatch): "$" alone would also accept a name followed by a newline.
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


def check_name(kind: str, value: str) -> str:
    """Lines and versions become path segments: lower-case letters, digits, '-' and '_' only."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(
            f"{kind} {value!r} is not valid: use 1-63 lower-case letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return value


def line_uri(root: str, line: str) -> str:
    return storage.join(root, "models", check_name("line", line))


def version_uri(root: str, line: str, version: str) -> str:
    return storage.join(line_uri(root, line), check_name("version", version))


def new_version() -> str:
    """Sortable by time, unique across concurrent publishers: v20261123t193000z-1a2b3c."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dt%H%M%Sz")
    return f"v{stamp}-{uuid.uuid4().hex[:6]}"


def current_version(root: str, line: str) -> str | None:
    pointer = storage.join(line_uri(root, line), POINTER)
    if not storage.exists(pointer):
        return None
    return check_name("version", storage.read_text(pointer).strip())


def list_versions(root: str, line: str) -> list[str]:
    """Complete versions of a line (those whose config.json exists), oldest first."""
    uri = line_uri(root, line)
    if not storage.exists(uri):
        return []
    versions = set()
    for path in storage.list_files(uri):
        parts = path.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-1] == CONFIG_FILE and _NAME.fullmatch(parts[-2]):
            versions.add(parts[-2])
    return sorted(versions)


def list_lines(root: str) -> list[str]:
    uri = storage.join(root, "models")
    if not storage.exists(uri):
        return []
    lines = set()
    for path in storage.list_files(uri):
        parts = path.rstrip("/").split("/")
        if parts[-1] == POINTER and _NAME.fullmatch(parts[-2]):
            lines.add(parts[-2])
    return sorted(lines)


def publish(detector: Detector, root: str, line: str, metrics: dict[str, Any] | None = None,
            version: str | None = None) -> str:
    """Write ``detector`` as a new version of ``line``, verify it loads, then point CURRENT at it."""
    version = check_name("version", version or new_version())
    uri = version_uri(root, line, version)
    if storage.exists(storage.join(uri, CONFIG_FILE)):
        raise BundleError(f"{uri} already exists; versions are never overwritten")
    save_bundle(detector, uri, metrics)
    load_bundle(uri, device="cpu")  # refuse to point at anything that does not load
    storage.write_text(storage.join(line_uri(root, line), POINTER), version + "\n")
    return version


def last_good_version(root: str, line: str) -> str | None:
    pointer = storage.join(line_uri(root, line), LAST_GOOD)
    if not storage.exists(pointer):
        return None
    try:
        return check_name("version", storage.read_text(pointer).strip())
    except ConfigError:
        return None  # a torn pointer names no fallback


def record_good(root: str, line: str, version: str) -> None:
    """Called by the service when ``version`` has loaded and scored: the line's fallback from now on."""
    if last_good_version(root, line) != check_name("version", version):
        storage.write_text(storage.join(line_uri(root, line), LAST_GOOD), version + "\n")


def set_current(root: str, line: str, version: str) -> None:
    """Point ``line`` at an existing complete version (rollback or roll forward)."""
    uri = version_uri(root, line, version)
    load_bundle(uri, device="cpu")  # raises BundleError when the version is missing, partial or corrupt
    storage.write_text(storage.join(line_uri(root, line), POINTER), version + "\n")


def load_current(root: str, line: str, device: str | None = None) -> tuple[Detector, str]:
    version = current_version(root, line)
    if version is None:
        raise BundleError(f"line {line!r} has no published model under {line_uri(root, line)}")
    return load_bundle(version_uri(root, line, version), device=device), version
