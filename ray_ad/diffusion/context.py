"""Cross-cell context as the score network's job: predict hidden cells from the cells around them (ours).

Per-position whitening scores each cell against its own position's Gaussian, so a cell that is ordinary
texture but inconsistent with the rest of its tile (magnetic_tile's "uneven" regions) looks normal. A
network that sees a grid with some cells hidden and has to predict them can only answer from the other
cells: its residual x_0 - f(context) at a hidden cell is what the context did not explain.

Hidden cells are ``block`` x ``block`` squares on a checkerboard of blocks: pattern g in {0, 1, 2, 3}
hides the blocks whose (row, column) block index parity is (g // 2, g % 2), a quarter of the grid, and
the four patterns together hide every cell once. Training draws one pattern per sample; scoring runs all
four (four calls) and keeps each cell's residual from the call that hid it.

With the DiT's zero-initialised output, f = 0 untrained and the residual is x_0 itself: on whitened
features, the ``gaussian`` detector's Mahalanobis map. So r = -f is what training added, as for the
Gaussian skip (``gaussian_skip.py``).
"""

from __future__ import annotations

import torch
from torch import nn

PATTERNS = 4


def check_block(grid_size: int, block: int) -> None:
    """Two blocks per side at least, so that every pattern leaves context visible."""
    if not 1 <= block <= grid_size // 2:
        raise ValueError(f"train.context_block must be in [1, {grid_size // 2}] for a {grid_size}x{grid_size} "
                         f"grid (two blocks per side at least), got {block}")


def context_masks(grid_size: int, block: int) -> torch.Tensor:
    """The four hiding patterns ``[4, 1, G, G]`` (1 = hidden); every cell is hidden by exactly one."""
    check_block(grid_size, block)
    index = torch.arange(grid_size) // block % 2
    rows, cols = index[:, None], index[None, :]
    return torch.stack([((rows == g // 2) & (cols == g % 2)).float() for g in range(PATTERNS)])[:, None]


class ContextNet(nn.Module):
    """f(x_0 with hidden cells, mask): a score network (the DiT) reading a grid whose hidden cells hold a
    learned mask token in feature space (as BERT/MAE mark hidden positions), called at t = 0."""

    def __init__(self, net: nn.Module, channels: int) -> None:
        super().__init__()
        self.net = net
        self.mask_token = nn.Parameter(torch.zeros(channels))

    def forward(self, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        token = self.mask_token.view(1, -1, 1, 1)
        visible = x0 * (1 - mask) + token * mask
        return self.net(visible, torch.zeros(x0.shape[0], dtype=torch.long, device=x0.device))


def masked_context_loss(net: nn.Module, x0: torch.Tensor, block: int) -> torch.Tensor:
    """Mean squared error of the prediction over the hidden cells, one random pattern per sample."""
    masks = context_masks(x0.shape[-1], block).to(x0.device)
    mask = masks[torch.randint(0, PATTERNS, (x0.shape[0],), device=x0.device)]
    error = (net(x0, mask) - x0).pow(2) * mask
    return error.sum() / (mask.sum() * x0.shape[1])


@torch.no_grad()
def context_residual(net: nn.Module, x0: torch.Tensor, block: int) -> torch.Tensor:
    """x_0 - f(context) at every cell ``[B, C, G, G]``, each cell from the call that hid it (4 calls)."""
    residual = torch.zeros_like(x0)
    for mask in context_masks(x0.shape[-1], block).to(x0.device):
        mask = mask.expand(x0.shape[0], 1, *x0.shape[-2:])
        residual += mask * (x0 - net(x0, mask))
    return residual
