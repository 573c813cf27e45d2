"""Folding a frozen backbone's batch norms into the convolutions before them.

In eval mode a batch norm is an affine map per channel, y = (x - mu) * gamma / sqrt(var + eps) + beta;
after a convolution it can be merged into that convolution's weights and bias. On CPU the separate
batch-norm passes cost about a third of tf_efficientnet_lite0's time (measured with torch.profiler),
and every detector, every training feature and every served image pays for the backbone.

A (convolution, batch norm) pair is two consecutive children of one module, which is how timm
registers them in forward order. The folded copy is checked against the original on an example
input and only used when the outputs agree; otherwise the original is kept.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn


class _AfterNorm(nn.Module):
    """What remains of timm's BatchNormAct2d once its normalisation is folded: dropout, then activation."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop, self.act = drop, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale + (norm.bias if norm.bias is not None else 0)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.running_var is not None
            and conv.out_channels == norm.num_features)


@torch.no_grad()
def fold_batch_norms(
    body: nn.Module, forward: Callable[[nn.Module], list[torch.Tensor]], rtol: float = 1e-4
) -> tuple[nn.Module, int]:
    """(folded copy of ``body``, folds) when ``forward(copy)`` matches ``forward(body)``; else (body, 0)."""
    folded = copy.deepcopy(body).eval()
    count = 0
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (_, conv), (norm_name, norm) in zip(children, children[1:]):
            if _foldable(conv, norm):
                _fold_pair(conv, norm)
                setattr(parent, norm_name, _AfterNorm(norm.drop, norm.act) if hasattr(norm, "act") else nn.Identity())
                count += 1
    if count == 0:
        return body, 0
    reference, candidate = forward(body), forward(folded)
    for a, b in zip(reference, candidate):
        if a.shape != b.shape or (a - b).abs().max() > rtol * a.abs().max().clamp_min(1e-6):
            return body, 0
    return folded, count
