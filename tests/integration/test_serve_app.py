"""The Serve application on a real local Ray, HTTP on 127.0.0.1: detect, tokens, bad input, new versions."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from ray_ad import registry
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from tests.conftest import (
    _free_port,
    make_mvtec,
    tiny_costfilter_config,
    tiny_nagl_config,
    tiny_osd_irf_config,
    wait_for_serve_gone,
)
from tests.helpers import call, exported_metrics, metric, png

A, B, N, ADMIN = "a" * 20, "b" * 20, "n" * 20, "z" * 24


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from ray import serve

    from ray_ad.data import load_samples
    from ray_ad.serve.app import ScorerOptions, ServiceConfig, build_app

    base = tmp_path_factory.mktemp("serve")
    data = make_mvtec(base / "data")
    root = str(base / "root")
    config = tiny_osd_irf_config(train={"steps": 30, "batch_size": 8, "warmup_steps": 5})
    detector = build_detector("osd_irf", method_config("osd_irf", config))
    normals = load_samples(str(data), "train")
    detector.fit(normals[:-2], normals[-2:], Runtime(progress=False))
    for line in ("line-a", "line-b"):
        registry.publish(detector, root, line, {"image_auroc": 1.0})
    port = _free_port()
    wait_for_serve_gone()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Two scorer replicas, as serve_configs/local.yaml runs: multiplexing, version switches and the
    # metrics must hold when a line's requests may reach either replica.
    config = ServiceConfig(root, tokens={"admin": ADMIN, "lines": {"line-a": A, "line-b": B, "line-n": N}}, poll_s=0.5,
                           landing_interval_s=0, scorer=ScorerOptions(replicas=2))
    serve.run(build_app(config), name="fleet", route_prefix="/")
    yield f"http://127.0.0.1:{port}", root, detector, data
    serve.shutdown()


def test_detect_scores_images_and_tokens_guard_lines(service):
    url, root, _, data = service
    image = (data / "test" / "spot" / "000.png").read_bytes()
    status, body = call(f"{url}/v1/lines/line-a/detect", image, A)
    assert status == 200, body
    [row] = body["results"]
    assert row["model_version"] == registry.current_version(root, "line-a")
    assert isinstance(row["score"], float) and row["is_anomaly"] == (row["score"] > row["threshold"])
    assert call(f"{url}/v1/lines/line-b/detect", image, A)[0] == 403
    assert call(f"{url}/v1/lines/line-a/detect", image)[0] == 401
    status, body = call(f"{url}/v1/lines", token=A)
    assert status == 200 and body["lines"] == ["line-a"]
    assert call(f"{url}/v1/lines", token=ADMIN)[1]["lines"] == ["line-a", "line-b"]
    status, info = call(f"{url}/v1/lines/line-b", token=B)
    assert status == 200 and info["method"] == "osd_irf" and info["metrics"]["image_auroc"] == 1.0


def test_json_batches_and_heatmaps(service):
    url, _, _, data = service
    images = [base64.b64encode((data / "test" / d / "000.png").read_bytes()).decode() for d in ("good", "spot")]
    body = json.dumps({"images": [{"name": "good.png", "data": images[0]}, images[1]]}).encode()
    status, out = call(f"{url}/v1/lines/line-a/detect?heatmap=true", body, A, "application/json")
    assert status == 200 and [r["name"] for r in out["results"]] == ["good.png", "images[1]"]
    heatmap = base64.b64decode(out["results"][1]["heatmap_png"])
    assert Image.open(io.BytesIO(heatmap)).size == (64, 64)
    assert out["results"][1]["score"] > out["results"][0]["score"]  # the bright square scores higher


def test_multipart_uploads_as_curl_sends_them(service):
    url, _, _, data = service
    boundary = "ray-ad-test-boundary"
    body = b""
    for defect in ("good", "spot"):
        image = (data / "test" / defect / "000.png").read_bytes()
        body += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{defect}.png"\r\n'
                 "Content-Type: image/png\r\n\r\n").encode() + image + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    status, out = call(f"{url}/v1/lines/line-a/detect", body, A, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and [r["name"] for r in out["results"]] == ["good.png", "spot.png"]
    assert out["results"][1]["score"] > out["results"][0]["score"]


@pytest.mark.parametrize(("path", "body", "content_type", "status"), [
    ("line-a", b"", "image/png", 400),
    ("line-a", b"not an image", "image/png", 422),
    ("line-a", png(np.zeros((64, 64), np.uint8))[:50], "image/png", 422),
    ("line-a", b"{oops", "application/json", 400),
    ("line-a", b"--x\r\nContent-Disposition: form-data; name=a\r\n\r\nv\r\n--x--\r\n",
     "multipart/form-data; boundary=x", 400),  # a form without a file
    ("line-a", b'{"images": ["***"]}', "application/json", 400),
    ("line-a", png(np.zeros((5000, 4000), np.uint8)), "image/png", 413),
    ("no-such-line", png(np.zeros((8, 8), np.uint8)), "image/png", 403),
    ("Line.A", png(np.zeros((8, 8), np.uint8)), "image/png", 400),
    ("..%2Fline-a", png(np.zeros((8, 8), np.uint8)), "image/png", 404),
])
def test_bad_input_gets_a_4xx_and_the_service_keeps_answering(service, path, body, content_type, status):
    url, _, _, data = service
    code, out = call(f"{url}/v1/lines/{path}/detect", body, ADMIN if path != "no-such-line" else A, content_type)
    assert code == status and out["error"]
    good = call(f"{url}/v1/lines/line-a/detect", (data / "test" / "good" / "000.png").read_bytes(), A)
    assert good[0] == 200


def test_a_new_version_is_served_without_a_restart(service):
    import time

    url, root, detector, data = service
    image = (data / "test" / "good" / "000.png").read_bytes()
    before = call(f"{url}/v1/lines/line-b/detect", image, B)[1]["results"][0]["model_version"]
    detector.threshold = detector.threshold * 2
    new = registry.publish(detector, root, "line-b")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        row = call(f"{url}/v1/lines/line-b/detect", image, B)[1]["results"][0]
        if row["model_version"] == new:
            break
        time.sleep(0.3)
    assert before != new and row["model_version"] == new
    assert row["threshold"] == pytest.approx(detector.threshold)


def test_custom_metrics_count_requests_images_anomalies_and_version_per_line(service, ray_cluster):
    import time

    url, root, detector, data = service
    version = registry.publish(detector, root, "line-c")  # a line no other test touches: exact counts
    image = (data / "test" / "spot" / "000.png").read_bytes()
    flagged = 0
    for _ in range(3):
        status, body = call(f"{url}/v1/lines/line-c/detect", image, ADMIN)
        assert status == 200
        flagged += body["results"][0]["is_anomaly"]
    batch = json.dumps({"images": [base64.b64encode(image).decode()] * 2}).encode()
    status, body = call(f"{url}/v1/lines/line-c/detect", batch, ADMIN, "application/json")
    assert status == 200
    flagged += sum(row["is_anomaly"] for row in body["results"])
    assert call(f"{url}/v1/lines/line-c/detect", b"", ADMIN)[0] == 400

    deadline = time.monotonic() + 90  # Ray exports application metrics every few seconds
    while True:
        values = exported_metrics(ray_cluster)
        observed = {
            "requests": metric(values, "ray_ad_requests_total", line="line-c", status="200"),
            "images": metric(values, "ray_ad_images_total", line="line-c"),
            "anomalies": metric(values, "ray_ad_anomalies_total", line="line-c"),
            "latency_count": metric(values, "ray_ad_detect_latency_ms_count", line="line-c"),
            "version": metric(values, "ray_ad_model_version", line="line-c", version=version),
            "bad_requests": metric(values, "ray_ad_requests_total", line="-", status="400"),
        }
        expected = {"requests": 4, "images": 5, "anomalies": flagged, "latency_count": 4, "version": 1}
        if all(observed[k] == v for k, v in expected.items()) and observed["bad_requests"] >= 1:
            break
        assert time.monotonic() < deadline, f"exported {observed}, expected {expected} and a 400 under line '-'"
        time.sleep(1)


def test_a_costfilter_line_scores_over_http_as_its_bundle_does(service):
    """A CostFilter-AD bundle (filter + template bank + its base) is served like any other method."""
    import torch

    from ray_ad.data.images import load_image
    from ray_ad.pipeline import train_detector

    url, root, _, data = service
    detector, _ = train_detector("costfilter", str(data), tiny_costfilter_config(), runtime=Runtime(progress=False),
                                 evaluate=False)
    version = registry.publish(detector, root, "line-cf")
    path = data / "test" / "spot" / "001.png"
    status, body = call(f"{url}/v1/lines/line-cf/detect", path.read_bytes(), ADMIN)
    assert status == 200, body
    [row] = body["results"]
    with torch.no_grad():
        image = detector.preprocess(load_image(str(path), keep_gray=True))[None]
        expected = float(detector.predict(image).pred_score[0])
    assert row["model_version"] == version and row["score"] == pytest.approx(expected, abs=1e-5)
    assert call(f"{url}/v1/lines/line-cf", token=ADMIN)[1]["method"] == "costfilter"


def _reference_body(data, **extra) -> bytes:
    def b64(path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    body = {"normal": [{"name": f"n{i}.png", "data": b64(data / "train" / "good" / f"00{i}.png")} for i in range(3)],
            "abnormal": [{"name": "a0.png", "data": b64(data / "test" / "spot" / "000.png"),
                          "mask": b64(data / "ground_truth" / "spot" / "000_mask.png")}]}
    body.update(extra)
    return json.dumps(body).encode()


def test_a_nagl_line_serves_from_uploaded_references_within_a_minute(service):
    """A new line from a trained NAGL generalist and its references, no training: upload, then serve."""
    import time

    import torch

    from ray_ad.data.images import load_image
    from ray_ad.methods.nagl.references import build_references

    url, root, _, data = service
    from ray_ad.data import load_samples

    generalist = build_detector("nagl", method_config("nagl", tiny_nagl_config(train={
        "steps": 20, "batch_size": 4, "synthetic_count": 8, "max_normals": 8})))
    generalist.fit([s for s in load_samples(str(data)) if s.label in (0, 1)], [], Runtime(progress=False))
    registry.publish(generalist, root, "nagl-gen")
    query = data / "test" / "spot" / "001.png"

    # The line's own token cannot read the generalist's line: 403, nothing published.
    status, out = call(f"{url}/v1/lines/line-n/references", _reference_body(data, model_line="nagl-gen"), N,
                       "application/json")
    assert status == 403 and "nagl-gen" in out["error"] and registry.list_versions(root, "line-n") == []

    started = time.monotonic()
    status, out = call(f"{url}/v1/lines/line-n/references", _reference_body(data, model_line="nagl-gen"), ADMIN,
                       "application/json")
    assert status == 200, out
    status, body = call(f"{url}/v1/lines/line-n/detect", query.read_bytes(), N)
    elapsed = time.monotonic() - started
    assert status == 200 and body["results"][0]["model_version"] == out["version"], body
    assert elapsed < 60, f"upload to first served answer took {elapsed:.1f} s"

    # The served score is the generalist's score with these references.
    images = {p.name: load_image(str(p)) for p in sorted((data / "train" / "good").glob("00[0-2].png"))}
    mask = Image.open(data / "ground_truth" / "spot" / "000_mask.png")
    generalist.set_references(build_references(
        [(n, image) for n, image in images.items()],
        [("a0", load_image(str(data / "test" / "spot" / "000.png")), mask)], generalist.image_size))
    with torch.no_grad():
        expected = float(generalist.predict(generalist.preprocess(load_image(str(query), keep_gray=True))[None])
                         .pred_score[0])
    assert body["results"][0]["score"] == pytest.approx(expected, abs=1e-5)

    # Token isolation holds as for any line; the line's own token may replace its references.
    assert call(f"{url}/v1/lines/line-n/detect", query.read_bytes(), A)[0] == 403
    assert call(f"{url}/v1/lines/line-n/references", _reference_body(data), A, "application/json")[0] == 403
    status, again = call(f"{url}/v1/lines/line-n/references", _reference_body(data), N, "application/json")
    assert status == 200 and again["model"].startswith("line-n@")


@pytest.mark.parametrize(("change", "status", "message"), [
    ({"normal": []}, 422, "no normal reference"),
    ({"abnormal": [{"name": "a.png", "data": "AAAA"}]}, 422, "a.png"),  # unreadable image
    ("no mask", 422, "no mask given"),
    ("small mask", 422, "its mask is 32x32 but the image is 64x64"),
    ("empty mask", 422, "marks no defect pixel"),
    ({"normal": "x"}, 400, "the body must be JSON"),
])
def test_bad_reference_uploads_get_a_4xx_and_publish_nothing(service, change, status, message):
    url, root, _, data = service
    if registry.current_version(root, "line-n") is None:
        pytest.skip("needs the NAGL line of the test above")
    body = json.loads(_reference_body(data))
    abnormal = body["abnormal"][0]
    if change == "no mask":
        del abnormal["mask"]
    elif change in ("small mask", "empty mask"):
        mask = np.zeros((32, 32) if change == "small mask" else (64, 64), np.uint8)
        mask[:4, :4] = 255 if change == "small mask" else 0
        abnormal["mask"] = base64.b64encode(png(mask)).decode()
    else:
        body.update(change)
    before = (registry.current_version(root, "line-n"), registry.list_versions(root, "line-n"))
    code, out = call(f"{url}/v1/lines/line-n/references", json.dumps(body).encode(), ADMIN, "application/json")
    assert code == status and message in out["error"], out
    assert (registry.current_version(root, "line-n"), registry.list_versions(root, "line-n")) == before
