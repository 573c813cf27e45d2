"""The landing zone: new unlabeled target domains arrive as batches, each adapted exactly once.

    <root>/landing/<line>/<batch_id>/*.png     images of a new domain for line <line>
    <root>/landing/<line>/<batch_id>/_READY    written last by the uploader; optional JSON
                                               {"source_line": "..."} (else the watcher's default)
    <root>/landing/<line>/<batch_id>/_STATE    written by the watcher: {"state", "job_id", "error"}

A batch is taken only once its ``_READY`` exists. Its job id is ``adapt_job_id(line, source line,
source version, batch URI)``: the same id the adaptation job writes its status under, and the Ray
Jobs submission id, so a restarted or a second watcher submits nothing new (the Jobs API refuses a
second submission with the same id, and the job itself returns early when its status says succeeded).
Ray-free: the watcher takes ``submit(job_id, argv)`` and ``job_state(job_id)`` callables; the Serve
deployment passes the Ray Jobs API in.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_ad import registry, storage
from ray_ad.errors import ConfigError, DataError
from ray_ad.job_status import adapt_job_id, read_job_status

READY, STATE = "_READY", "_STATE"
TERMINAL = ("succeeded", "failed")
JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"


@dataclass(frozen=True)
class Batch:
    line: str
    batch_id: str
    uri: str
    source_line: str | None


def ready_batches(root: str) -> list[Batch]:
    """Batches under ``<root>/landing/`` whose ``_READY`` marker exists, oldest name first."""
    landing = storage.join(root, "landing")
    if not storage.exists(landing):
        return []
    batches = []
    for path in storage.list_files(landing):
        parts = path.rstrip("/").split("/")
        if parts[-1] != READY or len(parts) < 3:
            continue
        line, batch_id = parts[-3], parts[-2]
        try:
            registry.check_name("line", line)
            registry.check_name("batch id", batch_id)
        except ConfigError:
            continue  # not ours to adapt: a name that cannot become a line or a path segment
        text = storage.read_text(path).strip()
        try:
            marker = json.loads(text) if text else {}
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: the _READY marker must be empty or JSON ({exc})") from exc
        source = marker.get("source_line") if isinstance(marker, dict) else None
        batches.append(Batch(line, batch_id, storage.join(landing, line, batch_id), source))
    return sorted(batches, key=lambda b: (b.line, b.batch_id))


def read_state(batch: Batch) -> dict[str, Any] | None:
    uri = storage.join(batch.uri, STATE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def write_state(batch: Batch, state: str, job_id: str, source_line: str | None = None,
                error: str | None = None) -> None:
    storage.write_text(storage.join(batch.uri, STATE), json.dumps(
        {"state": state, "job_id": job_id, "source_line": source_line, "error": error}, indent=2))


def adapt_argv(line: str, source_line: str, target: str, root: str) -> list[str]:
    # This interpreter: on a cluster the job's driver runs in the same image as the service.
    return [sys.executable, str(JOBS_DIR / "adapt_target.py"), "--line", line, "--source-line", source_line,
            "--target", target, "--root", root, "--quiet"]


class LandingWatcher:
    """One pass at a time over the landing zone: submit new batches, record how submitted ones ended."""

    def __init__(self, root: str, submit: Callable[[str, list[str]], None],
                 job_state: Callable[[str], str | None], default_source: dict[str, str] | None = None) -> None:
        self.root, self.submit, self.job_state = root, submit, job_state
        self.default_source = default_source or {}

    def poll_once(self) -> list[dict[str, Any]]:
        """Returns what happened to each ready batch (for logs and tests)."""
        events = []
        for batch in ready_batches(self.root):
            state = read_state(batch)
            if state and state["state"] in TERMINAL:
                continue
            if state:  # submitted earlier (by us or another watcher): has it ended?
                ended = self.job_state(state["job_id"])
                if ended is None:  # the submission itself was lost (e.g. a crash): the same id again
                    self.submit(state["job_id"], adapt_argv(batch.line, state["source_line"], batch.uri, self.root))
                    events.append({"batch": batch.uri, "event": "resubmitted", "job_id": state["job_id"]})
                elif ended in TERMINAL:
                    error = self._job_error(state["job_id"]) if ended == "failed" else None
                    write_state(batch, ended, state["job_id"], state["source_line"], error)
                    events.append({"batch": batch.uri, "event": ended, "job_id": state["job_id"]})
                continue
            events.append(self._submit(batch))
        return events

    def _submit(self, batch: Batch) -> dict[str, Any]:
        source = batch.source_line or self.default_source.get(batch.line)
        if not source:
            error = f"no source line: put {{\"source_line\": ...}} in {READY} or configure one for {batch.line!r}"
            write_state(batch, "failed", "", None, error)
            return {"batch": batch.uri, "event": "failed", "error": error}
        version = registry.current_version(self.root, source)
        if version is None:
            error = f"source line {source!r} has no published model"
            write_state(batch, "failed", "", source, error)
            return {"batch": batch.uri, "event": "failed", "error": error}
        job_id = adapt_job_id(batch.line, source, version, batch.uri)
        write_state(batch, "submitted", job_id, source)  # first, so that a crash right after never resubmits
        self.submit(job_id, adapt_argv(batch.line, source, batch.uri, self.root))
        return {"batch": batch.uri, "event": "submitted", "job_id": job_id}

    def _job_error(self, job_id: str) -> str:
        status = read_job_status(self.root, job_id) or {}
        return status.get("error") or "the adaptation job failed before writing its status"
