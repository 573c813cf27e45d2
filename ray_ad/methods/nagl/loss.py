"""NAGL's objective ("Loss & Training"): L = L_cls + lambda * L_seg.

L_seg = Focal(S, M^q) + Dice(S, M^q) on the fused map S (plus, with ``anomaly_branch`` > 0, the same on
S_a alone, as the authors' code supervises each branch); L_cls = BCE(s, y^q) with s = T_0.01(S), the
mean of the top 1% of S. Both read S as a probability, which the fused map in [0, 1] is. The maps and
masks are compared on the feature grid (see the README: the paper does not say at which resolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ray_ad.methods.costfilter.loss import focal_loss  # one binary focal loss for the project's segmenters
from ray_ad.methods.nagl.config import NAGLLossWeights


def dice_loss(prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Dice (Milletari et al., 2016) per sample, averaged; +1 smoothing so an empty mask against an
    empty map is a perfect match rather than 0 / 0."""
    dims = tuple(range(1, prob.dim()))
    overlap = (prob * mask).sum(dims)
    return (1 - (2 * overlap + 1) / (prob.sum(dims) + mask.sum(dims) + 1)).mean()


def nagl_loss(S: torch.Tensor, s: torch.Tensor, M_q: torch.Tensor, y_q: torch.Tensor,
              weights: NAGLLossWeights, S_a: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``S [B, N]`` fused map, ``s [B]`` image score, ``M_q [B, N]`` the query's cell mask, ``y_q [B]`` its
    label; ``S_a [B, N]`` the anomaly-guided map (read only when ``weights.anomaly_branch`` > 0)."""
    gamma = torch.full((S.shape[0],), weights.focal_gamma, device=S.device, dtype=S.dtype)

    def segmentation(score_map: torch.Tensor) -> torch.Tensor:
        p = score_map.clamp(1e-6, 1 - 1e-6)
        return focal_loss(p, M_q, gamma) + dice_loss(p, M_q)

    L_seg = segmentation(S)
    if weights.anomaly_branch > 0:
        if S_a is None:
            raise ValueError("loss.anomaly_branch > 0 needs the anomaly-guided map S_a")
        L_seg = L_seg + weights.anomaly_branch * segmentation(S_a)
    L_cls = F.binary_cross_entropy(s.clamp(1e-6, 1 - 1e-6), y_q.to(s.dtype))
    loss = weights.cls * L_cls + weights.seg * L_seg
    return loss, {"cls": L_cls.item(), "seg": L_seg.item()}
