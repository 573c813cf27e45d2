"""Synthetic anomalies for training on normal images only: Perlin-noise masks filled with a
self-shuffled source, blended at a random opacity (the DRAEM / CostFilter-AD recipe).

DRAEM and CostFilter-AD fill the mask with a DTD texture; no texture set ships with ray_ad, so the fill
is another normal image cut into blocks and shuffled (their "self-shuffled source" variant).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ray_ad.data.images import load_image


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


def procedural_texture(size: int, rng: np.random.Generator, octaves: int = 4) -> np.ndarray:
    """A colour texture uint8 ``[size, size, 3]`` from summed Perlin octaves: a fill that comes from no
    image of the line (the role DTD's textures play in DRAEM and CostFilter-AD; none ship with ray_ad)."""
    noise = sum(perlin_noise(size, 2 ** (k + 1), rng) / 2**k for k in range(octaves))
    noise = (noise - noise.min()) / max(float(np.ptp(noise)), 1e-6)
    low, high = rng.uniform(0, 255, (2, 3))  # two random colours, the noise interpolating between them
    return (low + noise[..., None] * (high - low)).clip(0, 255).astype(np.uint8)


FILL_SOURCES = ("texture", "shuffle")  # the paper's sources, every method's default
# Every source ``pasted_anomaly`` knows: "subtle" is one of ``subtle_defect``'s small, low-contrast
# kinds (stain, scratch, smear, misplaced or foreign texture), nearer to real defects than a blob.
ANOMALY_SOURCES = (*FILL_SOURCES, "subtle")


def pasted_anomaly(
    image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, opacity: tuple[float, float] = (0.2, 1.0),
    sources: Sequence[str] = FILL_SOURCES,
) -> tuple[np.ndarray, np.ndarray, str]:
    """(anomalous image uint8 [S, S, 3], mask bool [S, S], fill source) for filter training (CostFilter-AD
    Sec. 3, after GLAD/DRAEM): a Perlin mask filled with a procedural texture or with ``donor`` cut
    into shuffled blocks, blended at an opacity drawn from ``opacity``. The authors' blend weight of
    the original, U[0, 0.8), is an opacity of the fill in (0.2, 1]. Source ``subtle`` (ours, not among
    the defaults) draws one of ``subtle_defect``'s kinds instead, at its own contrast. The mask holds
    exactly the pixels that changed (a fill that happens to equal the image there is no defect)."""
    if image.shape != donor.shape or image.shape[0] != image.shape[1]:
        raise ValueError(f"image {image.shape} and donor {donor.shape} must be square arrays of one size")
    unknown = sorted(set(sources) - set(ANOMALY_SOURCES))
    if not sources or unknown:
        raise ValueError(f"fill sources must be among {', '.join(ANOMALY_SOURCES)}; got {list(sources)}")
    source = str(rng.choice(list(sources)))
    if source == "subtle":
        out, mask, _ = subtle_defect(image, donor, rng)
        return out, mask, source
    size = image.shape[0]
    mask = perlin_mask(size, rng)
    fill = procedural_texture(size, rng) if source == "texture" else self_shuffled(donor, rng)
    beta = rng.uniform(*opacity)
    pixels = image.astype(np.float32)
    out = np.where(mask[..., None], (1 - beta) * pixels + beta * fill.astype(np.float32), pixels)
    out = out.clip(0, 255).astype(np.uint8)
    return out, mask & (out != image).any(-1), source


def anomaly_pair(
    uris: Sequence[str], index: int, donor: int, size: int | None, rng: np.random.Generator,
    resample: Image.Resampling | None = Image.Resampling.BILINEAR,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ``index`` of ``uris`` with a synthetic anomaly filled from image ``donor``:
    (original uint8 [S, S, 3], anomalous uint8 [S, S, 3], mask bool [S, S]).

    Both images are resized to ``size`` x ``size`` (None: the shorter side of image ``index``) with
    ``resample`` (None: PIL's default filter); ``rng`` draws the mask, the shuffle and the opacity.
    """
    image = load_image(uris[index])
    side = min(image.size) if size is None else size
    original = np.asarray(image.resize((side, side), resample))
    fill = np.asarray(load_image(uris[donor]).resize((side, side), resample))
    anomalous, mask = synthesize_anomaly(original, fill, rng)
    return original, anomalous, mask


# Subtle, varied defects for ranking detectors without labels (the promotion gate). A proxy that is
# too easy ranks nothing: every detector tells a full-opacity shuffled blob from a clean image. So the
# defects here are small (a blob of at most a few percent of the image), low in contrast, and of
# several kinds that resemble what lines see: stains, cracks/scratches, smears, misplaced texture.
DEFECT_KINDS = ("blend", "intensity", "scratch", "smear", "cutpaste")


def small_blob(size: int, rng: np.random.Generator, max_fraction: float = 0.04) -> np.ndarray:
    """A Perlin blob inside a random square window of at most ``max_fraction`` of the image area."""
    side = max(8, int(size * np.sqrt(max_fraction) * rng.uniform(0.6, 1.0)))
    window = perlin_mask(side, rng)
    mask = np.zeros((size, size), dtype=bool)
    top, left = rng.integers(0, size - side + 1, 2)
    mask[top : top + side, left : left + side] = window
    return mask


def scratch_mask(size: int, rng: np.random.Generator) -> np.ndarray:
    """A thin straight line (1-3 px wide, 10-40% of the image long) at a random angle."""
    length = size * rng.uniform(0.1, 0.4)
    width = rng.uniform(0.5, 1.5)
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(length / 2, size - length / 2, 2)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    along = (x - cx) * np.cos(angle) + (y - cy) * np.sin(angle)
    across = -(x - cx) * np.sin(angle) + (y - cy) * np.cos(angle)
    return (np.abs(along) <= length / 2) & (np.abs(across) <= width)


def _box_blur(image: np.ndarray, radius: int) -> np.ndarray:
    padded = np.pad(image.astype(np.float32), ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    kernel = 2 * radius + 1
    summed = padded.cumsum(0).cumsum(1)
    summed = np.pad(summed, ((1, 0), (1, 0), (0, 0)))
    box = summed[kernel:, kernel:] - summed[:-kernel, kernel:] - summed[kernel:, :-kernel] + summed[:-kernel, :-kernel]
    return box / kernel**2


def subtle_defect(
    image: np.ndarray, donor: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray, str]:
    """(defective image uint8 [S, S, C], mask bool [S, S], kind) from a clean square ``image``.

    ``donor`` (another image of the same size) supplies foreign texture for ``blend``.
    """
    if image.shape != donor.shape or image.shape[0] != image.shape[1]:
        raise ValueError(f"image {image.shape} and donor {donor.shape} must be square arrays of one size")
    kind = kind or str(rng.choice(DEFECT_KINDS))
    size = image.shape[0]
    pixels = image.astype(np.float32)
    spread = float(pixels.std()) or 16.0  # contrast relative to the image's own
    if kind == "blend":
        mask = small_blob(size, rng)
        fill = self_shuffled(donor, rng).astype(np.float32)
        beta = rng.uniform(0.2, 0.6)
        out = np.where(mask[..., None], (1 - beta) * pixels + beta * fill, pixels)
    elif kind == "intensity":
        mask = small_blob(size, rng)
        soft = _box_blur(mask[..., None].astype(np.float32), 2)  # soft edges, as stains have
        out = pixels + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.5) * spread * soft
        mask = soft[..., 0] > 0
    elif kind == "scratch":
        mask = scratch_mask(size, rng)
        out = np.where(mask[..., None], pixels + rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 2.0) * spread, pixels)
    elif kind == "smear":
        mask = small_blob(size, rng)
        out = np.where(mask[..., None], _box_blur(pixels, int(rng.integers(2, 5))), pixels)
    elif kind == "cutpaste":
        side = max(4, int(size * rng.uniform(0.06, 0.15)))
        (sy, sx), (ty, tx) = rng.integers(0, size - side + 1, (2, 2))
        mask = np.zeros((size, size), dtype=bool)
        mask[ty : ty + side, tx : tx + side] = True
        out = pixels.copy()
        out[ty : ty + side, tx : tx + side] = pixels[sy : sy + side, sx : sx + side]
    else:
        raise ValueError(f"unknown defect kind {kind!r}; use one of {', '.join(DEFECT_KINDS)}")
    out = out.clip(0, 255).astype(np.uint8)
    # What really changed (a cut-paste of similar texture, or a clipped stain, may change less).
    return out, mask & (np.abs(out.astype(np.int16) - image.astype(np.int16)).max(-1) > 0), kind
