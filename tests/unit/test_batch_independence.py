"""The service batches concurrent requests: an image's score must not depend on its batch-mates."""

import pytest
import torch

from ray_ad.data import load_samples
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from tests.conftest import batch_dependence, image_batch, make_mvtec, tiny_osd_irf_config

pytestmark = pytest.mark.slow  # fits detectors at the service's 256 px

# At the service's input size: at 64 px the backbone's own convolutions already differ by 1e-5 with
# the batch size (oneDNN picks another kernel), at 256 px they do not.
BACKBONE = {"image_size": 256, "grid_size": 8, "layers": [1, 2]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = make_mvtec(tmp_path_factory.mktemp("batching") / "data", n_train=20, n_good=4, n_bad=4)
    samples = load_samples(str(root))
    normals = sorted((s for s in samples if s.split == "train"), key=lambda s: s.path)
    return root, normals[:12], normals[12:]


@pytest.mark.parametrize("method, config", [
    ("patchcore", {"backbone": BACKBONE, "bank_fraction": 1.0, "device": "cpu"}),
    ("patchcore", {"backbone": BACKBONE, "bank_fraction": 0.25, "device": "cpu"}),
    ("target_memory", {"backbone": BACKBONE, "device": "cpu"}),
    ("osd_irf", tiny_osd_irf_config(backbone=BACKBONE, train={"steps": 20, "batch_size": 8, "warmup_steps": 2})),
])
def test_an_image_scores_the_same_alone_and_in_any_batch(data, method, config):
    root, train, calibration = data
    torch.manual_seed(0)
    detector = build_detector(method, method_config(method, config))
    detector.fit(train, calibration, Runtime(progress=False))
    images = image_batch(root, detector)
    assert batch_dependence(detector, images) < 1e-6
