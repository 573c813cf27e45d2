"""Diffusion pieces: the noise schedule and swappable score networks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ray_ad.diffusion.dit import DiT
from ray_ad.diffusion.gaussian_skip import GaussianSkip
from ray_ad.diffusion.schedule import NoiseSchedule


@dataclass
class ScoreNetConfig:
    kind: Literal["dit", "unet"] = "dit"
    hidden: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    # UNet2DModel only: channels per resolution level.
    unet_channels: tuple[int, ...] = field(default_factory=lambda: (128, 256))
    # Add the exact noise prediction of N(0, I) data, sqrt(1 - alpha_bar_t) x_t, to the network's output
    # (see gaussian_skip.py): meant for whitened features, where it is the Gaussian part of the answer.
    gaussian_skip: bool = False


def build_score_net(config: ScoreNetConfig, in_channels: int, grid_size: int) -> nn.Module:
    """The epsilon-prediction network named by ``config.kind`` (with the Gaussian skip when configured)."""
    if config.kind == "dit":
        net: nn.Module = DiT(in_channels, grid_size, config.hidden, config.depth, config.heads, config.mlp_ratio)
    else:
        from ray_ad.diffusion.unet import FeatureUNet

        net = FeatureUNet(in_channels, grid_size, config.unet_channels)
    return GaussianSkip(net) if config.gaussian_skip else net


__all__ = ["DiT", "GaussianSkip", "NoiseSchedule", "ScoreNetConfig", "build_score_net"]
