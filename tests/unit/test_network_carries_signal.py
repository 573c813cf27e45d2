"""A test that fails when the score network carries nothing (issue 22).

Normal cells follow a two-mode mixture that no Gaussian describes: along one direction u a cell sits
at +2 (three times in four) or at -2, with small isotropic noise. An anomalous image has four of its 16 cells
half way between the modes, at 0. Per position, the whitened Gaussian puts that point nearer its mean
than the -2 mode (z = -0.58 against -1.73 along u), so the Gaussian reference ranks the anomalies as
normal. A denoiser trained on the mixture pulls a point between the modes towards the heavier one at
small t, so its IRF there is large, while at a mode it is close to 0: OSD-IRF separates them. At the
paper's t = 500 the noise (std 0.96 against the modes' sqrt(alpha_bar) * 2 = 0.56) swamps the modes,
the optimal denoiser is close to linear, and the trained network scores like the Gaussian.
"""

import numpy as np
import pytest
import torch

from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from ray_ad.metrics import auroc
from tests.conftest import tiny_osd_irf_config

GRID = 4
BACKBONE = {"image_size": 64, "grid_size": GRID, "layers": [1]}  # 24 channels


def mixture_cells(count: int, channels: int, generator: torch.Generator, anomalous_cells: int = 0) -> torch.Tensor:
    """Features ``[count, channels, GRID, GRID]``: per cell s * 2u + noise, s = +1 (p 0.75) or -1;
    ``anomalous_cells`` cells of each image at s = 0, between the modes."""
    u = torch.randn(channels, generator=torch.Generator().manual_seed(7))
    u = u / u.norm()
    s = torch.where(torch.rand(count, GRID * GRID, generator=generator) < 0.75, 1.0, -1.0)
    for row in s if anomalous_cells else ():
        row[torch.randperm(GRID * GRID, generator=generator)[:anomalous_cells]] = 0.0
    cells = 2.0 * s.view(count, 1, GRID, GRID) * u.view(1, -1, 1, 1)
    return cells + 0.15 * torch.randn(count, channels, GRID, GRID, generator=generator)


def toy_split(channels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    generator = torch.Generator().manual_seed(0)
    train, calibration = mixture_cells(512, channels, generator), mixture_cells(64, channels, generator)
    test = torch.cat([mixture_cells(64, channels, generator), mixture_cells(64, channels, generator, 4)])
    return train, calibration, test, np.r_[np.zeros(64), np.ones(64)]


def osd_irf(t: int, t_max: int, steps: int):
    config = tiny_osd_irf_config(backbone=BACKBONE, t=t, normalisation={"kind": "position_whiten", "ridge": 0.01})
    config["score_net"] = {"hidden": 32, "depth": 2, "heads": 2, "gaussian_skip": True}
    config["train"] = {"steps": steps, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99,
                       "t_max": t_max}
    return build_detector("osd_irf", method_config("osd_irf", config))


def image_auroc(detector, train: torch.Tensor, calibration: torch.Tensor, test: torch.Tensor,
                labels: np.ndarray) -> float:
    if detector.method == "gaussian":
        detector.fit_features(train)
    else:
        detector.fit_features(train, len(train), Runtime(progress=False))
    detector.calibrate_features(calibration)
    return auroc(detector.predict_features(test).pred_score.numpy(), labels)


def test_the_gaussian_reference_cannot_see_anomalies_between_two_modes():
    config = {"backbone": BACKBONE, "device": "cpu", "map_sigma": 1.0}
    gaussian = build_detector("gaussian", method_config("gaussian", config))
    train, calibration, test, labels = toy_split(gaussian.extractor.out_channels)
    assert image_auroc(gaussian, train, calibration, test, labels) < 0.65
    # OSD-IRF's untrained network (r = 0 with the Gaussian skip) is that same Gaussian.
    untrained = osd_irf(t=100, t_max=250, steps=0)
    assert image_auroc(untrained, train, calibration, test, labels) < 0.65


@pytest.mark.slow  # trains a (toy) score network, about 10 s
def test_trained_osd_irf_separates_what_the_gaussian_cannot_at_small_t():
    detector = osd_irf(t=100, t_max=250, steps=600)
    train, calibration, test, labels = toy_split(detector.extractor.out_channels)
    assert image_auroc(detector, train, calibration, test, labels) > 0.85
    # The network's residual r carries it: the IRF minus its Gaussian part is larger on the anomalies.
    _, residual = detector.irf_split(detector.normalise(test))
    r_norm = residual[0].pow(2).sum(1).sqrt().flatten(1).amax(1).numpy()
    assert auroc(r_norm, labels) > 0.85
