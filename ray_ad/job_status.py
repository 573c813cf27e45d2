"""Adaptation job ids and their status objects under ``<root>/jobs/`` (shared by jobs, service, watcher)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ray_ad import storage
from ray_ad.errors import DataError

LANDING_MANIFEST = "_MANIFEST.json"  # written by the landing watcher into a checked batch


def landing_manifest(target: str) -> dict[str, Any] | None:
    """The manifest the landing watcher wrote into a batch folder (image names, sizes, digests), if any."""
    if "://" not in target and (target.startswith("elpv:") or target.endswith(".parquet")):
        return None
    uri = storage.join(target, LANDING_MANIFEST)
    if not storage.exists(uri):
        return None
    try:
        manifest = json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("images"), list) \
            or not isinstance(manifest.get("digest"), str):
        raise DataError(f"{uri}: expected {{'images': [...], 'digest': ...}}")
    return manifest


def target_key(target: str) -> str:
    """What identifies a target: a landed batch's content digest (so a copy of a batch under another
    folder is the same target), else its URI."""
    manifest = landing_manifest(target)
    return f"sha256:{manifest['digest']}" if manifest else target


def adapt_job_id(new_line: str, source_line: str, source_version: str, target: str) -> str:
    """One id per (new line, source model, target key): re-submitting the same target finds the same job.
    ``target`` is a ``target_key``."""
    digest = hashlib.sha256(f"{new_line}\n{source_line}\n{source_version}\n{target}".encode()).hexdigest()
    return f"adapt-{new_line}-{digest[:12]}"


def job_status_uri(root: str, job_id: str) -> str:
    return storage.join(root, "jobs", f"{job_id}.json")


def read_job_status(root: str, job_id: str) -> dict[str, Any] | None:
    uri = job_status_uri(root, job_id)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"job status {uri} is not valid JSON: {exc}") from exc
