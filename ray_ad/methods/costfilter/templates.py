"""Normal templates for the cost volume: a bank of normal training images' features, and how a query
picks its N templates from it (CostFilter-AD Sec. 3, "templates for embedding-based methods").

At inference a query is matched against the N bank images nearest to it by a global descriptor
(issue 20; the authors' embedding-based path draws N at random, which on an aligned product differs
little, and "nearest" makes a prediction deterministic). In training the N templates are drawn at
random, never the query's own source image: a template identical to the query outside the pasted
defect would teach the filter a shortcut that no test image offers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def global_descriptor(features: torch.Tensor, layer_channels: list[int]) -> torch.Tensor:
    """``[B, C, H, W]`` -> unit vectors ``[B, C]``: per layer the mean of the unit-normalised cells,
    normalised again, so every layer weighs the same whatever its channel count."""
    parts = [F.normalize(F.normalize(f, dim=1).mean((2, 3)), dim=1) for f in features.split(layer_channels, dim=1)]
    return F.normalize(torch.cat(parts, dim=1), dim=1)


class TemplateBank:
    """Features ``[K, C, H, W]`` of K normal images and their global descriptors; for a fleet filter also
    the line (class) each image belongs to, so training draws a query's templates from its own line."""

    def __init__(self, features: torch.Tensor, layer_channels: list[int], classes: torch.Tensor | None = None) -> None:
        if features.dim() != 4 or features.shape[1] != sum(layer_channels):
            raise ValueError(f"template features {list(features.shape)} do not match a backbone with layer "
                             f"channels {layer_channels} (templates of another backbone?)")
        if classes is not None and classes.shape != (features.shape[0],):
            raise ValueError(f"bank classes {list(classes.shape)} must hold one class per image ({features.shape[0]})")
        self.features = features
        self.layer_channels = layer_channels
        self.classes = classes
        self.descriptors = global_descriptor(features, layer_channels)

    def __len__(self) -> int:
        return self.features.shape[0]

    def to(self, device: torch.device | str) -> TemplateBank:
        self.features = self.features.to(device)
        self.descriptors = self.descriptors.to(device)
        return self

    def cpu_copy(self) -> TemplateBank:
        """A copy on the CPU (what is shipped to Ray Train workers; this bank stays where it is)."""
        return TemplateBank(self.features.detach().cpu(), self.layer_channels, self.classes)

    def check_count(self, n: int) -> None:
        if not 1 <= n <= len(self):
            raise ValueError(f"N = {n} templates requested, but the bank holds {len(self)} normal images")

    def nearest(self, query: torch.Tensor, n: int) -> torch.Tensor:
        """Indices ``[B, n]`` of the bank images nearest to each query ``[B, C, H, W]`` (cosine of descriptors)."""
        self.check_count(n)
        if query.shape[1:] != self.features.shape[1:]:
            raise ValueError(f"query features {list(query.shape)} do not match the template bank "
                             f"{list(self.features.shape)}")
        similarity = global_descriptor(query, self.layer_channels) @ self.descriptors.T
        return similarity.topk(n, dim=1).indices

    def random(self, exclude: torch.Tensor, n: int, generator: torch.Generator,
               classes: torch.Tensor | None = None) -> torch.Tensor:
        """Indices ``[B, n]``: n distinct random bank images per row, never the row's ``exclude`` index
        (-1 = nothing to exclude), and with ``classes [B]`` only images of the row's class."""
        self.check_count(n + 1 if len(self) > n else n)
        scores = torch.rand(len(exclude), len(self), generator=generator)
        rows = torch.arange(len(exclude))
        excluded = exclude >= 0
        scores[rows[excluded], exclude[excluded]] = -1.0  # ranked last, so never among the top n
        if classes is not None:
            if self.classes is None:
                raise ValueError("templates of a class were asked for, but this bank has no classes")
            scores[self.classes.cpu()[None, :] != classes.cpu()[:, None]] = -2.0  # other lines: below even those
        return scores.topk(n, dim=1).indices

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` indices -> template features ``[B, n, C, H, W]``."""
        return self.features[indices.to(self.features.device)]
