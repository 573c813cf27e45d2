"""Adaptation job ids and their status objects under ``<root>/jobs/``: written by the adaptation job,
read by the job itself (a re-submitted target), the service and the landing watcher."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from ray_ad import storage
from ray_ad.data.sample import is_folder_uri
from ray_ad.errors import DataError

LANDING_MANIFEST = "_MANIFEST.json"  # written by the landing watcher into a checked batch


def landing_manifest(target: str) -> dict[str, Any] | None:
    """The manifest the landing watcher wrote into a batch folder (image names, sizes, digests), if any."""
    if not is_folder_uri(target):  # a dataset (elpv:..., a Parquet manifest), not a landed batch
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


def timestamp() -> str:
    """Now, UTC, to the second (ISO 8601): the times a status object records."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def write_job_status(root: str, status: dict[str, Any]) -> None:
    """Write ``status`` (a dict with ``job_id``) to its object, stamping ``updated``; whole or not at all."""
    status["updated"] = timestamp()
    storage.write_text(job_status_uri(root, status["job_id"]), json.dumps(status, indent=2, sort_keys=True))


def read_job_status(root: str, job_id: str) -> dict[str, Any] | None:
    uri = job_status_uri(root, job_id)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"job status {uri} is not valid JSON: {exc}") from exc
