"""Target Gaussian: a line adapted to a new domain as a per-position Gaussian of its landed images.

The target memory is a kNN over the landed cells, so a defect it keeps vouches for every test defect
like it. A density averages a minority of defects into each position's mean and covariance instead;
after the same drop as the memory's (the source line's top share of the landing), what defects remain
barely move it. The detector is the project's ``gaussian`` method (whitened cells, a Mahalanobis map),
on the source line's backbone network, weights and input size, so it is saved, served and evaluated
as any gaussian line. Labels are never read: the landed images come as paths.
"""

from __future__ import annotations

from typing import Any

import torch

from ray_ad.backbones import BackboneConfig
from ray_ad.data import Sample
from ray_ad.errors import DataError
from ray_ad.methods.base import Detector, Runtime, on_source_backbone
from ray_ad.methods.gaussian import GaussianConfig, GaussianDetector

# Every tenth kept image calibrates the Gaussian's two score terms (their min-max constants, Eq. 9 of
# OSD-IRF); the rest are fitted on. The operating point comes later, from the gate's held-out images.
CALIBRATION_EVERY = 10
MIN_IMAGES = 3  # two to fit a covariance on, one to calibrate


def landing_gaussian_config() -> GaussianConfig:
    """The adaptation's default cells: lite0 stages 1-3 on a 16 x 16 grid, each averaged over 3 x 3 and
    11 x 11 neighbourhoods (the magnetic_tile recipe's context), no trimming. Chosen on the development
    set, magnetic_tile seen by a new camera (``benchmarks/explorations/target_gaussian.py``; the
    adaptation README has the table)."""
    return GaussianConfig(backbone=BackboneConfig(layers=(1, 2, 3), grid_size=16, local_pool=(3, 11)), trim=0.0)


def fit_target_gaussian(source: Detector, kept: list[str], config: GaussianConfig,
                        runtime: Runtime | None = None) -> tuple[GaussianDetector, dict[str, Any]]:
    """A ``gaussian`` detector on ``source``'s backbone, fitted on the landed images ``kept`` (paths,
    unlabeled) but every ``CALIBRATION_EVERY``-th, which calibrate its score terms."""
    if len(kept) < MIN_IMAGES:
        raise DataError(f"a target Gaussian needs at least {MIN_IMAGES} kept landed images, got {len(kept)}")
    detector = GaussianDetector(on_source_backbone(config, source))
    features = detector.extract_features([Sample(path, -1) for path in kept], runtime or Runtime(),
                                         desc="kept landed images (target Gaussian)")
    calibration = torch.zeros(len(kept), dtype=torch.bool)
    calibration[::CALIBRATION_EVERY] = True
    detector.fit_features(features[~calibration])
    detector.calibrate_features(features[calibration])
    return detector, {"fitted_images": int((~calibration).sum()), "calibration_images": int(calibration.sum())}
