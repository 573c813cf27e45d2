"""Feature-level toy data that a Gaussian cannot describe: the check that a score network carries signal.

Every cell of a ``[C, G, G]`` feature grid sits at one of two modes along a fixed direction u, +2u
(three cells in four) or -2u, plus small isotropic noise. Anomalous cells sit half way, at 0. Whitened
per position, that point is nearer the Gaussian's mean than the -2u mode is (z = -0.58 against -1.73
along u), so a per-position Gaussian (PaDiM, the ``gaussian`` detector, OSD-IRF with r = 0) ranks
such cells as normal; a denoiser that learnt the two modes pulls them towards the heavier one.
Used by ``tests/unit/test_network_carries_signal.py`` and ``benchmarks/osd_irf_network.py``.
"""

from __future__ import annotations

import torch


def two_mode_cells(count: int, channels: int, grid: int, generator: torch.Generator,
                   anomalous_cells: int = 0) -> torch.Tensor:
    """Features ``[count, channels, grid, grid]``; ``anomalous_cells`` random cells of each image at 0."""
    u = torch.randn(channels, generator=torch.Generator().manual_seed(7))
    u = u / u.norm()
    s = torch.where(torch.rand(count, grid * grid, generator=generator) < 0.75, 1.0, -1.0)
    for row in s if anomalous_cells else ():
        row[torch.randperm(grid * grid, generator=generator)[:anomalous_cells]] = 0.0
    cells = 2.0 * s.view(count, 1, grid, grid) * u.view(1, -1, 1, 1)
    return cells + 0.15 * torch.randn(count, channels, grid, grid, generator=generator)


def toy_split(channels: int, grid: int, anomalous_cells: int = 4, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(512 training normals, 64 calibration normals, 64 + 64 test images, test labels)."""
    generator = torch.Generator().manual_seed(seed)
    train = two_mode_cells(512, channels, grid, generator)
    calibration = two_mode_cells(64, channels, grid, generator)
    test = torch.cat([two_mode_cells(64, channels, grid, generator),
                      two_mode_cells(64, channels, grid, generator, anomalous_cells)])
    return train, calibration, test, torch.cat([torch.zeros(64), torch.ones(64)])


def consistent_tiles(count: int, channels: int, grid: int, generator: torch.Generator,
                     odd_cells: int = 0, shared: float = 0.7) -> torch.Tensor:
    """Features ``[count, channels, grid, grid]``: every cell is sqrt(shared) v + sqrt(1 - shared) n, with v
    ~ N(0, I) the image's own vector and n ~ N(0, I) the cell's; ``odd_cells`` random cells of each image
    take another image's v. Every cell is N(0, I) either way, so a per-position Gaussian cannot tell the
    odd ones; a detector that compares a cell with the rest of its grid can (the cross-cell context of
    ``diffusion/context.py``). The cells' own n keep their norms apart, so an odd cell does not stand out
    by breaking an otherwise constant norm either (Eq. 10's max - min would see that).
    """
    tiles = torch.randn(count, channels, 1, 1, generator=generator).expand(-1, -1, grid, grid).clone()
    for tile in tiles if odd_cells else ():
        for cell in torch.randperm(grid * grid, generator=generator)[:odd_cells].tolist():
            tile[:, cell // grid, cell % grid] = torch.randn(channels, generator=generator)
    own = torch.randn(count, channels, grid, grid, generator=generator)
    return shared**0.5 * tiles + (1 - shared) ** 0.5 * own


def consistent_tile_split(channels: int, grid: int, odd_cells: int = 1, seed: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(512 training normals, 64 calibration normals, 64 + 64 test images, test labels)."""
    generator = torch.Generator().manual_seed(seed)
    train = consistent_tiles(512, channels, grid, generator)
    calibration = consistent_tiles(64, channels, grid, generator)
    test = torch.cat([consistent_tiles(64, channels, grid, generator),
                      consistent_tiles(64, channels, grid, generator, odd_cells)])
    return train, calibration, test, torch.cat([torch.zeros(64), torch.ones(64)])
