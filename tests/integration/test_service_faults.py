"""The fleet service under abuse and faults, on a real local Serve over 127.0.0.1, a fixed number of
requests per case. After each case a valid request must score exactly as it did before."""

from __future__ import annotations

import base64
import http.client
import json
import time
import urllib.parse

import numpy as np
import pytest
import torch
from ray import serve

from ray_ad import registry, storage
from ray_ad.bundle import WEIGHTS_FILE
from ray_ad.data import load_samples
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from tests.conftest import _free_port, make_mvtec, wait_for_serve_gone
from tests.helpers import call, exported_metrics, metric, png

GOOD, FLAKY, BROKEN, ADMIN = "g" * 20, "f" * 20, "n" * 20, "z" * 24


def patchcore(data, poison: bool = False):
    # 256 px: the service's input size, at which the backbone scores an image the same in any batch.
    config = {"backbone": {"image_size": 256, "grid_size": 8, "layers": [1, 2]}, "bank_fraction": 1.0, "device": "cpu"}
    detector = build_detector("patchcore", method_config("patchcore", config))
    normals = load_samples(str(data), "train")
    detector.fit(normals[:-3], normals[-3:], Runtime(progress=False))
    if poison:
        detector.bank = torch.full_like(detector.bank, float("nan"))
    return detector


