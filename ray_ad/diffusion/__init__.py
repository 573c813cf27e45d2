"""Diffusion pieces: the noise schedule and swappable score networks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ray_ad.diffusion.dit import DiT
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


def build_score_net(config: ScoreNetConfig, in_channels: int, grid_size: int) -> nn.Module:
    """The epsilon-prediction network named by ``config.kind``."""
    if config.kind == "dit":
        return DiT(in_channels, grid_size, config.hidden, config.depth, config.heads, config.mlp_ratio)
    from ray_ad.diffusion.unet import FeatureUNet

    return FeatureUNet(in_channels, grid_size, config.unet_channels)


__all__ = ["DiT", "NoiseSchedule", "ScoreNetConfig", "build_score_net"]
