"""The filter's training set: normal images, half of them with a synthetic anomaly (CostFilter-AD Sec. 3).

The backbone is frozen, so each pool image costs one backbone pass, once: the pool's features and
masks are computed up front and the filter then trains on them for as many steps as configured. This
is what makes training affordable on CPU; a fresh anomaly per step would cost a backbone pass per
sample and step. Templates are still drawn afresh for every step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ray_ad.backbones import FeatureExtractor
from ray_ad.data.images import load_image
from ray_ad.data.synthetic import pasted_anomaly
from ray_ad.progress import progress as show_progress

# The base detector's scaled cell maps ``[B, H', W']`` of preprocessed pool images ``[B, 3, S, S]``, given the
# paths each item was made from (its source image, then its donor when it has a pasted anomaly; a donor is
# drawn whatever the fill, so a texture fill names one too): a memory base can leave those out of its bank.
BaseMap = Callable[[torch.Tensor, list[tuple[str, ...]]], torch.Tensor]


@dataclass
class SyntheticPool:
    features: torch.Tensor  # [P, C, H', W'] query features
    masks: torch.Tensor  # [P, R, R] share of each loss-map pixel that is anomalous (0 for normal images)
    sources: torch.Tensor  # [P] the template-bank index of the image each item was made from (-1: none)
    base_maps: torch.Tensor | None = None  # [P, H', W'] the base detector's cell map (base guidance only)
    classes: torch.Tensor | None = None  # [P] the line of each item (a fleet filter's pool only)
    # [P, C, H', W'] the base's reconstruction of each item's features (reconstruction templates only)
    reconstructions: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def shard(self, rank: int, world: int) -> SyntheticPool:
        """Every ``world``-th item from ``rank`` (a Ray Train worker's share)."""
        def part(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else values[rank::world]

        return SyntheticPool(self.features[rank::world], self.masks[rank::world], self.sources[rank::world],
                             part(self.base_maps), part(self.classes), part(self.reconstructions))

    @staticmethod
    def concat(pools: list[SyntheticPool]) -> SyntheticPool:
        """One line's pool made in parts (cross-fitted base maps, one part per fold): the parts share one
        template bank, so their source indices stand as they are."""
        if not pools:
            raise ValueError("no pools to concatenate")
        if len(pools) == 1:
            return pools[0]
        return SyntheticPool(
            torch.cat([pool.features for pool in pools]), torch.cat([pool.masks for pool in pools]),
            torch.cat([pool.sources for pool in pools]), _joined(pools, "base_maps"), None,
            _joined(pools, "reconstructions"))

    @staticmethod
    def fleet(pools: list[SyntheticPool], bank_sizes: list[int]) -> SyntheticPool:
        """One pool of several lines' pools: item classes are the lines' indices, and each line's source
        indices are shifted to its rows of the concatenated template bank (banks of ``bank_sizes``)."""
        if len(pools) != len(bank_sizes) or not pools:
            raise ValueError(f"{len(pools)} pools for {len(bank_sizes)} template banks")
        offsets = [sum(bank_sizes[:k]) for k in range(len(pools))]
        sources = [torch.where(pool.sources >= 0, pool.sources + offset, pool.sources)
                   for pool, offset in zip(pools, offsets)]
        return SyntheticPool(
            torch.cat([pool.features for pool in pools]), torch.cat([pool.masks for pool in pools]), torch.cat(sources),
            _joined(pools, "base_maps"),
            torch.cat([torch.full((len(pool),), k, dtype=torch.long) for k, pool in enumerate(pools)]),
            _joined(pools, "reconstructions"))


def _joined(pools: list[SyntheticPool], name: str) -> torch.Tensor | None:
    """The optional field ``name`` of several pools, concatenated; all or none of them must carry it."""
    values = [getattr(pool, name) for pool in pools]
    if all(value is None for value in values):
        return None
    if any(value is None for value in values):
        what = {"base_maps": "base guidance (base maps)", "reconstructions": "reconstruction templates"}[name]
        raise ValueError(f"the pools disagree on {what}: all or none must carry them")
    return torch.cat(values)


def _resized(path: str, size: int) -> np.ndarray:
    return np.asarray(load_image(path).resize((size, size), Image.Resampling.BILINEAR))


@torch.no_grad()
def build_pool(
    extractor: FeatureExtractor, paths: list[str], bank_index: dict[str, int], count: int, anomaly_probability: float,
    opacity: tuple[float, float], fill_sources: list[str], loss_size: int, rng: np.random.Generator,
    device: torch.device, progress: bool, base_map: BaseMap | None = None,
    reconstruct: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SyntheticPool:
    """``count`` items cycling through ``paths`` (shuffled), each anomalous with ``anomaly_probability``
    (the donor for a shuffled fill is another image of ``paths``). ``base_map`` (preprocessed images and
    the paths of the images each item was made from, its source and any donor -> the base detector's cell
    maps) is run on every item when the filter is guided by the base, and ``reconstruct`` (features -> the
    base's reconstruction of them) when it matches reconstructions."""
    if len(paths) < 2:
        raise ValueError(f"the synthetic pool needs at least 2 normal images, got {len(paths)}")
    size = extractor.preprocessor.size
    order = rng.permutation(len(paths))
    features, masks, sources, base_maps, reconstructions = [], [], [], [], []
    chunk: list[Image.Image] = []
    made_from: list[tuple[str, ...]] = []  # per chunk item: its source image, and its donor if any

    def flush() -> None:
        if chunk:
            images = extractor.preprocessor.batch(chunk).to(device)
            batch = extractor(images)
            features.append(batch.float().cpu())
            if reconstruct is not None:
                reconstructions.append(reconstruct(batch).float().cpu())
            if base_map is not None:
                base_maps.append(base_map(images, list(made_from)).float().cpu())
            chunk.clear()
            made_from.clear()

    for k in show_progress(range(count), desc="synthetic anomalies", enabled=progress, leave=False):
        i = int(order[k % len(paths)])
        image = _resized(paths[i], size)
        mask = np.zeros(image.shape[:2], dtype=bool)
        sources_of_item: tuple[str, ...] = (paths[i],)
        if rng.uniform() < anomaly_probability:
            donor = int(rng.integers(0, len(paths) - 1))
            donor += donor >= i  # any image but the source itself
            image, mask, _ = pasted_anomaly(image, _resized(paths[donor], size), rng, opacity, fill_sources)
            sources_of_item = (paths[i], paths[donor])
        chunk.append(Image.fromarray(image))
        made_from.append(sources_of_item)
        # The loss compares maps at loss_size: the mask's share per loss pixel (area average).
        masks.append(F.adaptive_avg_pool2d(torch.from_numpy(mask).float()[None, None], loss_size)[0, 0])
        sources.append(bank_index.get(paths[i], -1))
        if len(chunk) == 16:
            flush()
    flush()
    return SyntheticPool(torch.cat(features), torch.stack(masks), torch.tensor(sources, dtype=torch.long),
                         torch.cat(base_maps) if base_maps else None, None,
                         torch.cat(reconstructions) if reconstructions else None)
