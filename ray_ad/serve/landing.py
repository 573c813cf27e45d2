"""The landing zone: new unlabeled target domains arrive as batches, each adapted exactly once.

    <root>/landing/<line>/<batch_id>/*.png        images of a new domain for line <line>
    <root>/landing/<line>/<batch_id>/_READY       written last by the uploader; optional JSON
                                                  {"source_line": "...", "update_line": "<key>"}
    <root>/landing/<line>/<batch_id>/_MANIFEST.json  written by the watcher: each image's name, size and
                                                  SHA-256 (what the job adapts), images it skipped
    <root>/landing/<line>/<batch_id>/_STATE       written by the watcher: {"state", "job_id", "error"}

A batch is taken only once its ``_READY`` exists, and each batch on its own: a bad marker, a marker at
the wrong depth, a name that cannot be a line, an empty batch or an unreadable image gets
``_STATE: rejected`` with the reason, and the pass goes on with the other batches. To retry a
rejected batch, fix it and delete its ``_STATE``.

Before any job is submitted every image is read and decoded; an unreadable one rejects the batch, or,
with ``skip_unreadable``, is left out and named in the manifest. The job id is ``adapt_job_id(line,
source line, source version, content digest)`` where the digest is that of the manifest: a copy of a
batch under another folder name has the same id and so is not adapted twice (the Jobs API refuses a
second submission with the same id, and the job returns early when its status says succeeded).

A batch may create a new line. Landing into a line that already serves a model replaces what it
serves, which is the admin's call: the marker must carry ``update_line``, the HMAC-SHA256 of
``<line>/<batch_id>`` under the admin token (``ray-ad landing-key``); without it the batch is rejected.

Ray-free: the watcher takes ``submit(job_id, argv)`` and ``job_state(job_id)`` callables; the Serve
deployment passes the Ray Jobs API in. Each pass reconciles submitted batches with their job's real
status (the Ray job's, else the status object the job wrote), so a restart never leaves a batch at
``submitted`` for a job that ended.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_ad import registry, storage
from ray_ad.adaptation.gate import ACCEPTANCE, MIN_FIT, MIN_HELD_OUT  # _acceptance/: for the gate only
from ray_ad.data.dataset import IMAGE_EXTENSIONS
from ray_ad.data.images import decode_image
from ray_ad.errors import ConfigError, DataError, RayADError
from ray_ad.job_status import LANDING_MANIFEST, adapt_job_id, read_job_status

READY, STATE, MANIFEST = "_READY", "_STATE", LANDING_MANIFEST
TERMINAL = ("succeeded", "failed", "rejected")
MARKER_KEYS = ("source_line", "update_line")
JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"


@dataclass(frozen=True)
class Batch:
    line: str
    batch_id: str
    uri: str
    source_line: str | None
    update_line: str | None = None  # the admin's key to land into a line that already exists


@dataclass(frozen=True)
class Rejected:
    """A ``_READY`` marker that names no valid batch; ``uri`` is the folder holding it."""

    uri: str
    reason: str


@dataclass(frozen=True)
class Manifest:
    images: list[dict[str, Any]]  # name (relative to the batch), size, sha256
    skipped: list[dict[str, str]] = field(default_factory=list)  # name, error

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.images, sort_keys=True).encode()).hexdigest()


def update_key(admin_token: str, line: str, batch_id: str) -> str:
    """What an admin puts in a marker's ``update_line`` to let the batch replace line ``line``'s model."""
    return hmac.new(admin_token.encode(), f"{line}/{batch_id}".encode(), hashlib.sha256).hexdigest()


def _relative_parts(path: str, base: str) -> list[str]:
    if "://" in base:
        return path[len(base.rstrip("/")) + 1 :].split("/")
    return os.path.relpath(path, os.path.abspath(base)).replace(os.sep, "/").split("/")


def _parse_marker(text: str, where: str) -> dict[str, Any]:
    text = text.strip()
    try:
        marker = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: the {READY} marker must be empty or JSON ({exc})") from exc
    if not isinstance(marker, dict):
        raise DataError(f"{where}: the {READY} marker must be a JSON object, got {type(marker).__name__}")
    unknown = sorted(set(marker) - set(MARKER_KEYS))
    if unknown:
        raise DataError(f"{where}: unknown {READY} keys {unknown}; allowed: {list(MARKER_KEYS)}")
    for key in MARKER_KEYS:
        if marker.get(key) is not None and not isinstance(marker[key], str):
            raise DataError(f"{where}: {READY} {key!r} must be a string, got {marker[key]!r}")
    if marker.get("source_line") is not None:
        try:
            registry.check_name("source line", marker["source_line"])
        except ConfigError as exc:
            raise DataError(f"{where}: {exc}") from exc
    return marker


def scan_landing(root: str) -> tuple[list[Batch], list[Rejected]]:
    """The batches under ``<root>/landing/`` whose ``_READY`` marker exists (oldest name first), and
    the markers that name no valid batch, each with the reason."""
    landing = storage.join(root, "landing")
    if not storage.exists(landing):
        return [], []
    batches, rejected = [], []
    for path in storage.list_files(landing):
        if path.rstrip("/").rsplit("/", 1)[-1] != READY:
            continue
        parts = _relative_parts(path, landing)
        folder = storage.join(landing, *parts[:-1]) if len(parts) > 1 else landing
        if len(parts) != 3:
            rejected.append(Rejected(folder, f"a {READY} marker belongs at landing/<line>/<batch>/{READY}, "
                                             f"not at landing/{'/'.join(parts)}"))
            continue
        line, batch_id = parts[0], parts[1]
        try:
            registry.check_name("line", line)
            registry.check_name("batch id", batch_id)
            marker = _parse_marker(storage.read_text(path), f"landing/{line}/{batch_id}")
        except (ConfigError, DataError) as exc:
            rejected.append(Rejected(folder, str(exc)))
            continue
        batches.append(Batch(line, batch_id, storage.join(landing, line, batch_id), marker.get("source_line"),
                             marker.get("update_line")))
    return sorted(batches, key=lambda b: (b.line, b.batch_id)), rejected


def ready_batches(root: str) -> list[Batch]:
    return scan_landing(root)[0]


def read_state(batch: Batch | Rejected) -> dict[str, Any] | None:
    uri = storage.join(batch.uri, STATE)
    if not storage.exists(uri):
        return None
    try:
        return json.loads(storage.read_text(uri))
    except json.JSONDecodeError:
        return None  # not ours, or torn: the batch is looked at afresh


def write_state(batch: Batch | Rejected, state: str, job_id: str, source_line: str | None = None,
                error: str | None = None) -> None:
    storage.write_text(storage.join(batch.uri, STATE), json.dumps(
        {"state": state, "job_id": job_id, "source_line": source_line, "error": error}, indent=2))


def batch_manifest(batch: Batch, skip_unreadable: bool = False, max_pixels: int | None = None) -> Manifest:
    """Every image of the batch read and decoded: name, size and SHA-256 of each. An unreadable image is a
    ``DataError`` naming it, or with ``skip_unreadable`` is left out and listed under ``skipped``."""
    prefix = batch.uri.rstrip("/")
    images, skipped = [], []
    for path in storage.list_files(batch.uri):
        name = "/".join(_relative_parts(path, prefix))
        if not name.lower().endswith(IMAGE_EXTENSIONS) or name.startswith(f"{ACCEPTANCE}/"):
            continue
        data = storage.read_bytes(storage.join(prefix, name))
        try:
            decode_image(data, name, max_pixels)
        except DataError as exc:
            if not skip_unreadable:
                raise DataError(f"unreadable image in the batch: {exc}") from exc
            skipped.append({"name": name, "error": str(exc)})
            continue
        images.append({"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    if not images:
        raise DataError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) in the batch"
                        + (f"; skipped {len(skipped)} unreadable" if skipped else ""))
    if len(images) < MIN_FIT + MIN_HELD_OUT:  # what the adaptation job needs: refused here, not there
        raise DataError(f"{len(images)} readable images in the batch; an adaptation needs at least "
                        f"{MIN_FIT + MIN_HELD_OUT} ({MIN_HELD_OUT} held out for the gate, {MIN_FIT} to fit on)")
    return Manifest(sorted(images, key=lambda i: i["name"]), skipped)


def adapt_argv(line: str, source_line: str, target: str, root: str) -> list[str]:
    # This interpreter: on a cluster the job's driver runs in the same image as the service.
    return [sys.executable, str(JOBS_DIR / "adapt_target.py"), "--line", line, "--source-line", source_line,
            "--target", target, "--root", root, "--quiet"]


class LandingWatcher:
    """One pass at a time over the landing zone: check and submit new batches, reject bad ones with
    the reason, record how submitted ones ended."""

    def __init__(self, root: str, submit: Callable[[str, list[str]], None],
                 job_state: Callable[[str], str | None], default_source: dict[str, str] | None = None,
                 admin_token: str | None = None, skip_unreadable: bool = False) -> None:
        self.root, self.submit, self.job_state = root, submit, job_state
        self.default_source = default_source or {}
        self.admin_token, self.skip_unreadable = admin_token, skip_unreadable

    def poll_once(self) -> list[dict[str, Any]]:
        """What happened to each batch this pass (for logs and tests). A batch's data error rejects that
        batch only; storage or Jobs API failures propagate (the health check should see them)."""
        batches, rejected = scan_landing(self.root)
        events = []
        for marker in rejected:
            state = read_state(marker)
            if state is None or state.get("state") != "rejected" or state.get("error") != marker.reason:
                write_state(marker, "rejected", "", None, marker.reason)
                events.append({"batch": marker.uri, "event": "rejected", "error": marker.reason})
        for batch in batches:
            state = read_state(batch)
            if state and state.get("state") in TERMINAL:
                continue
            if state and state.get("state") == "submitted" and state.get("job_id"):
                event = self._reconcile(batch, state)
            else:
                event = self._check_and_submit(batch)
            if event:
                events.append(event)
        return events

    def _reconcile(self, batch: Batch, state: dict[str, Any]) -> dict[str, Any] | None:
        """A submitted batch: has its job ended (by the Ray job, else by the status object it wrote)?"""
        job_id = state["job_id"]
        ended = self.job_state(job_id)
        if ended is None:  # the Ray job is unknown here (a lost submission, or a new cluster)
            status = (read_job_status(self.root, job_id) or {}).get("state")
            if status in ("succeeded", "failed"):
                ended = status
            else:  # never started: submit the same id again
                self.submit(job_id, adapt_argv(batch.line, state["source_line"], batch.uri, self.root))
                return {"batch": batch.uri, "event": "resubmitted", "job_id": job_id}
        if ended not in ("succeeded", "failed"):
            return None
        error = self._job_error(job_id) if ended == "failed" else None
        write_state(batch, ended, job_id, state["source_line"], error)
        return {"batch": batch.uri, "event": ended, "job_id": job_id}

    def _reject(self, batch: Batch, reason: str, source: str | None = None) -> dict[str, Any]:
        write_state(batch, "rejected", "", source, reason)
        return {"batch": batch.uri, "event": "rejected", "error": reason}

    def _check_and_submit(self, batch: Batch) -> dict[str, Any]:
        source = batch.source_line or self.default_source.get(batch.line)
        if not source:
            return self._reject(batch, f"no source line: put {{\"source_line\": ...}} in {READY} or configure "
                                       f"one for {batch.line!r}")
        version = registry.current_version(self.root, source)
        if version is None:
            return self._reject(batch, f"source line {source!r} has no published model", source)
        if registry.current_version(self.root, batch.line) is not None and not self._may_update(batch):
            return self._reject(batch, f"line {batch.line!r} already serves a model: landing into it needs the "
                                       f"admin's 'update_line' key in {READY} (ray-ad landing-key)", source)
        try:
            manifest = batch_manifest(batch, self.skip_unreadable)
        except RayADError as exc:
            return self._reject(batch, str(exc), source)
        storage.write_text(storage.join(batch.uri, MANIFEST), json.dumps(
            {"images": manifest.images, "skipped": manifest.skipped, "digest": manifest.digest}, indent=2))
        job_id = adapt_job_id(batch.line, source, version, f"sha256:{manifest.digest}")  # = target_key
        write_state(batch, "submitted", job_id, source)  # first, so that a crash right after never resubmits
        self.submit(job_id, adapt_argv(batch.line, source, batch.uri, self.root))
        event = {"batch": batch.uri, "event": "submitted", "job_id": job_id}
        if manifest.skipped:
            event["skipped"] = [s["name"] for s in manifest.skipped]
        return event

    def _may_update(self, batch: Batch) -> bool:
        if not self.admin_token or not batch.update_line:
            return False
        return hmac.compare_digest(batch.update_line, update_key(self.admin_token, batch.line, batch.batch_id))

    def _job_error(self, job_id: str) -> str:
        status = read_job_status(self.root, job_id) or {}
        return status.get("error") or "the adaptation job failed before writing its status"
