"""The anomaly cost volume (CostFilter-AD, Sec. 3.2): global matching of a query against N templates.

For every feature layer l, every query cell i is compared with every cell j of every template n
(Eq. 1, cosine similarity), the similarity is turned into a cost (Eq. 2, ``1 - cos``), and the
template and cell axes are merged into one matching axis. Of those ``N * H' * W'`` costs only the D
smallest are kept per query cell (the authors' code does the same: the rest are far from anything the
cell could be, and a fixed D lets one filter serve any N). The result is laid out as the 3D U-Net
reads it, ``C [B, D, L, H', W']``: matching as channels, layers as depth, cells as space.

``initial_map`` is the paper's M-bar: global min pooling of the volume along the matching axis, i.e.
each cell's nearest-template cost per layer, the coarse map that guides the filter.
"""

from __future__ import annotations

import torch


def split_layers(features: torch.Tensor, channels: list[int]) -> list[torch.Tensor]:
    """``[..., C, H, W]`` concatenated stage features -> one tensor per layer (``f^l``)."""
    if sum(channels) != features.shape[-3]:
        raise ValueError(f"layer channels {channels} do not add up to the {features.shape[-3]} feature channels")
    return list(features.split(channels, dim=-3))


def layer_costs(query: torch.Tensor, templates: torch.Tensor, depth: int) -> torch.Tensor:
    """The ``depth`` smallest costs of every query cell against every template cell, one layer.

    ``query [B, C, H, W]``; ``templates [B, N, C, H, W]`` (each query has its own N templates) or
    ``[N, C, H, W]`` (the same templates for the whole batch). Returns ``[B, depth, H, W]`` in
    ascending order (channel 0 is the nearest match).
    """
    b, c, h, w = query.shape
    if templates.dim() == 4:
        templates = templates.unsqueeze(0).expand(b, *templates.shape)
    if templates.shape[0] != b or templates.shape[2:] != (c, h, w):
        raise ValueError(f"templates {list(templates.shape)} do not match query {list(query.shape)}")
    n = templates.shape[1]
    if not 1 <= depth <= n * h * w:
        raise ValueError(f"D = {depth} must be between 1 and N * H' * W' = {n * h * w}")
    q = _unit(query.flatten(2))  # [B, C, HW]: unit vectors, so a dot product is a cosine
    t = _unit(templates.transpose(1, 2).reshape(b, c, n * h * w))  # templates and cells merged: the matching axis
    similarity = torch.bmm(q.transpose(1, 2), t)  # Eq. 1: V(j, n, l, i) for one layer l, [B, HW, N*HW]
    # Eq. 2: C = 1 - V. The D smallest costs are the D largest similarities, so the costs are taken of
    # those D only: on CPU the top-D search is most of the filter's time, and a full 1 - V adds a pass.
    kept = 1.0 - similarity.topk(depth, dim=2, largest=True, sorted=True).values  # [B, HW, D], ascending cost
    return kept.transpose(1, 2).reshape(b, depth, h, w)


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    """``[B, C, M]`` scaled to unit length along C (``F.normalize``'s eps). A sum of squares over the
    channel axis of this layout is a plain row reduction, several times faster on CPU than the strided
    norm ``F.normalize`` runs over a middle axis."""
    return vectors / vectors.square().sum(1, keepdim=True).sqrt().clamp_min(1e-12)


def cost_volume(query_layers: list[torch.Tensor], template_layers: list[torch.Tensor], depth: int) -> torch.Tensor:
    """``C [B, D, L, H', W']`` from per-layer query and template features (see ``layer_costs``)."""
    if len(query_layers) != len(template_layers):
        raise ValueError(f"{len(query_layers)} query layers but {len(template_layers)} template layers")
    return torch.stack([layer_costs(q, t, depth) for q, t in zip(query_layers, template_layers)], dim=2)


def initial_map(volume: torch.Tensor) -> torch.Tensor:
    """M-bar ``[B, L, H', W']``: global min pooling of the cost volume along the matching axis (Sec. 3.2)."""
    return volume.amin(dim=1)
