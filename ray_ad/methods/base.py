"""The contract every detection method implements, and what its callers may rely on.

A detector turns normalised images ``[B, 3, S, S]`` into ``Prediction(pred_score [B], anomaly_map
[B, S, S])``. Jobs, Tune, Serve, the CLI and the benchmarks only ever call:

- ``preprocess(image)`` / ``preprocessor``: a PIL image -> the tensor the detector expects;
- ``fit(train, calibration, runtime)``: learn from training data, then calibrate;
- ``predict(images)``: scores and maps; ``decide(scores)``: which scores are anomalies (threshold);
- ``tensors()`` / ``load_tensors()`` and ``state()`` / ``load_state()``: what a bundle stores.

Capabilities are declared, not discovered: ``isinstance(detector, Adaptable)`` for methods that adapt
to an unlabeled target domain, ``supports_inversion`` for multi-step inversion scoring,
``isinstance(detector, RescoresDuringTraining)`` for methods a sweep can score between training rounds.
What a run needs from its surroundings (progress bars, the feature cache, where score networks train
and features are computed) comes in one ``Runtime`` value; none of it is part of the model.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ray_ad.backbones import BackboneConfig, FeatureExtractor
from ray_ad.data import Sample
from ray_ad.data.images import Preprocessor
from ray_ad.devices import pick_device
from ray_ad.features import FeatureBackend, extract_features
from ray_ad.training import ScoreNetTrainer, train_score_net


@dataclass
class Prediction:
    pred_score: torch.Tensor  # [B]
    anomaly_map: torch.Tensor  # [B, S, S]


@dataclass
class DetectorConfig:
    """The fields every method's config has; each method's config extends it (and may give the
    backbone its own default)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    map_sigma: float = 4.0  # Gaussian blur of the upsampled anomaly map, pixels (0 = bilinear only)
    threshold_quantile: float = 0.99  # of held-out normal scores: the decision threshold
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when available, else CPU

    def __post_init__(self) -> None:
        if not 0 < self.threshold_quantile <= 1:
            raise ValueError(f"threshold_quantile must be in (0, 1], got {self.threshold_quantile}")
        if self.map_sigma < 0:
            raise ValueError(f"map_sigma must be >= 0, got {self.map_sigma}")


