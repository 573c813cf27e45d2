"""A PatchCore-style nearest-neighbour baseline (Roth et al., CVPR 2022) on the same backbone.

Memory bank = patch features of the normal training images (randomly subsampled to ``bank_fraction``;
PatchCore's greedy coreset is replaced by a seeded random subset, which is cheaper and close in quality
for banks of this size). Patch score = distance to the nearest bank entry; image score = max patch score.

A memory matches its own training images exactly (their cells are in it), so a model trained on this
base's maps of training images (CostFilter-AD's base guidance) would see maps no unseen image gives.
``predict_without`` scores images as if the bank held none of the cells of named training images: a
leave-one-out view of the fitted memory. It needs which image each bank row came from, which ``fit``
keeps in memory only (a loaded bundle has no such record, and serving never needs it).
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
        # Fit-time record of each bank row's training image (index into bank_paths), for predict_without.
        self.bank_owners: torch.Tensor | None = None
        self.bank_paths: list[str] = []

    def fit(self, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None) -> dict[str, Any]:
        runtime = runtime or Runtime()
        features = self.extract_features(train, runtime, desc="memory bank")
        patches = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        keep = max(1, int(len(patches) * self.config.bank_fraction))
        generator = torch.Generator().manual_seed(self.config.seed)
        rows = torch.randperm(len(patches), generator=generator)[:keep]
        self.bank = patches[rows].to(self.device)
        cells_per_image = features.shape[2] * features.shape[3]
        self.bank_owners, self.bank_paths = (rows // cells_per_image).to(self.device), [s.path for s in train]
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
        return self._prediction(self._cell_scores(features))

    def _prediction(self, cell: torch.Tensor) -> Prediction:
        score = cell.flatten(1).amax(1)
        return Prediction(score.cpu(), upsample_map(cell, self.image_size, self.config.map_sigma).cpu())

    @torch.no_grad()
    def predict_without(self, images: torch.Tensor, excluded: list[tuple[str, ...]]) -> Prediction:
        """``predict``, with image ``b`` scored against the bank less the cells of the training images whose
        paths are in ``excluded[b]`` (paths that are not training images exclude nothing)."""
        if self.bank_owners is None:
            raise ValueError("predict_without needs the memory's record of which training image each cell came "
                             "from, which only a PatchCore fitted in this process has (not one loaded from a bundle)")
        if len(excluded) != len(images):
            raise ValueError(f"predict_without needs one exclusion per image, got {len(excluded)} for {len(images)}")
        features = self.extractor(images.to(self.device))
        b, c, h, w = features.shape
        index = {path: k for k, path in enumerate(self.bank_paths)}
        cells = []
        for query, paths in zip(features.permute(0, 2, 3, 1).reshape(b, h * w, c), excluded):
            owners = torch.tensor([index[p] for p in paths if p in index], dtype=torch.long, device=self.device)
            keep = ~torch.isin(self.bank_owners, owners)
            if not keep.any():
                raise ValueError(f"excluding {list(paths)} leaves the memory bank empty")
            cells.append(nearest_distance(query, self.bank[keep]).view(h, w))
        return self._prediction(torch.stack(cells))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        check_tensor_keys({"bank"}, tensors)
        self.bank = tensors["bank"].to(self.device)
        self.bank_owners, self.bank_paths = None, []  # a loaded bank carries no record of its images


__all__ = ["PatchCore", "PatchCoreConfig"]
