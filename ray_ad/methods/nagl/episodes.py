"""NAGL's episodes: per source domain, the backbone features of its normal and abnormal images, and the
sampler that draws one episode per query (K normal references, one abnormal reference, the query).

The backbone is frozen, so every image costs one backbone pass, once; episodes are then drawn from the
stored cell features for as many steps as configured (the CostFilter-AD pool does the same).
Abnormal images are the domain's real defects with pixel masks, and synthetic anomalies pasted into
its normal images (``ray_ad.data.synthetic``, the project's one home for them) where the domain has
no masks (elpv) or when ``train.synthetic`` asks for them everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ray_ad.backbones import FeatureExtractor
from ray_ad.data import Sample
from ray_ad.data.images import load_image, load_mask
from ray_ad.data.synthetic import pasted_anomaly
from ray_ad.errors import DataError
from ray_ad.methods.nagl.config import EpisodeConfig
from ray_ad.methods.nagl.scoring import cells
from ray_ad.progress import progress as show_progress


def cell_mask(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """Pixel masks ``[B, S, S]`` -> cell masks ``[B, G*G]``: a cell is abnormal when any of its pixels is
    (max pooling), so a defect smaller than a cell still marks one cell."""
    return F.adaptive_max_pool2d(mask.float()[:, None], grid)[:, 0].flatten(1)


@dataclass
class DomainPool:
    """One source domain's stored episodes material."""

    name: str
    normal: torch.Tensor  # [P_n, N, C] cell features of normal images
    abnormal: torch.Tensor  # [P_a, N, C] cell features of abnormal images
    masks: torch.Tensor  # [P_a, N] their cell masks (1 inside the defect)
    # The defect type of each abnormal image (a real defect's folder, e.g. "MT_Crack"; "synthetic:<fill>"
    # for a pasted one); empty: unknown, and ``train.pair_defects`` has nothing to pair by.
    kinds: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.abnormal) < 2:
            raise DataError(f"domain {self.name!r}: episodes need at least 2 abnormal images (a reference and "
                            f"a query), got {len(self.abnormal)}")
        if self.kinds and len(self.kinds) != len(self.abnormal):
            raise ValueError(f"domain {self.name!r}: {len(self.kinds)} defect kinds for {len(self.abnormal)} "
                             "abnormal images")

    def same_kind(self, index: int, generator: torch.Generator) -> int | None:
        """Another abnormal image of the same defect type as image ``index``, at random; None if none."""
        if not self.kinds:
            return None
        others = [i for i, kind in enumerate(self.kinds) if kind == self.kinds[index] and i != index]
        return others[int(torch.randint(len(others), (1,), generator=generator))] if others else None


@dataclass
class Episodes:
    """A batch of episodes from one domain (all with the same K)."""

    normal_refs: torch.Tensor  # [B, K*N, C]
    F_a: torch.Tensor  # [B, N, C] the abnormal reference
    M_a: torch.Tensor  # [B, N] its cell mask
    F_q: torch.Tensor  # [B, N, C] the query
    M_q: torch.Tensor  # [B, N] the query's cell mask (zeros for a normal query)
    y_q: torch.Tensor  # [B] the query's label

    def to(self, device: torch.device | str) -> Episodes:
        return Episodes(*(getattr(self, name).to(device) for name in
                          ("normal_refs", "F_a", "M_a", "F_q", "M_q", "y_q")))