@dataclass
class Runtime:
    """What one ``fit`` or ``adapt`` call needs from where it runs; nothing of it is saved in a bundle.

    The defaults run everything in this process. The Ray glue passes a Ray Train ``score_net_trainer``
    (``ray_ad.distributed.train``) and a Ray Data ``feature_backend`` without the method knowing.
    """

    progress: bool = True  # progress bars on a terminal, a line per stage in job logs
    cache_dir: str | None = None  # backbone feature cache (local path or URI)
    score_net_trainer: ScoreNetTrainer = train_score_net
    feature_backend: FeatureBackend | None = None  # where features are computed on a cache miss
    # Where CostFilter-AD's filter trains (a ``costfilter.training.FilterTrainer``); None: in this process.
    filter_trainer: Any = None
    # Where NAGL's attention modules train (a ``nagl.training.EpisodeTrainer``); None: in this process.
    episode_trainer: Any = None

    def quiet(self) -> Runtime:
        """The same runtime without progress output (for inner loops such as sweep rounds)."""
        return dataclasses.replace(self, progress=False)


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
    supports_inversion: ClassVar[bool] = False  # True: set_scoring("inversion") scores by multi-step inversion
    # True: predict_features(features) scores the extractor's features directly (a plug-in such as
    # CostFilter-AD that extracts the same features then hands them over instead of a second pass).
    scores_features: ClassVar[bool] = False
    # True: reconstruct_features(features) is the detector's estimate of the clean features (OSD-IRF's
    # Tweedie estimate), which CostFilter-AD's reconstruction-based variant takes as a template.
    reconstructs: ClassVar[bool] = False
    # True: scores against a reference set given after training (NAGL's ``set_references``), so a line is
    # the trained generalist plus its own references and ``evaluate`` draws references per run.
    uses_references: ClassVar[bool] = False
    # Dotted config keys added after bundles were saved, with the value those older bundles were fitted
    # and calibrated under: a bundle whose config lacks the key loads with it, so it scores as it did.
    STORED_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: DetectorConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        # Seeded so that a "random" backbone (tests) is rebuilt identically from a bundle.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.extractor = FeatureExtractor(config.backbone).to(self.device)
        self.threshold: float = float("inf")

    # ---------------------------------------------------------------- input and decision
    @property
    def preprocessor(self) -> Preprocessor:
        """Resize and normalisation for this detector's backbone (picklable: Ray Data workers use it)."""
        return self.extractor.preprocessor

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """A PIL image (RGB, or "L": one channel resized, then repeated) -> ``[3, S, S]``."""
        return self.preprocessor(image)

    def decide(self, scores: torch.Tensor | np.ndarray | float) -> np.ndarray:
        """Which image scores are anomalies: above the calibrated threshold (a NaN score is not)."""
        values = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
        return values > self.threshold

    @property
    def image_size(self) -> int:
        return self.config.backbone.image_size

    # ---------------------------------------------------------------- learning
    def extract_features(self, samples: list[Sample], runtime: Runtime, augment: int = 1,
                         desc: str = "features") -> torch.Tensor:
        """Backbone features of ``samples`` (through the runtime's feature cache and backend)."""
        return extract_features(self.extractor, samples, augment, device=self.device, cache_dir=runtime.cache_dir,
                                progress=runtime.progress, desc=desc, backend=runtime.feature_backend)

    @abstractmethod
    def fit(self, train: list[Sample], calibration: list[Sample], runtime: Runtime | None = None) -> dict[str, Any]:
        """Train on ``train`` (normal images), calibrate on held-out ``calibration`` normals."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> Prediction:
        """Scores and maps for a batch of normalised images."""

    def predict_features(self, features: torch.Tensor) -> Prediction:
        """The prediction from this detector's own extractor features ``[B, C, G, G]`` (see ``scores_features``)."""
        raise NotImplementedError(f"{self.method} scores images, not features")

    def reconstruct_features(self, features: torch.Tensor) -> torch.Tensor:
        """Clean features ``[B, C, G, G]`` estimated from extractor features (see ``reconstructs``)."""
        raise NotImplementedError(f"{self.method} makes no reconstructions")

    def predict_and_reconstruct(self, features: torch.Tensor) -> tuple[Prediction, torch.Tensor]:
        """``predict_features`` and ``reconstruct_features`` of the same features (a detector whose two share
        work overrides this to do it once)."""
        return self.predict_features(features), self.reconstruct_features(features)

    # ---------------------------------------------------------------- what a bundle stores
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


@runtime_checkable
class Adaptable(Protocol):
    """A detector that adapts itself, in place, to a target domain from unlabeled image URIs alone."""

    def adapt(self, target_images: list[str], runtime: Runtime | None = None) -> dict[str, Any]: ...


@runtime_checkable
class RescoresDuringTraining(Protocol):
    """A detector that can score with a partly trained score network (what a sweep reports between
    training rounds)."""

    def use_score_net(self, net: torch.nn.Module, calibration: list[Sample], runtime: Runtime) -> None: ...


def check_tensor_keys(expected: set[str], given: dict[str, torch.Tensor]) -> None:
    missing, unexpected = expected - set(given), set(given) - expected
    if missing or unexpected:
        raise KeyError(f"missing tensors {sorted(missing)[:5]}, unexpected tensors {sorted(unexpected)[:5]}")


def on_source_backbone(config: DetectorConfig, source: Detector) -> DetectorConfig:
    """``config`` with the source line's backbone network, weights, input size and device: a detector
    built from a line's landed images reads an image as the line does, while its own feature layers,
    grid and pooling say how cells are compared."""
    src = source.config.backbone
    backbone = dataclasses.replace(config.backbone, name=src.name, weights=src.weights, image_size=src.image_size)
    return dataclasses.replace(config, backbone=backbone, device=source.config.device)
