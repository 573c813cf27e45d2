"""The cost-volume filter (CostFilter-AD, Sec. 3.3-3.4): a 3D U-Net with dual-stream attention guidance.

Input: the cost volume ``C [B, D, L, H', W']`` (matching as channels, feature layers as depth), the
query's features ``f_S`` (one tensor per layer) and the initial map ``M-bar [B, L, H', W']``. Each
encoder level l fuses its features with both guidance streams and refines them with residual
channel-spatial attention (RCSA, Eq. 3):

    x'_l   = cat(x_l, h(M-bar), h(f_S^l))                                  (Eq. 3a)
    x^ca_l = sigma(conv(MP(x'_l)) + conv(AP(x'_l))) * x'_l + x'_l           (Eq. 3b)
    x^sa_l = sigma(conv(cat(mean_c(x^ca_l), max_c(x^ca_l)))) * x^ca_l + x^ca_l   (Eq. 3c)

x^sa_l reaches the decoder through the skip connection. After the decoder a 3D convolution over the
whole depth condenses the L layers to one (Appendix A (ii)), and the output is

    M = softmax(conv(min(x)))                                               (Eq. 4)

the min taken over the channel (matching) axis, the anomaly channel of the softmax being the map.
The class-aware adaptor pools the deepest features into class logits (only with more than one class).

Sizes are this project's, not the authors' (their filter has ~44M parameters for D = 1024 on 64 x 64
cells): ``width`` and ``levels`` are config values, and the README gives the parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ray_ad.methods.costfilter.volume import cost_volume, initial_map, split_layers


@dataclass
class FilterNetConfig:
    width: int = 16  # channels of the first level; each deeper level doubles it
    levels: int = 3  # encoder levels (each halves H' and W'; the depth L is never pooled)
    guidance_width: int = 8  # channels each guidance stream adds at a level (h(.) of Eq. 3a)
    spatial_guidance: bool = True  # SG: the query features f_S (ablation: False)
    matching_guidance: bool = True  # MG: the initial map M-bar (ablation: False)
    rcsa: bool = True  # residual channel-spatial attention (ablation: False = plain concatenation)
    # Ours, not the paper's: the base detector's own cell map joins M-bar in the matching-guidance stream,
    # so the filter refines the base's map rather than re-deriving one from the templates alone.
    base_guidance: bool = True
    classes: int = 1  # lines a fleet filter is trained on: > 1 adds the class-aware adaptor (Sec. 3.3)
    reduction: int = 4  # channel-attention bottleneck ratio

    def __post_init__(self) -> None:
        if self.width < 2 or self.levels < 1 or self.guidance_width < 1 or self.reduction < 1 or self.classes < 1:
            raise ValueError(f"filter: width >= 2, levels >= 1, guidance_width >= 1, reduction >= 1, classes >= 1; "
                             f"got {self}")


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """Two 3x3x3 convolutions with batch norm and ReLU (the U-Net's unit)."""
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True),
        nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True),
    )


