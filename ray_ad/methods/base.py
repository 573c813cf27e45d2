"""The detector interface every method implements.

A detector turns normalised images ``[B, 3, S, S]`` into ``Prediction(pred_score [B],
anomaly_map [B, S, S])``. Jobs, Tune, Serve and the benchmarks only ever call:

- ``fit(train_samples, calibration_samples)``: learn from training data, then calibrate;
- ``training_step(batch_features)``: one loss for the distributed loop (methods that train);
- ``predict(images)``: scores and maps;
- ``tensors()`` / ``load_tensors()`` and ``state()`` / ``load_state()``: what a bundle stores.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from ray_ad.backbones import FeatureExtractor
from ray_ad.data import Sample
from ray_ad.features import FeatureBackend, extract_features
from ray_ad.training import ScoreNetTrainer, train_score_net


@dataclass
class Prediction:
    pred_score: torch.Tensor  # [B]
    anomaly_map: torch.Tensor  # [B, S, S]


def pick_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is used as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, int]:
    """Normalised 1-D Gaussian taps out to 4 sigma, and their radius."""
    radius = int(4 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum(), radius


@functools.lru_cache(maxsize=32)
def _axis_operator(grid: int, size: int, sigma: float) -> torch.Tensor:
    """``U [S, G]``: linear upsampling of a length-G signal to S samples, then the Gaussian blur, as one matrix.

    Bilinear upsampling (align_corners=False) and the reflect-padded separable blur both act on rows and
    columns independently and linearly, so the whole map operator is ``A -> U A U^T``.
    """
    basis = torch.eye(grid, dtype=torch.float64)[None]  # G unit signals as G channels of length G
    rows = F.interpolate(basis, size=size, mode="linear", align_corners=False)[0]  # [G, S]
    if sigma > 0:
        kernel, radius = gaussian_kernel(sigma, rows.dtype, rows.device)
        rows = F.conv1d(F.pad(rows[:, None], (radius, radius), mode="reflect"), kernel.view(1, 1, -1))[:, 0]
    return rows.T.float().contiguous()


def upsample_map(cell_map: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """Cell map ``[B, G, G]`` -> pixel map ``[B, S, S]``: bilinear upsampling, then Gaussian blur.

    Computed as ``U A U^T`` with the per-axis operator: the same map as upsampling and blurring the
    S x S image, at a fraction of the cost (it runs for every scored image).
    """
    grid = cell_map.shape[-1]
    if cell_map.shape[-2] != grid:
        raise ValueError(f"cell maps must be square, got {list(cell_map.shape)}")
    u = _axis_operator(grid, size, float(sigma)).to(cell_map.device, cell_map.dtype)
    return u @ cell_map @ u.T


class Detector(ABC):
    """Base class: a frozen feature extractor plus method-specific parts."""

    method: ClassVar[str]
    uses_labels: ClassVar[bool] = False  # True: fit() takes labelled normal AND anomalous images
    # Dotted config keys added after bundles were saved, with the value those older bundles were fitted
    # and calibrated under: a bundle whose config lacks the key loads with it, so it scores as it did.
    STORED_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Any) -> None:
        self.config = config
        self.device = pick_device(config.device)
        # Seeded so that a "random" backbone (tests) is rebuilt identically from a bundle.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.extractor = FeatureExtractor(config.backbone).to(self.device)
        self.threshold: float = float("inf")
        # How score networks are trained: in this process by default; the Ray glue swaps in a
        # Ray Train trainer (ray_ad.distributed.train) without the method knowing.
        self.score_net_trainer: ScoreNetTrainer = train_score_net
        # Where backbone features are computed on a cache miss: here, or a Ray Data actor pool.
        self.feature_backend: FeatureBackend | None = None

    def extract_features(
        self, samples: list[Sample], augment: int = 1, cache_dir: str | None = None, progress: bool = True,
        desc: str = "features",
    ) -> torch.Tensor:
        """Backbone features of ``samples`` (through the feature cache and the configured backend)."""
        return extract_features(self.extractor, samples, augment, device=self.device, cache_dir=cache_dir,
                                progress=progress, desc=desc, backend=self.feature_backend)

    @property
    def image_size(self) -> int:
        return self.config.backbone.image_size

    @abstractmethod
    def fit(
        self,
        train: list[Sample],
        calibration: list[Sample],
        progress: bool = True,
        cache_dir: str | None = None,
    ) -> dict[str, Any]:
        """Train on ``train`` (normal images), calibrate on held-out ``calibration`` normals."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> Prediction:
        """Scores and maps for a batch of normalised images."""

    def training_step(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.method} has no trainable parts")

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every learned tensor, for the bundle's safetensors file."""

    @abstractmethod
    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of ``tensors`` (strict: missing or unexpected keys raise KeyError)."""

    def state(self) -> dict[str, Any]:
        """JSON-able calibration state (threshold, normalisation constants)."""
        return {"threshold": self.threshold}

    def load_state(self, state: dict[str, Any]) -> None:
        self.threshold = float(state["threshold"])

    def set_threshold_from(self, normal_scores: np.ndarray, quantile: float) -> None:
        """Threshold = the ``quantile`` of held-out normal image scores."""
        self.threshold = float(np.quantile(normal_scores, quantile))


def check_tensor_keys(expected: set[str], given: dict[str, torch.Tensor]) -> None:
    missing, unexpected = expected - set(given), set(given) - expected
    if missing or unexpected:
        raise KeyError(f"missing tensors {sorted(missing)[:5]}, unexpected tensors {sorted(unexpected)[:5]}")
