"""A PatchCore-style nearest-neighbour baseline (Roth et al., CVPR 2022) on the same backbone.

Memory bank = patch features of the normal training images (randomly subsampled to ``bank_fraction``;
PatchCore's greedy coreset is replaced by a seeded random subset, which is cheaper and close in quality
for banks of this size). Patch score = distance to the nearest bank entry; image score = max patch score.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ray_ad.adaptation.mutual import nearest_distance
from ray_ad.backbones import BackboneConfig
from ray_ad.data import Sample
from ray_ad.methods.base import Detector, DetectorConfig, Prediction, Runtime, check_tensor_keys, upsample_map


@dataclass
class PatchCoreConfig(DetectorConfig):
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(layers=(2, 3), grid_size=32))
    bank_fraction: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.bank_fraction <= 1:
            raise ValueError(f"bank_fraction must be in (0, 1], got {self.bank_fraction}")


class PatchCore(Detector):
    method = "patchcore"
    scores_features = True

    def __init__(self, config: PatchCoreConfig) -> None:
        super().__init__(config)
        self.bank = torch.zeros(0, self.extractor.out_channels)

    def fit(self, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None) -> dict[str, Any]:
        runtime = runtime or Runtime()
        features = self.extract_features(train, runtime, desc="memory bank")
        patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        keep = max(1, int(len(patches) * self.config.bank_fraction))
        generator = torch.Generator().manual_seed(self.config.seed)
        self.bank = patches[torch.randperm(len(patches), generator=generator)[:keep]].to(self.device)
        scores = []
        calib = self.extract_features(calibration, runtime, desc="calibration features")
        for chunk in calib.split(8):
            scores.append(self._cell_scores(chunk.to(self.device)).flatten(1).amax(1).cpu())
        self.set_threshold_from(torch.cat(scores).numpy(), self.config.threshold_quantile)
        return {"bank_size": int(keep)}

    def _cell_scores(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        return nearest_distance(features.permute(0, 2, 3, 1).reshape(-1, c), self.bank).view(b, h, w)

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        return self.predict_features(self.extractor(images.to(self.device)))

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor) -> Prediction:
        cell = self._cell_scores(features)
        score = cell.flatten(1).amax(1)
        return Prediction(score.cpu(), upsample_map(cell, self.image_size, self.config.map_sigma).cpu())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        check_tensor_keys({"bank"}, tensors)
        self.bank = tensors["bank"].to(self.device)


__all__ = ["PatchCore", "PatchCoreConfig"]