def sample_episodes(pools: list[DomainPool], config: EpisodeConfig, generator: torch.Generator) -> Episodes:
    """One domain at random, K at random from ``config.shots``, then per item: K distinct normal
    references, one abnormal reference (its mask replaced by the whole image with
    ``maskless_references``), and a query that is neither (abnormal with ``anomaly_probability``).
    With ``pair_defects`` an abnormal query's reference is another defect of its own type where the
    domain has one (the authors' episodes pair them); a normal query's reference is any defect."""
    pool = pools[int(torch.randint(len(pools), (1,), generator=generator))]
    shots = config.shots[int(torch.randint(len(config.shots), (1,), generator=generator))]
    shots = min(shots, len(pool.normal) - 1)  # a normal query must remain outside the references
    refs, abnormal, queries, query_masks, labels = [], [], [], [], []
    for _ in range(config.batch_size):
        order = torch.randperm(len(pool.normal), generator=generator)
        refs.append(order[:shots])
        pair = torch.randperm(len(pool.abnormal), generator=generator)[:2]
        abnormal.append(pair[0])
        if float(torch.rand((), generator=generator)) < config.anomaly_probability:
            if config.pair_defects:  # (no draw when off: the episodes of earlier versions)
                paired = pool.same_kind(int(pair[1]), generator)
                abnormal[-1] = pair[0] if paired is None else torch.tensor(paired)
            queries.append(pool.abnormal[pair[1]])
            query_masks.append(pool.masks[pair[1]])
            labels.append(1.0)
        else:
            queries.append(pool.normal[order[shots]])
            query_masks.append(torch.zeros(pool.normal.shape[1]))
            labels.append(0.0)
    ref_index = torch.stack(refs)
    abnormal_index = torch.stack(abnormal)
    M_a = pool.masks[abnormal_index].clone()
    if config.maskless_references > 0:  # (no draw at 0, so the episodes stay those of earlier versions)
        maskless = torch.rand(config.batch_size, generator=generator) < config.maskless_references
        M_a[maskless] = 1.0  # the whole image, as a reference without a pixel mask comes (score_maps estimates it)
    return Episodes(
        normal_refs=pool.normal[ref_index].flatten(1, 2), F_a=pool.abnormal[abnormal_index],
        M_a=M_a, F_q=torch.stack(queries), M_q=torch.stack(query_masks), y_q=torch.tensor(labels))


def _square(image: Image.Image, size: int) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


@torch.no_grad()
def build_domain_pool(
    extractor: FeatureExtractor, name: str, samples: list[Sample], config: EpisodeConfig, rng: np.random.Generator,
    device: torch.device, progress: bool,
) -> DomainPool:
    """The episodes material of one domain from its labelled ``samples``."""
    size, grid = extractor.preprocessor.size, extractor.config.grid_size
    normals = [s for s in samples if s.label == 0]
    if len(normals) < 2:
        raise DataError(f"domain {name!r} has {len(normals)} normal images; episodes need at least 2")
    normals = [normals[i] for i in sorted(rng.permutation(len(normals))[: config.max_normals])]
    masked = [s for s in samples if s.label == 1 and s.mask_path]
    synthetic = config.synthetic == "always" or (config.synthetic == "auto" and not masked)
    synthetic_count = config.synthetic_count if synthetic else 0
    if not masked and not synthetic_count:
        raise DataError(f"domain {name!r} has no anomalous image with a pixel mask; set train.synthetic to 'auto' "
                        "or 'always' to train on synthetic anomalies there")

    def featurise(images: list[np.ndarray]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), 16):
            batch = extractor.preprocessor.batch([Image.fromarray(a) for a in images[start:start + 16]])
            out.append(cells(extractor(batch.to(device)).float().cpu()))
        return torch.cat(out) if out else torch.zeros(0, grid * grid, extractor.out_channels)

    normal_pixels = [_square(load_image(s.path), size)
                     for s in show_progress(normals, desc=f"{name}: normal images", enabled=progress, leave=False)]
    abnormal_pixels, pixel_masks, kinds = [], [], []
    for s in show_progress(masked, desc=f"{name}: defects", enabled=progress, leave=False):
        image = load_image(s.path)
        mask = np.asarray(load_mask(s.mask_path, image.size).resize((size, size), Image.Resampling.NEAREST)) > 127
        if mask.any():  # a mask that vanishes at this resolution marks nothing to learn from
            abnormal_pixels.append(_square(image, size))
            pixel_masks.append(mask)
            kinds.append(s.defect or "defect")
    for _ in range(synthetic_count):
        i, donor = rng.choice(len(normal_pixels), 2, replace=False)
        image, mask, fill = pasted_anomaly(normal_pixels[i], normal_pixels[donor], rng, config.opacity,
                                           config.fill_sources)
        if mask.any():
            abnormal_pixels.append(image)
            pixel_masks.append(mask)
            kinds.append(f"synthetic:{fill}")
    masks = torch.from_numpy(np.stack(pixel_masks)) if pixel_masks else torch.zeros(0, size, size, dtype=torch.bool)
    return DomainPool(name, featurise(normal_pixels), featurise(abnormal_pixels), cell_mask(masks, grid), tuple(kinds))


__all__ = ["DomainPool", "Episodes", "build_domain_pool", "cell_mask", "sample_episodes"]
