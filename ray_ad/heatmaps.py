"""Overlay PNGs of an anomaly map over its image, one blending and PNG-encoding path for every caller.

- ``heat_overlay`` (the service's ``?heatmap=true``): the map, min-max scaled per image, as red whose
  opacity follows the map; ``heatmap_png_base64`` is what a detect response carries.
- ``overlay`` / ``overlay_png`` / ``write_heatmaps`` (``ray-ad evaluate --heatmaps``): the map against a
  fixed ``vmax`` in the "jet" colours, in panels [image | overlay | ground-truth mask].
"""

from __future__ import annotations

import base64
import io
import os
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ray_ad import storage
from ray_ad.data.images import load_image

if TYPE_CHECKING:
    from ray_ad.evaluation import Results

RED = np.array([1.0, 0.0, 0.0], dtype=np.float32)


def blend(image: Image.Image, colour: np.ndarray, weight: np.ndarray | float) -> Image.Image:
    """``(1 - weight) * image + weight * colour``, in [0, 1], at ``H x W``: ``colour`` is ``[H, W, 3]``
    with a number as ``weight``, or one colour ``[3]`` with ``weight`` ``[H, W, 1]``. The image is made
    RGB and resized (bilinear) to ``H x W``."""
    shape = colour.shape[:2] if colour.ndim == 3 else np.shape(weight)[:2]
    base = np.asarray(image.convert("RGB").resize(shape[::-1], Image.BILINEAR), dtype=np.float32) / 255.0
    blended = ((1 - weight) * base + weight * colour).clip(0, 1)
    return Image.fromarray((blended * 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    sink = io.BytesIO()
    image.save(sink, format="PNG")
    return sink.getvalue()


def heat_overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The image (grey or RGB) at the map's size with the map, min-max scaled, as a red overlay: opacity
    ``alpha`` where the map peaks, none where it is lowest."""
    heat = (anomaly_map - anomaly_map.min()) / max(float(np.ptp(anomaly_map)), 1e-12)
    return blend(image, RED, alpha * heat.astype(np.float32)[..., None])


def heatmap_png_base64(image: Image.Image, anomaly_map: np.ndarray) -> str:
    """Base64 PNG of ``heat_overlay``: the ``heatmap_png`` field of a detect response."""
    return base64.b64encode(png_bytes(heat_overlay(image, anomaly_map))).decode()


def overlay(image: Image.Image, anomaly_map: np.ndarray, vmax: float, alpha: float = 0.5) -> Image.Image:
    """The map over the image in "jet" colours at opacity ``alpha``, scaled to [0, ``vmax``]."""
    from matplotlib import colormaps  # only the evaluation overlays need matplotlib

    heat = colormaps["jet"](np.clip(anomaly_map / max(vmax, 1e-12), 0, 1))[..., :3]
    return blend(image, heat.astype(np.float32), alpha)


def overlay_png(image: Image.Image, anomaly_map: np.ndarray, vmax: float, mask: np.ndarray | None = None) -> bytes:
    """PNG bytes of [image | overlay | mask] (the mask panel only when a mask is given)."""
    size = anomaly_map.shape[::-1]
    panels = [image.resize(size, Image.BILINEAR), overlay(image, anomaly_map, vmax)]
    if mask is not None:
        panels.append(Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"))
    canvas = Image.new("RGB", (size[0] * len(panels), size[1]))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * size[0], 0))
    return png_bytes(canvas)


def write_heatmaps(results: Results, out_dir: str, vmax: float | None = None) -> int:
    """One PNG per scored image under ``out_dir``, named after the image; returns the count."""
    vmax = float(np.quantile(results.maps, 0.999)) if vmax is None else vmax
    for i, path in enumerate(results.paths):
        stem = os.path.splitext(path.rstrip("/").split("/")[-1])[0]
        parent = path.rstrip("/").split("/")[-2] if "/" in path else "images"
        mask = results.masks[i] if results.has_mask[i] else None
        png = overlay_png(load_image(path), results.maps[i], vmax, mask)
        storage.write_bytes(storage.join(out_dir, f"{parent}_{stem}.png"), png)
    return len(results.paths)
