"""A test that fails when the score network carries nothing (issue 22), on the toy features of
``ray_ad.data.toy_features``: per cell a two-mode mixture, anomalies half way between the modes. The
per-position Gaussian ranks those as normal; a denoiser trained on the mixture pulls them towards the
heavier mode at small t, so OSD-IRF's IRF separates them. (At the paper's t = 500 the noise swamps the
modes, the optimal denoiser is close to linear and the trained network scores like the Gaussian:
``benchmarks/osd_irf_network.py`` shows both.)
"""

import pytest
import torch

from ray_ad.data.toy_features import toy_split
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from ray_ad.metrics import auroc
from tests.conftest import tiny_osd_irf_config

GRID = 4
BACKBONE = {"image_size": 64, "grid_size": GRID, "layers": [1]}  # 24 channels


def osd_irf(t: int, t_max: int, steps: int):
    config = tiny_osd_irf_config(backbone=BACKBONE, t=t, normalisation={"kind": "position_whiten", "ridge": 0.01})
    config["score_net"] = {"hidden": 32, "depth": 2, "heads": 2, "gaussian_skip": True}
    config["train"] = {"steps": steps, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99,
                       "t_max": t_max}
    return build_detector("osd_irf", method_config("osd_irf", config))


def image_auroc(detector, train: torch.Tensor, calibration: torch.Tensor, test: torch.Tensor,
                labels: torch.Tensor) -> float:
    if detector.method == "gaussian":
        detector.fit_features(train)
    else:
        detector.fit_features(train, len(train), Runtime(progress=False))
    detector.calibrate_features(calibration)
    return auroc(detector.predict_features(test).pred_score.numpy(), labels.numpy())


def test_the_gaussian_reference_cannot_see_anomalies_between_two_modes():
    config = {"backbone": BACKBONE, "device": "cpu", "map_sigma": 1.0}
    gaussian = build_detector("gaussian", method_config("gaussian", config))
    train, calibration, test, labels = toy_split(gaussian.extractor.out_channels, GRID)
    assert image_auroc(gaussian, train, calibration, test, labels) < 0.65
    # OSD-IRF's untrained network (r = 0 with the Gaussian skip) is that same Gaussian.
    untrained = osd_irf(t=100, t_max=250, steps=0)
    assert image_auroc(untrained, train, calibration, test, labels) < 0.65


@pytest.mark.slow  # trains a (toy) score network, about 10 s
def test_trained_osd_irf_separates_what_the_gaussian_cannot_at_small_t():
    detector = osd_irf(t=100, t_max=250, steps=600)
    train, calibration, test, labels = toy_split(detector.extractor.out_channels, GRID)
    assert image_auroc(detector, train, calibration, test, labels) > 0.85
    # The network's residual r carries it: the IRF minus its Gaussian part is larger on the anomalies.
    _, residual = detector.irf_split(detector.normalise(test))
    r_norm = residual[0].pow(2).sum(1).sqrt().flatten(1).amax(1).numpy()
    assert auroc(r_norm, labels.numpy()) > 0.85