class RCSA(nn.Module):
    """Residual channel attention (Eq. 3b) followed by residual spatial attention (Eq. 3c)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        # "conv" of Eq. 3b: a shared 1x1x1 bottleneck applied to the max- and the average-pooled vector.
        self.channel_mlp = nn.Sequential(
            nn.Conv3d(channels, hidden, 1), nn.ReLU(inplace=True), nn.Conv3d(hidden, channels, 1)
        )
        self.spatial_conv = nn.Conv3d(2, 1, 3, padding=1)  # "conv" of Eq. 3c over (mean, max) maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mp = F.adaptive_max_pool3d(x, 1)  # MP: global max pooling
        ap = F.adaptive_avg_pool3d(x, 1)  # AP: global average pooling
        x_ca = torch.sigmoid(self.channel_mlp(mp) + self.channel_mlp(ap)) * x + x  # Eq. 3b
        stats = torch.cat([x_ca.mean(1, keepdim=True), x_ca.amax(1, keepdim=True)], 1)  # mu(.), max(.)
        return torch.sigmoid(self.spatial_conv(stats)) * x_ca + x_ca  # Eq. 3c


class GuidanceProjector(nn.Module):
    """h(.) of Eq. 3a for one stream at one level: channel transform, then resize to the level."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
                                     nn.BatchNorm3d(c_out), nn.ReLU(inplace=True))

    def forward(self, guide: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        if guide.shape[-3:] != size:
            guide = F.interpolate(guide, size=size, mode="trilinear", align_corners=False)
        return self.project(guide)


class GuidedLevel(nn.Module):
    """One encoder level: conv block, then Eq. 3 (guidance concatenation + RCSA), then back to ``c`` channels."""

    def __init__(self, c_in: int, c: int, guide_query: int, config: FilterNetConfig) -> None:
        super().__init__()
        self.block = conv_block(c_in, c)
        g = config.guidance_width
        guide_maps = int(config.matching_guidance) + int(config.base_guidance)  # M-bar and/or the base's map
        self.h_map = GuidanceProjector(guide_maps, g) if guide_maps else None
        self.h_query = GuidanceProjector(guide_query, g) if config.spatial_guidance else None
        fused = c + g * (self.h_map is not None) + g * (self.h_query is not None)
        self.rcsa = RCSA(fused, config.reduction) if config.rcsa else nn.Identity()
        self.merge = nn.Sequential(nn.Conv3d(fused, c, 1, bias=False), nn.BatchNorm3d(c), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor, m_bar: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        x = self.block(x)
        size = tuple(x.shape[-3:])
        parts = [x]
        if self.h_map is not None:
            parts.append(self.h_map(m_bar, size))
        if self.h_query is not None:
            parts.append(self.h_query(query, size))
        return self.merge(self.rcsa(torch.cat(parts, 1)))  # Eq. 3a -> 3b -> 3c


class CostFilterNet(nn.Module):
    """``(C, f_S layers, M-bar) -> (M [B, H', W'] anomaly probability, class logits [B, K] or None)``."""

    def __init__(self, depth: int, layer_channels: list[int], config: FilterNetConfig, classes: int | None = None
                 ) -> None:
        super().__init__()
        classes = config.classes if classes is None else classes
        self.config, self.depth, self.layers = config, depth, len(layer_channels)
        g = config.guidance_width
        # Query features: each layer's channels projected to g, stacked along depth (depth slice l <- layer l).
        self.query_in = nn.ModuleList(nn.Conv2d(c, g, 1) for c in layer_channels)
        widths = [config.width * 2**i for i in range(config.levels)]
        self.stem = nn.Sequential(nn.Conv3d(depth, widths[0], 1, bias=False), nn.BatchNorm3d(widths[0]),
                                  nn.ReLU(inplace=True))
        self.encoder = nn.ModuleList(
            GuidedLevel(widths[max(i - 1, 0)], w, g, config) for i, w in enumerate(widths)
        )
        self.bottleneck = conv_block(widths[-1], widths[-1])
        self.decoder = nn.ModuleList(
            conv_block(widths[i] + (widths[i + 1] if i + 1 < len(widths) else widths[-1]), widths[i])
            for i in range(len(widths))
        )
        # Appendix A (ii): a 3D convolution along the depth condenses the L layers to one. It stays linear
        # (as in the authors' code): after a ReLU the min over channels of Eq. 4 is 0 wherever one channel
        # is off, i.e. nearly everywhere, and the map comes out constant.
        self.condense = nn.Conv3d(widths[0], widths[0], (self.layers, 1, 1))
        self.head = nn.Conv2d(1, 2, 1)  # Eq. 4: conv after the min over the matching (channel) axis
        self.adaptor = nn.Linear(widths[-1], classes) if classes > 1 else None  # class-aware adaptor

    def forward(
        self, volume: torch.Tensor, query_layers: list[torch.Tensor], m_bar: torch.Tensor,
        base_map: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, d, depth, h, w = volume.shape
        if d != self.depth or depth != self.layers:
            raise ValueError(f"cost volume {list(volume.shape)} does not match the filter (D = {self.depth}, "
                             f"L = {self.layers})")
        query = torch.stack([proj(f) for proj, f in zip(self.query_in, query_layers)], dim=2)  # [B, g, L, H, W]
        guides = [m_bar.unsqueeze(1)] if self.config.matching_guidance else []  # [B, 1, L, H, W]: one slice per layer
        if self.config.base_guidance:
            if base_map is None or base_map.shape != (b, h, w):
                raise ValueError(f"this filter is guided by the base's map: give one of shape {[b, h, w]}, got "
                                 f"{None if base_map is None else list(base_map.shape)}")
            guides.append(base_map[:, None, None].expand(b, 1, depth, h, w))  # the same map at every depth
        guide_map = torch.cat(guides, 1) if guides else m_bar.unsqueeze(1)  # (unused without MG and base)
        x = self.stem(volume)
        skips = []
        for i, level in enumerate(self.encoder):
            if i > 0:
                x = F.max_pool3d(x, (1, 2, 2), ceil_mode=True)
            x = level(x, guide_map, query)
            skips.append(x)
        x = self.bottleneck(F.max_pool3d(x, (1, 2, 2), ceil_mode=True))
        logits = self.adaptor(x.mean((2, 3, 4))) if self.adaptor is not None else None
        for i in reversed(range(len(self.decoder))):
            skip = skips[i]
            x = F.interpolate(x, size=skip.shape[-3:], mode="trilinear", align_corners=False)
            x = self.decoder[i](torch.cat([skip, x], 1))
        x = self.condense(x)[:, :, 0]  # [B, width, H, W]
        scores = self.head(x.amin(1, keepdim=True))  # Eq. 4: conv(min(x)) -> 2 logits
        # Logits held within +-15 keep both probabilities above 1e-13: a saturated softmax otherwise
        # sends subnormal floats through the backward pass, which CPUs process ~100x slower.
        return scores.clamp(-15.0, 15.0).softmax(1)[:, 1], logits  # the softmax's anomaly channel is M


@dataclass(frozen=True)
class Matching:
    """How a query is matched: its layers' channels, N templates, and the D costs kept per cell."""

    layer_channels: tuple[int, ...]
    templates: int
    depth: int


def filter_forward(
    model: nn.Module, matching: Matching, query: torch.Tensor, templates: torch.Tensor,
    base_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``M [B, H', W']`` (and class logits) of query features ``[B, C, H', W']`` against template features
    ``[B, N, C, H', W']``: the cost volume (Eqs. 1-2, top-D), then the filter (Eqs. 3-4). ``model`` is the
    filter or its DistributedDataParallel wrapper; ``base_map [B, H', W']`` is the base detector's cell
    map, for a filter with base guidance."""
    channels = list(matching.layer_channels)
    query_layers = split_layers(query, channels)
    volume = cost_volume(query_layers, split_layers(templates, channels), matching.depth)
    return model(volume, query_layers, initial_map(volume), base_map)
