"""The per-position Gaussian detector: OSD-IRF's recipe with a zero residual, as a detector of its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from ray_ad.bundle import load_bundle, save_bundle
from ray_ad.errors import ConfigError
from ray_ad.methods import build_detector, method_config
from ray_ad.methods.base import Runtime
from ray_ad.pipeline import train_detector
from tests.conftest import make_mvtec, tiny_osd_irf_config

# One stage (24 channels) and 60 training images: every position's covariance is well conditioned.
BACKBONE = {"image_size": 64, "grid_size": 8, "layers": [1], "local_pool": 3}


def spot_images(root: Path, detector) -> torch.Tensor:
    return torch.stack([detector.preprocess(Image.open(p).convert("RGB"))
                        for p in sorted((root / "test").glob("*/*.png"))])


@pytest.mark.slow
def test_it_scores_as_osd_irf_with_a_zero_residual_and_round_trips(tmp_path: Path):
    tiny_mvtec = make_mvtec(tmp_path / "data", n_train=60)
    gaussian, metrics = train_detector("gaussian", str(tiny_mvtec), {"backbone": BACKBONE, "map_sigma": 1.0,
                                                                      "device": "cpu"}, runtime=Runtime(False))
    assert metrics["image_auroc"] > 0.9 and metrics["pixel_auroc"] > 0.9  # bright squares on stripes
    # OSD-IRF's magnetic_tile recipe untrained: position whitening, Gaussian skip, residual r = 0.
    recipe = tiny_osd_irf_config(backbone=BACKBONE, normalisation={"kind": "position_whiten", "ridge": 0.01},
                                 score_net={"hidden": 48, "depth": 1, "heads": 2, "gaussian_skip": True},
                                 train={"steps": 0, "batch_size": 8})
    osd_irf, _ = train_detector("osd_irf", str(tiny_mvtec), recipe, runtime=Runtime(False), evaluate=False)
    images = spot_images(tiny_mvtec, gaussian)
    mine, theirs = gaussian.predict(images), osd_irf.predict(images)
    torch.testing.assert_close(mine.pred_score, theirs.pred_score, rtol=1e-4, atol=1e-5)  # c_t cancels
    ratio = theirs.anomaly_map / mine.anomaly_map  # the IRF's map is c_t ||z||: one constant everywhere
    assert float(ratio.std() / ratio.mean()) < 1e-4 and 0 < float(ratio.mean()) < 1
    assert gaussian.threshold == pytest.approx(osd_irf.threshold, rel=1e-5)
    save_bundle(gaussian, str(tmp_path / "bundle"), metrics)
    loaded = load_bundle(str(tmp_path / "bundle"))
    assert torch.equal(loaded.predict(images).anomaly_map, mine.anomaly_map)
    assert not any(key.startswith("score_net") for key in loaded.tensors())  # no network in it at all


def test_bad_values_are_named():
    with pytest.raises((ValueError, ConfigError), match="score_terms"):
        build_detector("gaussian", method_config("gaussian", {"score_terms": "max", "device": "cpu"}))
    with pytest.raises((ValueError, ConfigError), match="normalisation.kind"):
        method_config("gaussian", {"normalisation": {"kind": "pca"}})
    with pytest.raises((ValueError, ConfigError), match="trim must be in"):
        method_config("gaussian", {"trim": 1.5})
    with pytest.raises((ValueError, ConfigError), match="trim needs normalisation.kind position_whiten"):
        method_config("gaussian", {"trim": 0.1, "normalisation": {"kind": "channel"}})
