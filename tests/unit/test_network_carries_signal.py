"""A test that fails when the score network carries nothing (issue 22), on the toy features of
``ray_ad.data.toy_features``: per cell a two-mode mixture, anomalies half way between the modes. The
per-position Gaussian ranks those as normal; a denoiser trained on the mixture pulls them towards the
heavier mode at small t, so OSD-IRF's IRF separates them. (At the paper's t = 500 the noise swamps the
modes, the optimal denoiser is close to linear and the trained network scores like the Gaussian:
``benchmarks/osd_irf_network.py`` shows both.)

The same for REF's source score network S1, read without its label-trained head: under N(0, I)'s
exact denoiser every residual of the reverse chain is parallel to the cell's own feature, so the
orthogonal residual M (Eq. 4) and its energy E_M (Eq. 6) are zero; a trained S1 turns the chain on
the cells between the modes.
"""

import pytest
import torch

from ray_ad.data.toy_features import toy_split
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from ray_ad.metrics import auroc
from tests.conftest import tiny_osd_irf_config, tiny_ref_cfa_config

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


# ---------------------------------------------------------------------------------------- REF
def ref_source(steps: int):
    """REF+CFA's source score network S1 on the toy, its reverse chain inside the trained range."""
    config = tiny_ref_cfa_config(backbone=BACKBONE, normalisation={"kind": "position_whiten", "ridge": 0.01})
    config["score_net"] = {"hidden": 32, "depth": 2, "heads": 2, "gaussian_skip": True}
    config["train"] = {"steps": steps, "batch_size": 64, "lr": 1e-3, "warmup_steps": 20, "ema_decay": 0.99,
                       "t_max": 250}
    config["fields"] = {"timesteps": [200, 150, 100, 50], "token_dim": 4}
    return build_detector("ref_cfa", method_config("ref_cfa", config))


def m_energy_auroc(detector, train: torch.Tensor, test: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(image AUROC of the largest E_M of an image's cells, E_M relative to E_R on the test cells)."""
    detector.fit_source_features(train, Runtime(progress=False))
    stats = detector.source_statistics(test)
    e_r, e_m = stats.E[:, 0], stats.E[:, 1]  # Eq. 6 for X = R and X = M
    image_score = e_m.view(len(test), -1).amax(1)
    return auroc(image_score.numpy(), labels.numpy()), (e_m.sum() / e_r.sum()).item()


def test_refs_gaussian_denoiser_has_no_orthogonal_residual():
    # Untrained, S1 is N(0, I)'s exact denoiser: every residual is parallel to the cell's own feature,
    # so M (Eq. 4) is rounding noise and ranks the toy's anomalies at chance.
    detector = ref_source(steps=0)
    train, _, test, labels = toy_split(detector.extractor.out_channels, GRID)
    image_auroc_m, m_over_r = m_energy_auroc(detector, train, test, labels)
    assert m_over_r < 1e-6
    assert image_auroc_m < 0.65


@pytest.mark.slow  # trains a (toy) score network, about 40 s
def test_trained_ref_source_network_turns_its_chain_on_anomalies_between_two_modes():
    detector = ref_source(steps=800)
    train, _, test, labels = toy_split(detector.extractor.out_channels, GRID)
    image_auroc_m, m_over_r = m_energy_auroc(detector, train, test, labels)
    assert m_over_r > 1e-3  # the network moved the chain off the cell's own direction ...
    assert image_auroc_m > 0.85  # ... and most on the cells the Gaussian ranks as normal
