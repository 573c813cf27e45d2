"""Backbone feature extraction over samples, with dihedral augmentation and an optional disk cache.

Training a score network on CPU is only affordable because the frozen backbone runs once per image
(and augmentation), not once per step: features are extracted up front and cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol

import torch
from torch.utils.data import DataLoader

from ray_ad.backbones import BackboneConfig, FeatureExtractor
from ray_ad.config import to_dict
from ray_ad.data import ImageDataset, Sample
from ray_ad.progress import progress as progress_bar


def dihedral(images: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 flips/rotations of a square image batch (k = 0 is the identity)."""
    out = torch.rot90(images, k % 4, dims=(-2, -1))
    return out.flip(-1) if k >= 4 else out


class FeatureBackend(Protocol):
    """Computes features ``[len(samples) * augment, C, G, G]`` somewhere else (e.g. a Ray Data actor pool)."""

    def __call__(
        self, backbone: BackboneConfig, samples: list[Sample], augment: int, progress: bool
    ) -> torch.Tensor: ...


def cache_key(backbone: BackboneConfig, samples: list[Sample], augment: int) -> str:
    """Features are reused when the backbone config, the image list and the augmentation match."""
    payload = json.dumps(
        {"backbone": to_dict(backbone), "paths": [s.path for s in samples], "augment": augment},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@torch.no_grad()
def extract_features(
    extractor: FeatureExtractor,
    samples: list[Sample],
    augment: int = 1,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    cache_dir: str | None = None,
    progress: bool = True,
    desc: str = "features",
    backend: FeatureBackend | None = None,
) -> torch.Tensor:
    """Features ``[len(samples) * augment, C, G, G]`` (augmented copies follow the originals).

    With a ``backend``, cache misses are computed there instead of in this process.
    """
    if not 1 <= augment <= 8:
        raise ValueError(f"augment must be between 1 and 8 dihedral variants, got {augment}")
    cache_file = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        cache_file = os.path.join(cache_dir, f"{cache_key(extractor.config, samples, augment)}.pt")
        if os.path.exists(cache_file):
            return torch.load(cache_file, weights_only=True)
    if backend is not None:
        features = backend(extractor.config, samples, augment, progress)
    else:
        features = _extract_here(extractor, samples, augment, batch_size, device, progress, desc)
    if cache_file:
        tmp = f"{cache_file}.tmp"
        torch.save(features, tmp)
        os.replace(tmp, cache_file)
    return features


def _extract_here(
    extractor: FeatureExtractor, samples: list[Sample], augment: int, batch_size: int, device: torch.device | str,
    progress: bool, desc: str,
) -> torch.Tensor:
    dataset = ImageDataset(samples, extractor.preprocessor, with_masks=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    per_variant: list[list[torch.Tensor]] = [[] for _ in range(augment)]
    with progress_bar(desc=desc, total=len(samples), enabled=progress, unit="images", leave=False) as bar:
        for batch in loader:
            images = batch["image"].to(device)
            for k in range(augment):
                per_variant[k].append(extractor(dihedral(images, k)).float().cpu())
            bar.update(len(images))
    return torch.cat([torch.cat(chunks) for chunks in per_variant])
