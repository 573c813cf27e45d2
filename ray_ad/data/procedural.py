"""Procedural source domains: many small texture "product lines", each with its normals and masked defects.

A generalist (NAGL) learns what a defect looks like *relative to a line's normals* from its source
domains; the paper trains on VisA's 12 classes, and a single source (magnetic_tile) teaches the
residuals of one surface only. No second masked dataset ships with ray_ad, so these domains are drawn:
each is one texture family (Perlin stone, oriented stripes, a grid of cells, Voronoi grains, a dot
lattice) with its own colours, scale and orientation, and every image of a domain is a new realisation
of that one style (what a camera sees of one product, part after part). Defects are the project's
synthetic kinds (``synthetic.subtle_defect``: stains, scratches, smears, cut-paste, foreign blends) with
their exact masks. Nothing here is read from, or tuned on, any evaluation dataset.

``write_domains(root, count)`` writes them as MVTec-layout folders (``train/good``, ``test/<kind>`` and
``ground_truth/<kind>/<name>_mask.png``), so every reader of the project takes them as any dataset.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from ray_ad import storage
from ray_ad.data.synthetic import DEFECT_KINDS, perlin_noise, subtle_defect
from ray_ad.heatmaps import png_bytes

FAMILIES = ("perlin", "stripes", "grid", "worley", "dots")
DONE_MARKER = "_procedural.json"  # written last: a folder without it is an interrupted write, redone


@dataclass(frozen=True)
class DomainStyle:
    """What every image of one procedural domain shares."""

    family: str
    low: tuple[float, float, float]  # the two colours the pattern interpolates between
    high: tuple[float, float, float]
    scale: float  # pattern frequency: lattice cells, stripe periods, grid cells or grains per side
    angle: float  # orientation of stripes and grids (radians)
    grain: float  # amplitude of the fine noise over the pattern, in [0, 1]

    @classmethod
    def draw(cls, index: int, rng: np.random.Generator) -> DomainStyle:
        family = FAMILIES[index % len(FAMILIES)]  # every family appears before any repeats
        low, high = rng.uniform(0, 255, (2, 3))
        if rng.random() < 0.5:  # half the domains are grey, as most line cameras are monochrome
            low, high = np.full(3, low.mean()), np.full(3, high.mean())
        if np.abs(high - low).max() < 60:  # a pattern needs some contrast to be a pattern
            high = np.where(high > low, np.minimum(low + 60, 255), np.maximum(low - 60, 0))
        return cls(family, tuple(map(float, low)), tuple(map(float, high)), float(rng.uniform(3, 12)),
                   float(rng.uniform(0, np.pi)), float(rng.uniform(0.05, 0.3)))


def _normalised(field: np.ndarray) -> np.ndarray:
    return (field - field.min()) / max(float(np.ptp(field)), 1e-6)


def _pattern(style: DomainStyle, size: int, rng: np.random.Generator) -> np.ndarray:
    """The domain's pattern as a field in [0, 1], ``[size, size]``; ``rng`` draws this image's realisation."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) / size
    along = x * np.cos(style.angle) + y * np.sin(style.angle)
    across = -x * np.sin(style.angle) + y * np.cos(style.angle)
    if style.family == "perlin":
        cells = max(2, int(style.scale))
        return _normalised(sum(perlin_noise(size, cells * 2**k, rng) / 2**k for k in range(3)))
    if style.family == "stripes":  # brushed or ridged surfaces: a slightly warped sine across the stripes
        warp = perlin_noise(size, 3, rng) * 0.8
        return 0.5 + 0.5 * np.sin(2 * np.pi * (style.scale * across + warp) + rng.uniform(0, 2 * np.pi))
    if style.family == "grid":  # cells separated by thin lines (tiles, wafers, meshes), at a random offset
        phase = rng.uniform(0, 1, 2)
        distance = np.maximum(np.abs((style.scale * along + phase[0]) % 1 - 0.5),
                              np.abs((style.scale * across + phase[1]) % 1 - 0.5))
        return (distance > 0.44).astype(np.float64)  # 1 on the lines
    if style.family == "worley":  # grains (crystals, stone, sintered parts): random shade per Voronoi cell
        seeds = rng.uniform(0, 1, (int(style.scale**2) + 4, 2))
        shades = rng.uniform(0, 1, len(seeds))
        distances = (y.reshape(-1, 1) - seeds[:, 0]) ** 2 + (x.reshape(-1, 1) - seeds[:, 1]) ** 2
        return shades[distances.argmin(1)].reshape(size, size)
    if style.family == "dots":  # a perforated or printed dot lattice, each dot slightly jittered
        period = 1 / style.scale
        jitter = perlin_noise(size, 4, rng) * 0.15 * period
        u, v = (along + jitter) % period / period - 0.5, (across - jitter) % period / period - 0.5
        return (u**2 + v**2 < 0.09).astype(np.float64)
    raise ValueError(f"unknown texture family {style.family!r}; use one of {', '.join(FAMILIES)}")


