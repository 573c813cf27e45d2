"""The landing watcher's state machine over a real storage root (local and S3): each batch adapted once."""

from __future__ import annotations

import json

import pytest

from ray_ad import registry, storage
from ray_ad.serve.landing import LandingWatcher, read_state, ready_batches
from tests.unit.test_registry import _detector


class FakeJobs:
    """Stands in for the Ray Jobs API: records submissions; refuses a second one with the same id."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, list[str]]] = []
        self.states: dict[str, str] = {}

    def submit(self, job_id: str, argv: list[str]) -> None:
        if job_id in self.states:
            raise RuntimeError(f"job {job_id} already exists")
        self.submitted.append((job_id, argv))
        self.states[job_id] = "running"

    def state(self, job_id: str) -> str | None:
        return self.states.get(job_id)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    root = str(tmp_path / "root") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/root"
    registry.publish(_detector(1), root, "src")
    return root


def land(root: str, line: str, batch: str, ready: str | None = '{"source_line": "src"}') -> str:
    uri = storage.join(root, "landing", line, batch)
    storage.write_bytes(storage.join(uri, "img_000.png"), b"png bytes")
    if ready is not None:
        storage.write_text(storage.join(uri, "_READY"), ready)
    return uri


def test_a_batch_is_submitted_once_its_ready_marker_exists_and_only_once(root):
    jobs = FakeJobs()
    watcher = LandingWatcher(root, jobs.submit, jobs.state)
    land(root, "cam2", "b1", ready=None)
    assert watcher.poll_once() == [] and jobs.submitted == []  # still uploading
    uri = land(root, "cam2", "b1")
    [event] = watcher.poll_once()
    assert event["event"] == "submitted"
    [(job_id, argv)] = jobs.submitted
    assert argv[1].endswith("jobs/adapt_target.py") and argv[argv.index("--target") + 1] == uri
    assert argv[argv.index("--source-line") + 1] == "src" and argv[argv.index("--line") + 1] == "cam2"
    assert watcher.poll_once() == []  # running: nothing new
    restarted = LandingWatcher(root, jobs.submit, jobs.state)  # a restart, or a second watcher
    assert restarted.poll_once() == [] and len(jobs.submitted) == 1
    jobs.states[job_id] = "succeeded"
    assert [e["event"] for e in restarted.poll_once()] == ["succeeded"]
    assert read_state(ready_batches(root)[0])["state"] == "succeeded"
    assert watcher.poll_once() == [] and len(jobs.submitted) == 1


def test_a_failed_job_marks_its_batch_failed_with_the_error(root):
    jobs = FakeJobs()
    watcher = LandingWatcher(root, jobs.submit, jobs.state)
    land(root, "cam3", "b1")
    [event] = watcher.poll_once()
    storage.write_text(storage.join(root, "jobs", f"{event['job_id']}.json"),
                       json.dumps({"state": "failed", "error": "DataError: no images under ..."}))
    jobs.states[event["job_id"]] = "failed"
    watcher.poll_once()
    state = read_state(ready_batches(root)[0])
    assert state["state"] == "failed" and "no images" in state["error"]
    assert registry.current_version(root, "cam3") is None  # nothing was published
    assert watcher.poll_once() == []  # and it is not retried by itself


def test_a_lost_submission_is_resubmitted_under_the_same_id(root):
    jobs = FakeJobs()
    land(root, "cam4", "b1")
    [first] = LandingWatcher(root, lambda *_: None, jobs.state).poll_once()  # crashed before submitting
    [again] = LandingWatcher(root, jobs.submit, jobs.state).poll_once()
    assert again["event"] == "resubmitted" and again["job_id"] == first["job_id"] == jobs.submitted[0][0]


def test_batches_without_a_source_or_with_bad_names(root):
    jobs = FakeJobs()
    land(root, "cam5", "b1", ready="")
    land(root, "Bad.Line", "b1")
    land(root, "cam6", "b1", ready='{"source_line": "nope"}')
    events = LandingWatcher(root, jobs.submit, jobs.state).poll_once()
    assert [e["event"] for e in events] == ["failed", "failed"] and jobs.submitted == []
    assert "no source line" in events[0]["error"] and "'nope' has no published model" in events[1]["error"]
    # A default source for the line makes the next batch go through.
    land(root, "cam5", "b2", ready="")
    [event] = LandingWatcher(root, jobs.submit, jobs.state, {"cam5": "src"}).poll_once()
    assert event["event"] == "submitted"


def test_a_ready_marker_that_is_not_json_is_an_error_naming_it(root):
    land(root, "cam7", "b1", ready="source=src")
    with pytest.raises(Exception, match="_READY marker must be empty or JSON"):
        ready_batches(root)
