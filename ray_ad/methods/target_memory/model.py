"""Target memory: a line adapted to a new domain from its landed images alone, no label, no training.

The landed batch is scored against itself (mutual scoring, ``mutual.py``); the images and the cells
that stand out from the rest of the batch are dropped, and what remains (greedy-coreset subsampled
when large) becomes the line's memory bank. New images are scored PatchCore-style: each cell's
distance to its nearest bank cell, the image score is the largest cell score. The backbone and its
preprocessing are the source line's (see ``from_source``), so a target memory serves wherever the
source did.

The operating point comes from held-out landed images, which are unlabeled and contaminated:
``threshold.unlabeled_threshold`` fits their normal mode instead of taking a quantile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ray_ad.adaptation.mutual import cells, greedy_coreset, mutual_scores, nearest_distance
from ray_ad.adaptation.threshold import normal_mode, unlabeled_threshold
from ray_ad.backbones import BackboneConfig
from ray_ad.data import Sample
from ray_ad.errors import DataError
from ray_ad.methods.base import Detector, Prediction, check_tensor_keys, upsample_map

log = logging.getLogger(__name__)


def _default_backbone() -> BackboneConfig:
    # Stages 2-3, 3x3 neighbourhood average, 16x16 cells: where the label-free figures in DESIGN.md §5
    # were measured (PatchCore's mid-level features with local context).
    return BackboneConfig(layers=(2, 3), grid_size=16, local_pool=3)


@dataclass
class TargetMemoryConfig:
    backbone: BackboneConfig = field(default_factory=_default_backbone)
    mutual_fraction: float = 0.3  # MuSc: mean of the lowest 30% of per-image nearest distances
    mutual_references: int = 64  # other images each landed image is compared with
    # Drop an image whose largest mutual cell score is this many sigma above the images' normal mode.
    # The largest of many cell scores has a heavier right tail than a Gaussian, so normal images reach
    # 3-4 sigma; 5 keeps them, and the cell rule below still removes the defect cells of images kept.
    drop_image_z: float = 5.0
    drop_cell_z: float = 3.0  # ... and, of the images kept, every cell this far above the cells' mode
    bank_size: int = 16384  # greedy coreset of the kept cells beyond this many
    false_alarm_rate: float = 0.01  # of the normal mode of held-out landed scores (the threshold)
    map_sigma: float = 4.0
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        if not 0 < self.mutual_fraction <= 1:
            raise ValueError(f"mutual_fraction must be in (0, 1], got {self.mutual_fraction}")
        if self.mutual_references < 1:
            raise ValueError(f"mutual_references must be positive, got {self.mutual_references}")
        if self.bank_size < 1:
            raise ValueError(f"bank_size must be positive, got {self.bank_size}")
        if not 0 < self.false_alarm_rate < 0.5:
            raise ValueError(f"false_alarm_rate must be in (0, 0.5), got {self.false_alarm_rate}")


class TargetMemory(Detector):
    method = "target_memory"

    def __init__(self, config: TargetMemoryConfig) -> None:
        super().__init__(config)
        self.bank = torch.zeros(0, self.extractor.out_channels)

    @classmethod
    def from_source(cls, source: Detector, config: TargetMemoryConfig | None = None) -> TargetMemory:
        """A target memory on the source line's backbone network, weights and input size.

        The feature layers, grid and pooling stay the memory's own: they set how cells are compared,
        not how an image is read.
        """
        config = config or TargetMemoryConfig()
        src = source.config.backbone
        backbone = replace(config.backbone, name=src.name, weights=src.weights, image_size=src.image_size)
        return cls(replace(config, backbone=backbone, device=source.config.device))

    def fit(
        self, train: list[Sample], calibration: list[Sample], progress: bool = True, cache_dir: str | None = None
    ) -> dict[str, Any]:
        """``train``: landed images (labels are never read); ``calibration``: held-out landed images."""
        if len(train) < 2:
            raise DataError(f"a target memory needs at least 2 landed images, got {len(train)}")
        features = cells(self.extract_features(train, 1, cache_dir, progress, "landed images"))
        cfg = self.config
        mutual = mutual_scores(features, cfg.mutual_fraction, cfg.mutual_references, cfg.seed)
        image_scores = mutual.amax(1)
        centre, spread = normal_mode(image_scores.numpy())
        keep_image = image_scores <= centre + cfg.drop_image_z * spread
        kept_scores = mutual[keep_image].flatten()
        centre, spread = normal_mode(kept_scores.numpy())
        keep_cell = (mutual <= centre + cfg.drop_cell_z * spread) & keep_image[:, None]
        candidates = features[keep_cell]
        chosen = greedy_coreset(candidates, cfg.bank_size, seed=cfg.seed)
        self.bank = candidates[chosen].to(self.device)
        info = {
            "landed_images": len(train),
            "dropped_images": int((~keep_image).sum()),
            "dropped_paths": [sample.path for sample, keep in zip(train, keep_image.tolist()) if not keep],
            "dropped_cells": int(keep_image.sum() * features.shape[1] - keep_cell.sum()),
            "bank_size": len(self.bank),
        }
        log.info("target memory: %s", info)
        if calibration:
            info["threshold"] = self.calibrate_unlabeled(calibration, progress, cache_dir)
        return info

    def calibrate_unlabeled(self, images: list[Sample], progress: bool = True, cache_dir: str | None = None) -> float:
        """Threshold from unlabeled, possibly contaminated held-out images of the domain."""
        features = self.extract_features(images, 1, cache_dir, progress, "held-out landed images")
        scores = torch.cat([self._cell_scores(chunk.to(self.device)).flatten(1).amax(1).cpu()
                            for chunk in features.split(16)])
        self.threshold = unlabeled_threshold(scores.numpy(), self.config.false_alarm_rate)
        return self.threshold

    def _cell_scores(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        return nearest_distance(features.permute(0, 2, 3, 1).reshape(-1, c), self.bank).view(b, h, w)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        cell = self._cell_scores(self.extractor(images.to(self.device)))
        score = cell.flatten(1).amax(1)
        return Prediction(score.cpu(), upsample_map(cell, self.image_size, self.config.map_sigma).cpu())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        check_tensor_keys({"bank"}, tensors)
        self.bank = tensors["bank"].to(self.device)


__all__ = ["TargetMemory", "TargetMemoryConfig"]
