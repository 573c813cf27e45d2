"""A score network plus the exact noise prediction for N(0, I) data: the network learns what departs from it.

For x_0 ~ N(0, I), x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps is N(0, I) too and
E[eps | x_t] = sqrt(1 - alpha_bar_t) x_t. On features whitened to N(0, I) (``position_whiten``) that
term is the whole noise prediction of a Gaussian model, so ``eps_theta = sqrt(1 - alpha_bar_t) x_t +
net(x_t, t)`` starts as the Gaussian's exact denoiser when ``net`` starts at zero (the DiT's output
layer is zero-initialised), and training only has to learn the non-Gaussian rest, as EDM's skip connection does for the
identity (Karras et al. 2022). OSD-IRF's one-step IRF of the untrained network is then proportional to
the whitened features, i.e. PaDiM's Mahalanobis distance per cell.
"""

from __future__ import annotations

import torch
from torch import nn

from ray_ad.diffusion.schedule import NoiseSchedule


class GaussianSkip(nn.Module):
    def __init__(self, net: nn.Module, schedule: NoiseSchedule | None = None) -> None:
        super().__init__()
        self.net = net
        alphas_cumprod = (schedule or NoiseSchedule()).alphas_cumprod
        self.register_buffer("skip", (1 - alphas_cumprod).sqrt(), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        return self.net(x, t) + self.skip[t].view(-1, *([1] * (x.dim() - 1))) * x
