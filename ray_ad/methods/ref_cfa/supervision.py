"""What S2 learns from: cell targets from pixel masks, image labels, and synthetic anomalies pasted
into normal images (when the source has no anomalous image, and for the synthetic direction witness)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ray_ad.backbones import FeatureExtractor
from ray_ad.data import ImageDataset, Sample
from ray_ad.data.synthetic import anomaly_pair
from ray_ad.errors import ConfigError
from ray_ad.progress import progress as show_progress


@dataclass
class Supervision:
    """Per training image: cell targets [n, G, G], whether they are known [n], image labels [n]."""

    targets: torch.Tensor
    known: torch.Tensor
    labels: torch.Tensor

    def with_synthetic(self, targets: torch.Tensor) -> Supervision:
        """These images followed by synthetic anomalies with cell ``targets`` (anomalous, every cell known)."""
        return Supervision(torch.cat([self.targets, targets]),
                           torch.cat([self.known, torch.ones(len(targets), dtype=torch.bool)]),
                           torch.cat([self.labels, torch.ones(len(targets))]))


def cell_fraction(masks: torch.Tensor, grid: int) -> torch.Tensor:
    """Pixel masks [n, S, S] -> anomalous area fraction per cell [n, G, G] (soft patch labels)."""
    return F.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0]


def source_supervision(
    train: list[Sample], mode: Literal["auto", "mask", "image", "synthetic"], extractor: FeatureExtractor,
    grid: int, progress: bool,
) -> Supervision:
    """What the labelled source images say per cell: every cell of a normal image is normal; an anomalous
    image's cells are known from its pixel mask (modes auto and mask), otherwise only its image label."""
    labels = torch.tensor([s.label for s in train], dtype=torch.float32)
    known = labels == 0
    targets = torch.zeros(len(train), grid, grid)
    with_masks = [i for i, s in enumerate(train) if s.label == 1 and s.mask_path]
    if mode == "mask" and not with_masks:
        raise ConfigError("head.supervision=mask but no anomalous source image has a pixel mask")
    if mode in ("auto", "mask") and with_masks:
        dataset = ImageDataset([train[i] for i in with_masks], extractor.preprocessor)
        for row, i in enumerate(show_progress(with_masks, desc="source masks", enabled=progress, leave=False)):
            targets[i] = cell_fraction(dataset[row]["mask"], grid)[0]
            known[i] = True
    return Supervision(targets, known, labels)


@torch.no_grad()
def paste_anomalies(
    extractor: FeatureExtractor, paths: list[str], count: int, rng: np.random.Generator, device: torch.device,
    progress: bool, originals: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """``count`` synthetic anomalies pasted into images of ``paths`` (donors drawn from the same list):
    (features of the images as they were, when ``originals``; features with the anomaly; cell targets).

    ``rng`` draws each pair's two indices, then the anomaly itself, in that order.
    """
    preprocessor, grid = extractor.preprocessor, extractor.config.grid_size
    before, features, targets = [], [], []
    for _ in show_progress(range(count), desc="synthetic anomalies", enabled=progress, leave=False):
        i, j = rng.integers(0, len(paths), 2)
        image, anomalous, mask = anomaly_pair(paths, i, j, preprocessor.size, rng)
        pair = [anomalous, image] if originals else [anomalous]
        out = extractor(preprocessor.batch([Image.fromarray(a) for a in pair]).to(device)).cpu()
        features.append(out[:1])
        if originals:
            before.append(out[1:])
        targets.append(cell_fraction(torch.from_numpy(mask.astype(np.float32))[None], grid))
    return (torch.cat(before) if originals else None), torch.cat(features), torch.cat(targets)


def synthetic_supervision(
    extractor: FeatureExtractor, normals: list[Sample], ratio: float, seed: int, device: torch.device,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ratio`` synthetic anomalies per normal image, seeded: (features, cell targets [n, G, G])."""
    count = max(1, round(len(normals) * ratio))
    rng = np.random.default_rng(seed)
    _, features, targets = paste_anomalies(extractor, [s.path for s in normals], count, rng, device, progress)
    return features, targets
