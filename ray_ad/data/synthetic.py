"""Synthetic anomalies for training on normal images only: Perlin-noise masks filled with a
self-shuffled source, blended at a random opacity (the DRAEM / CostFilter-AD recipe).

DRAEM and CostFilter-AD fill the mask with a DTD texture; no texture set ships with ray_ad, so the fill
is another normal image cut into blocks and shuffled (their "self-shuffled source" variant).
"""

from __future__ import annotations

import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    return 6 * t**5 - 15 * t**4 + 10 * t**3


def perlin_noise(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise on a ``size x size`` image with ``cells`` lattice cells per side."""
    angles = rng.uniform(0, 2 * np.pi, (cells + 1, cells + 1))
    gradients = np.stack([np.cos(angles), np.sin(angles)], -1)
    coords = np.linspace(0, cells, size, endpoint=False)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = y - y0, x - x0

    def corner(dy: int, dx: int) -> np.ndarray:
        g = gradients[y0 + dy, x0 + dx]
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    wy, wx = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - wx) + corner(0, 1) * wx
    bottom = corner(1, 0) * (1 - wx) + corner(1, 1) * wx
    return top * (1 - wy) + bottom * wy


def perlin_mask(size: int, rng: np.random.Generator, threshold: float = 0.5, min_fraction: float = 0.005) -> np.ndarray:
    """A binary blob mask: Perlin noise at a random lattice scale, thresholded; never empty."""
    for _ in range(20):
        cells = int(2 ** rng.integers(1, 5))  # 2 .. 16 lattice cells: large to small blobs
        noise = perlin_noise(size, cells, rng)
        mask = noise > threshold * np.abs(noise).max()
        if mask.mean() >= min_fraction:
            return mask
    # Pathological draws: fall back to a square so a synthetic anomaly always has a defect.
    mask = np.zeros((size, size), dtype=bool)
    quarter = size // 4
    mask[quarter : 2 * quarter, quarter : 2 * quarter] = True
    return mask


def self_shuffled(image: np.ndarray, rng: np.random.Generator, blocks: int = 8) -> np.ndarray:
    """``image`` [H, W, C] cut into ``blocks x blocks`` tiles that are randomly permuted."""
    size = image.shape[0] // blocks * blocks
    tiles = image[:size, :size].reshape(blocks, size // blocks, blocks, size // blocks, -1).swapaxes(1, 2)
    tiles = tiles.reshape(blocks * blocks, size // blocks, size // blocks, -1)[rng.permutation(blocks * blocks)]
    shuffled = tiles.reshape(blocks, blocks, size // blocks, size // blocks, -1).swapaxes(1, 2).reshape(size, size, -1)
    out = image.copy()
    out[:size, :size] = shuffled
    return out


def synthesize_anomaly(
    image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, opacity: tuple[float, float] = (0.3, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """(anomalous image uint8 [S, S, 3], mask bool [S, S]) from a normal ``image`` and a ``donor`` image.

    Both inputs are square uint8 arrays of the same size.
    """
    if image.shape != donor.shape or image.shape[0] != image.shape[1]:
        raise ValueError(f"image {image.shape} and donor {donor.shape} must be square arrays of one size")
    mask = perlin_mask(image.shape[0], rng)
    fill = self_shuffled(donor, rng)
    beta = rng.uniform(*opacity)
    blend = image.astype(np.float32)
    m = mask[..., None]
    blend = np.where(m, (1 - beta) * blend + beta * fill.astype(np.float32), blend)
    return blend.clip(0, 255).astype(np.uint8), mask
