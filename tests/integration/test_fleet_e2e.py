"""End to end on a real local Ray, Serve on 127.0.0.1 and S3 on 127.0.0.1: a new domain lands, the
watcher's job adapts it, and the new line answers over HTTP."""

from __future__ import annotations

import json
import time

from ray_ad import registry, storage
from ray_ad.data import load_samples
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from tests.conftest import _free_port, make_mvtec, shift_folder, tiny_ref_cfa_config, upload_folder, wait_for_serve_gone
from tests.helpers import call

ADMIN, SRC, CAM2 = "z" * 24, "s" * 20, "c" * 20


def test_publish_detect_land_adapt_detect(ray_cluster, s3_bucket, tmp_path):
    from ray import serve

    from ray_ad.data import split_calibration
    from ray_ad.serve.app import ServiceConfig, build_app

    root = f"{s3_bucket}/fleet"
    source = make_mvtec(tmp_path / "source", n_train=10)
    detector = build_detector("ref_cfa", method_config("ref_cfa", tiny_ref_cfa_config()))
    train, held = split_calibration([s for s in load_samples(str(source)) if s.label in (0, 1)], 0.2)
    detector.fit(train, [s for s in held if s.label == 0] or train[:1], Runtime(progress=False))
    registry.publish(detector, root, "src")

    port = _free_port()
    wait_for_serve_gone()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServiceConfig(root, tokens={"admin": ADMIN, "lines": {"src": SRC, "cam2": CAM2}}, poll_s=0.5,
                           landing_interval_s=0)
    serve.run(build_app(config), name="fleet", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    try:
        image = (source / "test" / "spot" / "000.png").read_bytes()
        assert call(f"{url}/v1/lines/src/detect", image, SRC)[0] == 200

        # A new camera's images land; the batch counts only once _READY exists.
        target = shift_folder(make_mvtec(tmp_path / "raw", n_train=16, seed=3), tmp_path / "target")
        batch = f"{root}/landing/cam2/b1"
        upload_folder(target / "train", batch)
        assert call(f"{url}/v1/landing/poll", b"", ADMIN)[1]["events"] == []
        storage.write_text(f"{batch}/_READY", json.dumps({"source_line": "src"}))
        assert call(f"{url}/v1/landing/poll", b"", SRC)[0] == 403  # polling is for the admin
        [event] = call(f"{url}/v1/landing/poll", b"", ADMIN)[1]["events"]
        assert event["event"] == "submitted"
        job_id = event["job_id"]

        deadline, job = time.monotonic() + 300, {}
        while time.monotonic() < deadline:
            job = call(f"{url}/v1/jobs/{job_id}", token=ADMIN)[1]
            if job["ray"] and job["ray"]["ray_status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2)
        assert job["ray"]["ray_status"] == "SUCCEEDED", job
        assert job["status"]["state"] == "succeeded" and job["status"]["target"] == batch
        # The job's gate evidence is visible over HTTP: every candidate's score and the decision.
        assert job["status"]["decision"] == "published"  # cam2 is a new line: nothing served to beat
        assert set(job["status"]["gate"]["candidates"]) == {"source", "target_memory", "target_gaussian", "ref_cfa"}
        assert job["status"]["winner"] in job["status"]["gate"]["candidates"]

        assert [e["event"] for e in call(f"{url}/v1/landing/poll", b"", ADMIN)[1]["events"]] == ["succeeded"]
        assert call(f"{url}/v1/landing/poll", b"", ADMIN)[1]["events"] == []  # a second pass submits nothing

        version = registry.current_version(root, "cam2")
        status, body = call(f"{url}/v1/lines/cam2/detect", (target / "test" / "spot" / "000.png").read_bytes(), CAM2)
        assert status == 200 and body["results"][0]["model_version"] == version
        assert call(f"{url}/v1/lines/cam2/detect", image, SRC)[0] == 403
        assert call(f"{url}/v1/lines/cam2/detect", image)[0] == 401
        assert call(f"{url}/v1/jobs/{job_id}", token=CAM2)[0] == 403
    finally:
        serve.shutdown()