def render(style: DomainStyle, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of the domain, uint8 ``[size, size, 3]``: pattern, fine grain, a little lighting drift."""
    field = _pattern(style, size, rng)
    field = (1 - style.grain) * field + style.grain * _normalised(perlin_noise(size, 32, rng))
    low, high = np.array(style.low), np.array(style.high)
    pixels = low + field[..., None] * (high - low)
    return (pixels * rng.uniform(0.9, 1.1)).clip(0, 255).astype(np.uint8)


def _save_png(array: np.ndarray, uri: str) -> None:
    storage.write_bytes(uri, png_bytes(Image.fromarray(array)))


def _settings(style: DomainStyle, normals: int, defects: int, size: int, seed: int, test_normals: int) -> dict:
    """What the done marker records: a domain is rewritten when any of it changes."""
    return {**asdict(style), "normals": normals, "defects": defects, "size": size, "seed": seed,
            "test_normals": test_normals}


def write_domain(root: str, style: DomainStyle, normals: int, defects: int, size: int, seed: int,
                 test_normals: int = 0) -> None:
    """One domain at ``root`` (MVTec layout): ``normals`` images under ``train/good``, ``test_normals``
    under ``test/good`` (a domain to evaluate on needs them) and ``defects`` defective ones under
    ``test/<kind>`` with their masks, the kinds taken in turn. Whatever ``root`` held is removed first, so
    a rewrite with fewer images leaves none of the earlier ones behind."""
    fs, path = storage.filesystem(root)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    rng = np.random.default_rng(seed)
    for i in range(normals):
        _save_png(render(style, size, rng), storage.join(root, "train", "good", f"{i:04d}.png"))
    for i in range(test_normals):
        _save_png(render(style, size, rng), storage.join(root, "test", "good", f"{i:04d}.png"))
    for i in range(defects):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        image, donor = render(style, size, rng), render(style, size, rng)
        defective, mask, _ = subtle_defect(image, donor, rng, kind)
        if not mask.any():
            continue  # a defect that changed no pixel is no defect
        _save_png(defective, storage.join(root, "test", kind, f"{i:04d}.png"))
        _save_png(mask.astype(np.uint8) * 255, storage.join(root, "ground_truth", kind, f"{i:04d}_mask.png"))
    settings = _settings(style, normals, defects, size, seed, test_normals)
    storage.write_text(storage.join(root, DONE_MARKER), json.dumps(settings))


def write_domains(root: str, count: int, normals: int = 80, defects: int = 40, size: int = 256,
                  seed: int = 0, test_normals: int = 0) -> list[str]:
    """``count`` procedural domains under ``root`` (``root/procedural-<i>-<family>``); their URIs.
    A domain already written with the same settings is kept, so a second call costs nothing."""
    if count < 1 or normals < 2 or defects < 2 or size < 32 or test_normals < 0:
        raise ValueError(f"procedural domains: count >= 1, normals >= 2, defects >= 2, size >= 32, "
                         f"test_normals >= 0; got {count}, {normals}, {defects}, {size}, {test_normals}")
    style_rng = np.random.default_rng(seed)
    uris = []
    for index in range(count):
        style = DomainStyle.draw(index, style_rng)
        uri = storage.join(root, f"procedural-{index:02d}-{style.family}")
        settings = _settings(style, normals, defects, size, seed + index, test_normals)
        marker = storage.join(uri, DONE_MARKER)
        if not storage.exists(marker) or json.loads(storage.read_text(marker)) != json.loads(json.dumps(settings)):
            write_domain(uri, style, normals, defects, size, seed + index, test_normals)
        uris.append(uri)
    return uris


__all__ = ["FAMILIES", "DomainStyle", "render", "write_domain", "write_domains"]
