"""The training objective (CostFilter-AD Eq. 5): the filter as a normal/anomaly segmenter.

L = L_Focal(M, M_s, sigma(Y_c)) + L_CE(Y_c, Y) + alpha * (L_SoftIoU(M, M_s) + L_SSIM(M, M_s)),

with M the predicted anomaly map (the softmax's anomaly channel), M_s the synthetic anomaly mask, Y_c
the class-aware adaptor's logits and Y the class (product line). The authors' code adds an MSE term
between M and M_s with weight 1 (DESIGN.md §1); it is kept as ``mse`` and can be set to 0. The focal
loss's gamma follows the adaptor (Eq. 5): ``gamma0 - sigma(Y_c)[Y]`` where the adaptor classifies the
sample correctly, ``gamma0`` otherwise, so samples of a class the adaptor already knows are weighted
a little less sharply. With one class (a per-line filter) there is no adaptor and gamma = gamma0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    focal: float = 1.0
    ssim: float = 0.1  # alpha of Eq. 5
    soft_iou: float = 0.1  # alpha of Eq. 5
    mse: float = 1.0  # the authors' code; not in Eq. 5
    ce: float = 1.0  # the class-aware adaptor's cross-entropy (only with more than one class)
    gamma0: float = 3.0  # Appendix A (ii)

    def __post_init__(self) -> None:
        for name in ("focal", "ssim", "soft_iou", "mse", "ce"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if self.focal + self.ssim + self.soft_iou + self.mse == 0:
            raise ValueError("every map loss weight is 0: the filter would learn nothing")
        if self.gamma0 < 1:
            raise ValueError(f"loss.gamma0 must be >= 1 (gamma = gamma0 - sigma(Y_c) stays >= 0), got {self.gamma0}")


def focal_loss(anomaly_prob: torch.Tensor, mask: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Binary focal loss (Lin et al., 2017) per pixel, averaged; ``gamma [B]`` per sample. ``mask`` may
    be soft (the share of a cell's pixels that are defective): each class's term is weighted by it."""
    p = anomaly_prob.clamp(1e-6, 1 - 1e-6)
    g = gamma.view(-1, *([1] * (p.dim() - 1)))
    anomalous = -(1 - p).pow(g) * p.log()
    normal = -p.pow(g) * (1 - p).log()
    return (mask * anomalous + (1 - mask) * normal).mean()


def soft_iou_loss(anomaly_prob: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - soft IoU (Rahman & Wang, 2016), per sample then averaged. An empty mask against an empty
    map counts as a perfect match."""
    dims = tuple(range(1, anomaly_prob.dim()))
    intersection = (anomaly_prob * mask).sum(dims)
    union = (anomaly_prob + mask - anomaly_prob * mask).sum(dims)
    return (1 - (intersection + 1.0) / (union + 1.0)).mean()


def ssim_loss(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """1 - SSIM (Wang et al., 2004) with a Gaussian window, for maps ``[B, H, W]`` in [0, 1]."""
    radius = min(window // 2, min(x.shape[-2:]) - 1)  # a map smaller than the window gets a smaller one
    window = 2 * radius + 1
    taps = torch.exp(-0.5 * ((torch.arange(window, dtype=x.dtype, device=x.device) - radius) / sigma) ** 2)
    taps = taps / taps.sum()
    kernel = (taps[:, None] * taps[None, :]).view(1, 1, window, window)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t, (radius,) * 4, mode="reflect"), kernel)

    x, y = x.unsqueeze(1), y.unsqueeze(1)
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return 1 - ssim.mean()


def costfilter_loss(
    anomaly_prob: torch.Tensor, mask: torch.Tensor, weights: LossWeights,
    class_logits: torch.Tensor | None = None, classes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Eq. 5 for predicted maps ``M [B, H, W]`` (probabilities) and masks ``M_s [B, H, W]`` in {0, 1}.

    ``class_logits [B, K]`` and ``classes [B]`` are the class-aware adaptor's output and the samples'
    classes (None for a single-class filter). Returns (loss, each term's value for logging).
    """
    mask = mask.to(anomaly_prob.dtype)
    gamma = torch.full((anomaly_prob.shape[0],), weights.gamma0, device=anomaly_prob.device)
    terms: dict[str, torch.Tensor] = {}
    if class_logits is not None and classes is not None:
        confidence = torch.sigmoid(class_logits).gather(1, classes[:, None])[:, 0]
        correct = class_logits.argmax(1) == classes
        # Eq. 5: gamma = gamma0 - sigma(Y_c) when the adaptor is right; the adaptor gets no gradient here.
        gamma = torch.where(correct, weights.gamma0 - confidence.detach(), gamma)
        terms["ce"] = F.cross_entropy(class_logits, classes)
    terms["focal"] = focal_loss(anomaly_prob, mask, gamma)
    terms["soft_iou"] = soft_iou_loss(anomaly_prob, mask)
    terms["ssim"] = ssim_loss(anomaly_prob, mask)
    terms["mse"] = F.mse_loss(anomaly_prob, mask)
    loss = sum(getattr(weights, name) * value for name, value in terms.items())
    return loss, {name: float(value.detach()) for name, value in terms.items()}
