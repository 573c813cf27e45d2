"""Feature normalisation in front of a score network: what the DDPM's N(0, I) prior is measured against.

A DDPM on backbone features learns noise predictions relative to unit-variance data. Two choices:

- ``channel``: every channel standardised with its mean and standard deviation over the training set
  (all images, all cells). Cheap, but stages differ in how correlated their channels are, and on
  aligned parts (a tile, a solar cell) the typical feature at one position is not the typical feature
  at another: a deviation that is large for its position can be small against the whole set.
- ``position_whiten``: each grid position gets its own mean and ZCA whitening matrix
  (Sigma_p + ridge * mean variance * I)^(-1/2), fitted on the training features at that position.
  Normal features then follow N(0, I) to second order at every cell, so the DDPM's prior is right
  for them and what the score network learns, and scores, is what departs from it. The squared norm
  of a whitened cell is PaDiM's Mahalanobis distance (Defard et al. 2021); the OSD-IRF README
  measures what the score network adds on top of it.

Both are fitted on one domain's features and stored with the model; REF+CFA fits one per domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ray_ad.errors import ConfigError

KINDS = ("channel", "position_whiten")


@dataclass
class NormalisationConfig:
    kind: Literal["channel", "position_whiten"] = "channel"
    # position_whiten: added to each position's covariance, as a share of its mean variance, so that
    # directions the training set barely spans are not blown up to unit variance.
    ridge: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"normalisation.kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        if not self.ridge > 0:
            raise ValueError(f"normalisation.ridge must be > 0, got {self.ridge}")


class FeatureNormaliser:
    """Features ``[B, C, G, G]`` -> normalised features of the same shape."""

    def __init__(self, config: NormalisationConfig, channels: int, grid: int) -> None:
        self.config = config
        if config.kind == "channel":
            self.mean = torch.zeros(channels)
            self.scale = torch.ones(channels)  # the standard deviation per channel
        else:
            self.mean = torch.zeros(grid, grid, channels)
            self.scale = torch.eye(channels).expand(grid, grid, channels, channels).clone()  # whitening W_p

    @property
    def scale_name(self) -> str:
        return "std" if self.config.kind == "channel" else "whiten"

    @torch.no_grad()
    def fit(self, features: torch.Tensor, keep: torch.Tensor | None = None, chunk: int = 64) -> FeatureNormaliser:
        """Fit on a domain's training features ``[N, C, G, G]`` (N >= 2).

        ``keep`` (``position_whiten`` only): which cells ``[N, G, G]`` each position's mean and covariance
        are estimated from (a robust fit leaves out the cells that stand out: ``trimmed_fit``); every
        position must keep at least 2.
        """
        if features.shape[0] < 2:
            raise ConfigError(f"feature normalisation needs at least 2 training images, got {features.shape[0]}")
        device = self.mean.device
        if self.config.kind == "channel":
            if keep is not None:
                raise ConfigError("a cell mask (keep) needs normalisation.kind position_whiten")
            self.mean = features.mean(dim=(0, 2, 3)).to(device)
            self.scale = features.std(dim=(0, 2, 3)).clamp_min(1e-6).to(device)
            return self
        n, channels = features.shape[0], features.shape[1]
        if keep is None:
            counts = torch.full(features.shape[2:], float(n), dtype=torch.float64)
        else:
            if keep.shape != (n, *features.shape[2:]):
                raise ConfigError(f"keep must be a cell mask of shape {(n, *features.shape[2:])}, "
                                  f"got {tuple(keep.shape)}")
            counts = keep.double().sum(0)
            if counts.min() < 2:
                raise ConfigError(f"every position needs at least 2 kept cells, one keeps {int(counts.min())}")
        # Sums over images, chunked so that a large domain never needs a float64 copy of all its features.
        total = torch.zeros(features.shape[2], features.shape[3], channels, dtype=torch.float64)
        outer = torch.zeros(*total.shape, channels, dtype=torch.float64)
        for start in range(0, n, chunk):
            cells = features[start : start + chunk].permute(0, 2, 3, 1).double().cpu()  # [b, G, G, C]
            if keep is not None:
                cells = cells * keep[start : start + chunk, ..., None].double().cpu()  # a dropped cell adds 0
            total += cells.sum(0)
            outer += torch.einsum("bhwc,bhwd->hwcd", cells, cells)
        mean = total / counts[..., None]
        covariance = (outer - counts[..., None, None] * mean[..., :, None] * mean[..., None, :]) / (
            counts[..., None, None] - 1)
        variance = covariance.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        identity = torch.eye(channels, dtype=torch.float64)
        covariance = covariance + self.config.ridge * variance[..., None, None] * identity
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        # ZCA: W_p = V diag(lambda^-1/2) V^T keeps each whitened channel closest to its own channel.
        whiten = (eigenvectors * eigenvalues.clamp_min(1e-12).rsqrt()[..., None, :]) @ eigenvectors.transpose(-1, -2)
        self.mean, self.scale = mean.float().to(device), whiten.float().to(device)
        return self

    @torch.no_grad()
    def trimmed_fit(self, features: torch.Tensor, trim: float, rounds: int = 2, chunk: int = 64) -> torch.Tensor:
        """A ``position_whiten`` fit robust to a minority of outlying cells: fit on every cell, then
        ``rounds`` times refit each position on the ``1 - trim`` of its cells nearest its current mean
        in Mahalanobis distance (the concentration step of the Minimum Covariance Determinant estimator,
        Rousseeuw & Van Driessen 1999, per position). Returns the cells ``[N, G, G]`` of the last fit."""
        if not 0 <= trim < 1:
            raise ConfigError(f"trim must be in [0, 1), got {trim}")
        if rounds < 0:
            raise ConfigError(f"trim rounds must be >= 0, got {rounds}")
        self.fit(features, chunk=chunk)
        n = features.shape[0]
        keep = torch.ones(n, *features.shape[2:], dtype=torch.bool)
        kept_per_position = n - int(trim * n)
        if kept_per_position == n:  # nothing to trim
            return keep
        for _ in range(rounds):
            distances = torch.cat([self(part.to(self.mean.device)).norm(dim=1).cpu()
                                   for part in features.split(chunk)])  # [N, G, G]
            ranks = distances.argsort(0).argsort(0)  # each cell's rank at its position, 0 = nearest
            keep = ranks < kept_per_position
            self.fit(features, keep, chunk)
        return keep

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        if self.config.kind == "channel":
            return (features - self.mean[:, None, None]) / self.scale[:, None, None]
        centred = features.permute(0, 2, 3, 1) - self.mean
        return torch.einsum("bhwc,hwdc->bdhw", centred, self.scale).contiguous()

    def invert(self, normalised: torch.Tensor) -> torch.Tensor:
        """Normalised features ``[B, C, G, G]`` back to backbone features (a reconstruction made in the
        normalised space, e.g. OSD-IRF's Tweedie estimate, as features a cost volume can match)."""
        if self.config.kind == "channel":
            return normalised * self.scale[:, None, None] + self.mean[:, None, None]
        # W_p is symmetric positive definite (ZCA), so solving against it undoes the whitening.
        cells = torch.linalg.solve(self.scale, normalised.permute(2, 3, 1, 0))  # [G, G, C, B]
        return (cells.permute(3, 0, 1, 2) + self.mean).permute(0, 3, 1, 2).contiguous()

    def to(self, device: torch.device | str) -> FeatureNormaliser:
        self.mean, self.scale = self.mean.to(device), self.scale.to(device)
        return self

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}mean": self.mean, f"{prefix}{self.scale_name}": self.scale}

    def load_tensors(self, tensors: dict[str, torch.Tensor], prefix: str) -> FeatureNormaliser:
        device = self.mean.device
        self.mean = tensors[f"{prefix}mean"].to(device)
        self.scale = tensors[f"{prefix}{self.scale_name}"].to(device)
        return self
