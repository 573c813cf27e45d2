"""Adaptation job ids and their status objects under ``<root>/jobs/`` (shared by jobs, service, watcher)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ray_ad import storage
from ray_ad.errors import DataError


def adapt_job_id(new_line: str, source_line: str, source_version: str, target: str) -> str:
    """One id per (new line, source model, target): re-submitting the same target finds the same job."""
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