@pytest.fixture(scope="module")
def fleet(ray_cluster, tmp_path_factory):
    from ray_ad.serve.app import ServiceConfig, build_app

    base = tmp_path_factory.mktemp("faults")
    data = make_mvtec(base / "data", n_train=12)
    root = str(base / "root")
    good = patchcore(data)
    registry.publish(good, root, "good")
    registry.publish(good, root, "flaky")
    registry.publish(patchcore(data, poison=True), root, "broken")  # loads, but scores NaN
    port = _free_port()
    wait_for_serve_gone()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServiceConfig(root, tokens={"admin": ADMIN, "lines": {"good": GOOD, "flaky": FLAKY, "broken": BROKEN}},
                           poll_s=0.2, landing_interval_s=0)
    serve.run(build_app(config), name="fleet", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_until_listening(url)
    image = (data / "test" / "spot" / "000.png").read_bytes()
    status, body = call(f"{url}/v1/lines/good/detect", image, GOOD)
    assert status == 200
    yield {"url": url, "root": root, "data": data, "image": image, "score": body["results"][0]["score"],
           "port": port, "detector": good}
    serve.shutdown()


def wait_until_listening(url: str, seconds: float = 90) -> None:
    """After a module before this one shut Serve down, the new HTTP proxy can take a while to bind."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def still_scores(fleet) -> None:
    status, body = call(f"{fleet['url']}/v1/lines/good/detect", fleet["image"], GOOD)
    assert status == 200 and body["results"][0]["score"] == fleet["score"]


def ingress_rss() -> int:
    import psutil
    import ray
    from ray.util.state import list_actors

    # This test's cluster by its address: with none, another Ray on the host makes the lookup ambiguous.
    address = ray.get_runtime_context().gcs_address
    [actor] = [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])
               if "FleetAPI" in a.class_name]
    return psutil.Process(actor.pid).memory_info().rss


def test_sixteen_4096_pixel_images_are_refused_and_memory_stays_bounded(fleet):
    big = png(np.full((4096, 4096), 128, np.uint8))
    body = json.dumps({"images": [base64.b64encode(big).decode()] * 16}).encode()
    before = ingress_rss()
    for _ in range(3):
        status, out = call(f"{fleet['url']}/v1/lines/good/detect", body, GOOD, "application/json")
        assert status == 413 and "per-request limit" in out["error"]
    assert ingress_rss() - before < 300 * 2**20
    still_scores(fleet)


def test_an_image_up_to_the_pixel_limit_scores(fleet):
    # 2000 x 2000 grey: as a full-resolution array it was over gRPC's 4 MiB; the ingress sends 256 x 256.
    big = png(np.random.default_rng(0).integers(0, 255, (2000, 2000), dtype=np.uint8))
    status, out = call(f"{fleet['url']}/v1/lines/good/detect", big, GOOD)
    assert status == 200 and np.isfinite(out["results"][0]["score"])
    still_scores(fleet)


def test_a_body_over_the_limit_is_refused_from_its_content_length(fleet):
    connection = http.client.HTTPConnection("127.0.0.1", fleet["port"], timeout=30)
    connection.putrequest("POST", "/v1/lines/good/detect")
    connection.putheader("Authorization", f"Bearer {GOOD}")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(200 * 2**20))
    connection.endheaders()
    connection.send(b"\x89PNG" + b"\0" * 65536)  # a sliver of the announced 200 MiB
    response = connection.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    connection.close()
    still_scores(fleet)


@pytest.mark.parametrize(("path", "body", "content_type", "token", "status", "named"), [
    ("/v1/lines/good/detect", b"[" * 100_000 + b"]" * 100_000, "application/json", GOOD, 400, "nested too deeply"),
    (f"/v1/lines/{urllib.parse.quote('good' + chr(10))}/detect", b"x", "image/png", ADMIN, 400, "is not valid"),
    ("/v1/lines", None, None, "w" * 20, 403, "not known"),
])
def test_edges_get_their_4xx(fleet, path, body, content_type, token, status, named):
    code, out = call(fleet["url"] + path, body, token, content_type or "image/png")
    assert code == status and named in out["error"]
    still_scores(fleet)


def test_an_image_scores_the_same_alone_and_in_a_batch(fleet):
    images = [p.read_bytes() for p in sorted((fleet["data"] / "test").rglob("*.png"))][:4]
    alone = [call(f"{fleet['url']}/v1/lines/good/detect", image, GOOD)[1]["results"][0]["score"] for image in images]
    batch = json.dumps({"images": [base64.b64encode(i).decode() for i in images * 4]}).encode()
    status, out = call(f"{fleet['url']}/v1/lines/good/detect", batch, GOOD, "application/json")
    assert status == 200
    together = [row["score"] for row in out["results"]]
    assert max(abs(a - b) for a, b in zip(alone * 4, together)) < 1e-6


@serve.deployment(ray_actor_options={"num_cpus": 0})
class ScorerThatFails:
    """A scorer whose model loads and then fails while scoring, as a CUDA out-of-memory error would:
    the one fault this suite injects, since every real path raises a ray_ad error (503) instead."""

    async def ready(self) -> int:
        return 256

    async def score(self, image, heatmap: bool) -> dict:
        raise RuntimeError("CUDA out of memory (injected)")


def test_an_unexpected_scoring_error_answers_a_counted_500_without_details(fleet, ray_cluster):
    from ray_ad.serve.app import FleetAPI, ServiceConfig, Watcher

    config = ServiceConfig(fleet["root"], tokens={"admin": ADMIN, "lines": {"good": GOOD}}, landing_interval_s=0)
    app = FleetAPI.bind(ScorerThatFails.bind(), Watcher.bind(config), config)
    serve.run(app, name="failing", route_prefix="/failing")
    try:
        for _ in range(3):
            status, out = call(f"{fleet['url']}/failing/v1/lines/good/detect", fleet["image"], GOOD)
            assert status == 500 and out == {"error": "internal error while scoring on line 'good'"}
        status, info = call(f"{fleet['url']}/failing/v1/lines/good", token=GOOD)
        assert status == 200 and info["degraded"] is False  # a failed request is not a broken model
        deadline = time.monotonic() + 90  # Ray exports application metrics every few seconds
        while (counted := metric(exported_metrics(ray_cluster), "ray_ad_requests_total", line="good",
                                 status="500")) != 3:
            assert time.monotonic() < deadline, f"{counted} 500s exported for line 'good', 3 answered"
            time.sleep(1)
    finally:
        serve.delete("failing")
    still_scores(fleet)


def test_a_current_that_does_not_load_falls_back_to_the_last_good_version(fleet):
    url, root = fleet["url"], fleet["root"]
    good_version = registry.current_version(root, "flaky")
    assert call(f"{url}/v1/lines/flaky/detect", fleet["image"], FLAKY)[0] == 200  # it has served: last good
    deadline = time.monotonic() + 10
    while registry.last_good_version(root, "flaky") != good_version and time.monotonic() < deadline:
        time.sleep(0.2)
    assert registry.last_good_version(root, "flaky") == good_version
    # A new version is published, then its weights are truncated behind the registry's back.
    bad_version = registry.publish(fleet["detector"], root, "flaky")
    weights = storage.join(registry.version_uri(root, "flaky", bad_version), WEIGHTS_FILE)
    storage.write_bytes(weights, storage.read_bytes(weights)[:100])
    time.sleep(0.5)  # the ingress re-reads CURRENT every poll_s
    for _ in range(3):
        status, out = call(f"{url}/v1/lines/flaky/detect", fleet["image"], FLAKY)
        assert status == 200 and out["results"][0]["model_version"] == good_version
        assert out["results"][0]["score"] == fleet["score"]  # the same model as line "good"
    status, info = call(f"{url}/v1/lines/flaky", token=FLAKY)
    assert status == 200 and info["degraded"] is True
    assert info["version"] == good_version and info["current"] == bad_version
    assert "weights" in info["error"] and root not in info["error"] and "/tmp" not in info["error"]
    # The failed load was tried once: every request since found it in the cache (same check time).
    time.sleep(1.1)
    assert call(f"{url}/v1/lines/flaky/detect", fleet["image"], FLAKY)[0] == 200
    assert call(f"{url}/v1/lines/flaky", token=FLAKY)[1]["current_checked"] == info["current_checked"]
    # Rolling back clears the degradation.
    registry.set_current(root, "flaky", good_version)
    time.sleep(0.5)
    status, info = call(f"{url}/v1/lines/flaky", token=FLAKY)
    assert status == 200 and info["degraded"] is False and info["error"] is None
    still_scores(fleet)


def test_a_line_with_nothing_that_scores_answers_503_without_server_paths(fleet):
    url, root = fleet["url"], fleet["root"]
    first = call(f"{url}/v1/lines/broken/detect", fleet["image"], BROKEN)
    second = call(f"{url}/v1/lines/broken/detect", fleet["image"], BROKEN)
    for status, out in (first, second):
        assert status == 503 and "non-finite" in out["error"]
        assert root not in out["error"] and "/tmp" not in out["error"]
    status, info = call(f"{url}/v1/lines/broken", token=BROKEN)
    assert status == 503
    still_scores(fleet)


def test_landing_batches_are_judged_one_by_one_and_a_copy_is_the_same_job(fleet):
    url, root, data = fleet["url"], fleet["root"], fleet["data"]
    images = sorted((data / "train" / "good").glob("*.png")) + sorted((data / "test" / "good").glob("*.png"))
    assert len(images) >= 12  # what an adaptation needs
    for batch in ("b1", "b1-copy"):  # the same camera images under two folder names
        for path in images:
            storage.write_bytes(f"{root}/landing/cam/{batch}/{path.name}", path.read_bytes())
        storage.write_text(f"{root}/landing/cam/{batch}/_READY", json.dumps({"source_line": "good"}))
    storage.write_bytes(f"{root}/landing/cam/b0-bad/a.png", images[0].read_bytes())
    storage.write_text(f"{root}/landing/cam/b0-bad/_READY", "{not json")  # sorts first: must not block
    storage.write_text(f"{root}/landing/_READY", "")  # at the wrong depth
    status, out = call(f"{url}/v1/landing/poll", b"", ADMIN)
    assert status == 200
    events = {e["batch"].rsplit("/", 1)[-1]: e for e in out["events"]}
    assert events["b0-bad"]["event"] == "rejected" and "JSON" in events["b0-bad"]["error"]
    assert events["landing"]["event"] == "rejected"
    assert events["b1"]["event"] == events["b1-copy"]["event"] == "submitted"
    job_id = events["b1"]["job_id"]
    assert events["b1-copy"]["job_id"] == job_id  # one job for both: the id is the content's
    deadline, ended = time.monotonic() + 300, []
    while time.monotonic() < deadline and len(ended) < 2:
        ended += [e for e in call(f"{url}/v1/landing/poll", b"", ADMIN)[1]["events"] if e["event"] != "rejected"]
        time.sleep(2)
    assert sorted(e["event"] for e in ended) == ["succeeded", "succeeded"], ended
    job = call(f"{url}/v1/jobs/{job_id}", token=ADMIN)[1]
    assert job["ray"]["ray_status"] == "SUCCEEDED" and job["status"]["decision"] == "published"
    still_scores(fleet)
