"""What a scorer replica does to a batch, without Ray or Serve: ``score_images`` on a real detector."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from ray_ad.data import load_samples
from ray_ad.data.images import load_image
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from ray_ad.serve.scoring import score_images
from tests.conftest import make_mvtec


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    data = make_mvtec(tmp_path_factory.mktemp("scoring") / "data", n_train=8)
    config = {"backbone": {"image_size": 64, "grid_size": 8, "layers": [1, 2]}, "bank_fraction": 1.0, "device": "cpu"}
    detector = build_detector("patchcore", method_config("patchcore", config))
    normals = load_samples(str(data), "train")
    detector.fit(normals[:-2], normals[-2:], Runtime(progress=False))
    test = sorted(p for p in (data / "test").rglob("*.png"))
    return detector, [load_image(str(p), keep_gray=True) for p in test]


def test_scores_decisions_and_heatmaps_are_the_detectors(fitted):
    detector, images = fitted
    # The ingress sends uint8 arrays (grey here); PIL images and RGB arrays of another size score too.
    inputs = [np.asarray(images[0]), images[1], np.asarray(images[2].convert("RGB").resize((80, 96))), *images[3:]]
    expected_batch = detector.preprocessor.batch(
        [Image.fromarray(i) if isinstance(i, np.ndarray) else i for i in inputs])
    with torch.no_grad():
        expected = detector.predict(expected_batch).pred_score
    # A threshold between the scores, so that both decisions occur.
    detector.threshold = float(expected.median())
    flags = [i % 2 == 1 for i in range(len(inputs))]
    rows = score_images(detector, inputs, flags)

    assert [row["score"] for row in rows] == [float(s) for s in expected]
    assert [row["is_anomaly"] for row in rows] == [row["score"] > detector.threshold for row in rows]
    assert any(row["is_anomaly"] for row in rows) and not all(row["is_anomaly"] for row in rows)
    assert all(row["threshold"] == detector.threshold for row in rows)
    assert ["heatmap_png" in row for row in rows] == flags
    for row in rows[1::2]:
        heatmap = Image.open(io.BytesIO(base64.b64decode(row["heatmap_png"])))
        assert heatmap.format == "PNG" and heatmap.mode == "RGB"
        assert heatmap.size == (detector.image_size, detector.image_size) == images[0].size


def test_one_heatmap_flag_for_all_and_flags_that_do_not_match(fitted):
    detector, images = fitted
    assert all("heatmap_png" in row for row in score_images(detector, images[:2], True))
    assert score_images(detector, [], False) == []
    with pytest.raises(ValueError, match="2 images but 1 heatmap flags"):
        score_images(detector, images[:2], [True])
