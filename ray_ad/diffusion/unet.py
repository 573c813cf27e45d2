"""A diffusers ``UNet2DModel`` over feature grids, behind the same ``(x, t) -> eps`` call as the DiT."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel
from torch import nn


class FeatureUNet(nn.Module):
    def __init__(self, in_channels: int, grid_size: int, channels: tuple[int, ...] = (128, 256)) -> None:
        super().__init__()
        levels = len(channels)
        self.unet = UNet2DModel(
            sample_size=grid_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(channels),
            down_block_types=("DownBlock2D",) * levels,
            up_block_types=("UpBlock2D",) * levels,
            layers_per_block=1,
            norm_num_groups=min(32, min(channels)),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t.expand(x.shape[0]) if t.dim() == 0 else t).sample
