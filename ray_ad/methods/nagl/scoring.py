"""NAGL's parameter-free parts: similarities, residuals, the score maps and the image score.

Feature sets are cell matrices ``[B, N, C]`` (``N = G * G`` cells of a ``[B, C, G, G]`` feature map);
``d(., .)`` in the paper is the cosine distance, and the authors' code writes every similarity as
``(1 + cos) / 2`` in [0, 1], so ``1 - d`` below is that similarity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cells(features: torch.Tensor) -> torch.Tensor:
    """``[B, C, G, G]`` feature maps -> ``[B, G*G, C]`` cell vectors."""
    return features.flatten(2).transpose(1, 2).contiguous()


def reference_statistics(normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and spread ``[B, 1, C]`` of the normal-reference cells ``[B, R, C]``; the variance
    gets 1% of its channel mean added, so a channel that never fires on the references stays finite."""
    mean = normal.mean(1, keepdim=True)
    var = normal.var(1, keepdim=True, unbiased=False)
    return mean, (var + 0.01 * var.mean(-1, keepdim=True)).sqrt()


def standardised(statistics: tuple[torch.Tensor, torch.Tensor], *features: torch.Tensor) -> list[torch.Tensor]:
    """Every feature set ``[B or 1, N, C]`` in the references' standard units (see ``reference_statistics``)."""
    mean, spread = statistics
    return [(f - mean[: f.shape[0]]) / spread[: f.shape[0]] for f in features]


def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(1 + cos) / 2`` between every row of ``a [B, N, C]`` and of ``b [B, R, C]``: ``[B, N, R]``."""
    return (1 + F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(1, 2)) / 2


def nearest_normal(features: torch.Tensor, normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every cell of ``features [B, N, C]``, its nearest normal-reference cell among ``normal [B, R, C]``
    (the most similar, PatchCore-style search): (similarity s_n ``[B, N]``, the nearest cell f*_n ``[B, N, C]``)."""
    best, index = similarity(features, normal).max(-1)
    nearest = torch.gather(normal, 1, index[..., None].expand(-1, -1, normal.shape[-1]))
    return best, nearest


def residual(features: torch.Tensor, normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Res(F, F^n) = F - F*_n (NAGL, RM): each cell minus its nearest normal-reference cell; also s_n."""
    s_n, nearest = nearest_normal(features, normal)
    return features - nearest, s_n


def normal_guided_score(s_n: torch.Tensor) -> torch.Tensor:
    """S_n^i = d(f_i^q, f*_n): the cosine distance to the nearest normal cell, here ``1 - (1 + cos) / 2``."""
    return 1 - s_n


def anomaly_guided_score(features: torch.Tensor, anomaly_proxies: torch.Tensor) -> torch.Tensor:
    """S_a^i = 1/M sum_m (1 - d(f_i^q, P^_m)) (NAGL, AFL): mean similarity of each query cell
    ``[B, N, C]`` to the anomaly proxies ``[B, M, C]``."""
    return similarity(features, anomaly_proxies).mean(-1)


def centred_anomaly_score(S_a: torch.Tensor) -> torch.Tensor:
    """S_a ``[B, N]`` less each query's median cell (``centre_anomaly_map``, ours): what sets a cell apart
    from the rest of its own image, without the level that the whole image shares."""
    return S_a - S_a.median(-1, keepdim=True).values


def fused_map(normal_score: torch.Tensor, anomaly_score: torch.Tensor | None) -> torch.Tensor:
    """S = S_n + S_a (NAGL, overview step 5), halved as in the authors' ``(s_a + 1 - s_n) / 2`` so that S
    stays in [0, 1] (L_cls reads it as a probability). Without abnormal references: S = S_n."""
    if anomaly_score is None:
        return normal_score
    return (normal_score + anomaly_score) / 2


def defect_region(given: torch.Tensor, S_n: torch.Tensor, fraction: float) -> torch.Tensor:
    """M^a, the cell mask of each abnormal reference ``[A, N]``, from its given cell mask ``[A, N]``.

    A mask that marks every cell gives no region (a dataset without pixel masks, such as elpv, can only say
    "this image is defective"); RM would then attend to every cell of the reference, nearly all of them
    normal. For such a reference the region is estimated from its own normal-guided score ``S_n [A, N]``:
    its ``fraction`` cells farthest from the normal references (at least one). Masks that mark a region are
    kept as given.
    """
    region = given.clone()
    count = max(1, math.ceil(fraction * given.shape[-1]))
    for a in torch.nonzero(given.bool().all(-1)).flatten().tolist():
        region[a] = 0
        region[a, S_n[a].topk(count).indices] = 1
    return region


def abnormal_residual(F_a: torch.Tensor, normal: torch.Tensor, M_a: torch.Tensor, unmasked_region: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """RM's inputs from an abnormal reference: Res(F^a, F^n) ``[B, N_a, C]`` against ``normal [B, R, C]``, and
    its region M^a in the shape of the given cell mask ``M_a`` (a mask that marks every cell estimated by
    ``defect_region`` when ``unmasked_region`` > 0). Training (``score_maps``) and a line's reference set
    (``NAGL.set_references``) both come here, so RM trains on the region it is given at inference."""
    res_a, s_n = residual(F_a, normal)
    if unmasked_region > 0:
        M_a = defect_region(M_a, normal_guided_score(s_n).view_as(M_a), unmasked_region)
    return res_a, M_a


def top_mean(score_map: torch.Tensor, fraction: float) -> torch.Tensor:
    """s = T_fraction(S): the mean of the top ``fraction`` of cells of ``[B, N]`` (at least one cell)."""
    count = max(1, math.ceil(fraction * score_map.shape[-1]))
    return score_map.topk(count, dim=-1).values.mean(-1)


__all__ = [
    "abnormal_residual", "anomaly_guided_score", "cells", "centred_anomaly_score", "defect_region", "fused_map",
    "nearest_normal", "normal_guided_score", "reference_statistics", "residual", "similarity", "standardised",
    "top_mean",
]
