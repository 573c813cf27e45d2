"""The landing watcher's state machine over a real storage root (local and S3): each batch adapted once."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ray_ad import registry, storage
from ray_ad.pipeline import target_image_uris
from ray_ad.serve.landing import MANIFEST, LandingWatcher, read_state, ready_batches, update_key
from tests.helpers import random_bank_patchcore

ADMIN = "z" * 24


class FakeJobs:
    """Stands in for the Ray Jobs API: records submissions; refuses a second one with the same id."""

    def __init__(self) -> None:
        self.submitted: list[tuple[str, list[str]]] = []
        self.states: dict[str, str] = {}

    def submit(self, job_id: str, argv: list[str]) -> None:
        if job_id in self.states:  # what RayJobs.submit does with the Jobs API's "already exists"
            return
        self.submitted.append((job_id, argv))
        self.states[job_id] = "running"

    def state(self, job_id: str) -> str | None:
        return self.states.get(job_id)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    root = str(tmp_path / "root") if request.param == "local" else request.getfixturevalue("s3_bucket") + "/root"
    registry.publish(random_bank_patchcore(1), root, "src")
    return root


def png(seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def land(root: str, line: str, batch: str, ready: str | None = '{"source_line": "src"}',
         images: dict[str, bytes] | None = None) -> str:
    uri = storage.join(root, "landing", line, batch)
    images = images if images is not None else {f"img_{i:03d}.png": png(i) for i in range(12)}
    for name, data in images.items():
        storage.write_bytes(storage.join(uri, name), data)
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


def test_batches_without_a_source_are_rejected_with_the_reason(root):
    jobs = FakeJobs()
    land(root, "cam5", "b1", ready="")
    land(root, "cam6", "b1", ready='{"source_line": "nope"}')
    events = LandingWatcher(root, jobs.submit, jobs.state).poll_once()
    assert [e["event"] for e in events] == ["rejected", "rejected"] and jobs.submitted == []
    assert "no source line" in events[0]["error"] and "'nope' has no published model" in events[1]["error"]
    assert read_state(ready_batches(root)[0])["state"] == "rejected"
    # A default source for the line makes the next batch go through.
    land(root, "cam5", "b2", ready="")
    [event] = LandingWatcher(root, jobs.submit, jobs.state, {"cam5": "src"}).poll_once()
    assert event["event"] == "submitted"


@pytest.mark.parametrize(("line", "batch", "ready", "reason"), [
    ("cam7", "b1", "source=src", "must be empty or JSON"),
    ("cam7", "b1", '["src"]', "must be a JSON object"),
    ("cam7", "b1", '{"source_line": ["a"]}', "'source_line' must be a string"),
    ("cam7", "b1", '{"source_line": "../../etc"}', "source line '../../etc' is not valid"),
    ("cam7", "b1", '{"source": "src"}', "unknown _READY keys ['source']"),
    ("Bad.Line", "b1", '{"source_line": "src"}', "line 'Bad.Line' is not valid"),
    ("cam7", "B 1", '{"source_line": "src"}', "batch id 'B 1' is not valid"),
])
def test_a_bad_marker_rejects_its_batch_only(root, line, batch, ready, reason):
    jobs = FakeJobs()
    land(root, "cam8", "b1")  # a good batch beside it
    bad = land(root, line, batch, ready)
    events = LandingWatcher(root, jobs.submit, jobs.state).poll_once()
    [rejected] = [e for e in events if e["event"] == "rejected"]
    assert rejected["batch"] == bad and reason in rejected["error"]
    assert json.loads(storage.read_text(f"{bad}/_STATE"))["state"] == "rejected"
    assert [e["event"] for e in events if e["batch"] != bad] == ["submitted"] and len(jobs.submitted) == 1
    # Rejected once: the next pass says nothing new about it.
    assert LandingWatcher(root, jobs.submit, jobs.state).poll_once() == []


def test_markers_at_the_wrong_depth_invent_no_line(root):
    jobs = FakeJobs()
    storage.write_text(storage.join(root, "landing", "cam9", "_READY"), "")
    deep = land(root, "cam9", "a/b")
    events = LandingWatcher(root, jobs.submit, jobs.state).poll_once()
    assert sorted(e["event"] for e in events) == ["rejected", "rejected"] and jobs.submitted == []
    assert all("belongs at landing/<line>/<batch>/_READY" in e["error"] for e in events)
    assert {e["batch"] for e in events} == {storage.join(root, "landing", "cam9"), deep}


@pytest.mark.parametrize(("images", "reason"), [
    ({}, "no readable images"),
    ({"notes.txt": b"hello"}, "no readable images"),
    ({"a.png": png(0), "broken.png": png(1)[:40]}, "broken.png: not a readable image"),
    ({f"{i}.png": png(i) for i in range(11)}, "11 readable images in the batch; an adaptation needs at least 12"),
])
def test_empty_batches_and_unreadable_images_are_rejected_before_any_job(root, images, reason):
    jobs = FakeJobs()
    land(root, "cam10", "b1", images=images)
    [event] = LandingWatcher(root, jobs.submit, jobs.state).poll_once()
    assert event["event"] == "rejected" and reason in event["error"] and jobs.submitted == []


def test_unreadable_images_can_be_skipped_by_config_and_the_job_reads_the_rest(root):
    jobs = FakeJobs()
    good = {f"{i:02d}.png": png(i) for i in range(12)}
    uri = land(root, "cam11", "b1", images={**good, "broken.png": b"\x89PNG junk"})
    [event] = LandingWatcher(root, jobs.submit, jobs.state, skip_unreadable=True).poll_once()
    assert event["event"] == "submitted" and event["skipped"] == ["broken.png"]
    manifest = json.loads(storage.read_text(f"{uri}/{MANIFEST}"))
    assert [i["name"] for i in manifest["images"]] == sorted(good)
    assert manifest["skipped"][0]["name"] == "broken.png"
    assert [p.rsplit("/", 1)[-1] for p in target_image_uris(uri)] == sorted(good)


def test_a_copied_batch_is_the_same_job(root):
    jobs = FakeJobs()
    land(root, "cam12", "b1")
    land(root, "cam12", "b1-copy")  # the same images under another folder name
    events = LandingWatcher(root, jobs.submit, jobs.state).poll_once()
    assert [e["event"] for e in events] == ["submitted", "submitted"]
    assert events[0]["job_id"] == events[1]["job_id"] and len(jobs.submitted) == 1
    land(root, "cam12", "b2", images={f"{i}.png": png(i + 1) for i in range(12)})  # other content: another job
    [other] = LandingWatcher(root, jobs.submit, jobs.state).poll_once()
    assert other["job_id"] != events[0]["job_id"] and len(jobs.submitted) == 2


def test_landing_into_a_served_line_needs_the_admins_key(root):
    jobs = FakeJobs()
    registry.publish(random_bank_patchcore(2), root, "cam13")
    land(root, "cam13", "b1")
    land(root, "cam13", "b2", ready=json.dumps({"source_line": "src", "update_line": "0" * 64}))
    land(root, "cam13", "b3", ready=json.dumps({"source_line": "src", "update_line": update_key(ADMIN, "cam13", "b3")}))
    events = LandingWatcher(root, jobs.submit, jobs.state, admin_token=ADMIN).poll_once()
    assert [e["event"] for e in events] == ["rejected", "rejected", "submitted"]
    assert "already serves a model" in events[0]["error"]
    assert events[2]["batch"].endswith("/b3") and len(jobs.submitted) == 1
    # A key for another batch opens nothing: it is bound to <line>/<batch>.
    land(root, "cam13", "b4", ready=json.dumps({"source_line": "src", "update_line": update_key(ADMIN, "cam13", "b3")}))
    [event] = LandingWatcher(root, jobs.submit, jobs.state, admin_token=ADMIN).poll_once()
    assert event["event"] == "rejected"


def test_a_restart_takes_the_end_of_a_job_from_its_status_object(root):
    jobs = FakeJobs()
    land(root, "cam14", "b1")
    [event] = LandingWatcher(root, jobs.submit, jobs.state).poll_once()
    # The service (and its Ray cluster) stopped mid-job; the job wrote "failed" on its way out.
    storage.write_text(storage.join(root, "jobs", f"{event['job_id']}.json"),
                       json.dumps({"state": "failed", "error": "stopped by SIGTERM"}))
    fresh = FakeJobs()  # a new cluster knows no job
    [after] = LandingWatcher(root, fresh.submit, fresh.state).poll_once()
    assert after["event"] == "failed" and fresh.submitted == []
    state = read_state(ready_batches(root)[0])
    assert state["state"] == "failed" and "SIGTERM" in state["error"]



def test_the_cli_prints_the_admins_key_for_a_batch(tmp_path, capsys, monkeypatch):
    from ray_ad import cli

    monkeypatch.setenv("RAY_AD_TOKENS", json.dumps({"admin": ADMIN}))
    assert cli.main(["landing-key", "--line", "cam13", "--batch", "b3", "--source-line", "src"]) == 0
    marker = json.loads(capsys.readouterr().out)
    assert marker == {"source_line": "src", "update_line": update_key(ADMIN, "cam13", "b3")}
    monkeypatch.setenv("RAY_AD_TOKENS", json.dumps({"lines": {"cam13": "c" * 20}}))
    assert cli.main(["landing-key", "--line", "cam13", "--batch", "b3"]) == 2
    assert "no admin token" in capsys.readouterr().err
