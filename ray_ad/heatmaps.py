"""Overlay PNGs: the image, the anomaly map over it, and the ground-truth mask when there is one."""

from __future__ import annotations

import io
import os

import numpy as np
from matplotlib import colormaps
from PIL import Image

from ray_ad import storage
from ray_ad.data.images import load_image
from ray_ad.evaluation import Results


def overlay(image: Image.Image, anomaly_map: np.ndarray, vmax: float, alpha: float = 0.5) -> Image.Image:
    size = anomaly_map.shape[::-1]
    base = np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32) / 255.0
    heat = colormaps["jet"](np.clip(anomaly_map / max(vmax, 1e-12), 0, 1))[..., :3]
    blended = ((1 - alpha) * base + alpha * heat).clip(0, 1)
    return Image.fromarray((blended * 255).astype(np.uint8))


def overlay_png(image: Image.Image, anomaly_map: np.ndarray, vmax: float, mask: np.ndarray | None = None) -> bytes:
    """PNG bytes of [image | overlay | mask] (the mask panel only when a mask is given)."""
    size = anomaly_map.shape[::-1]
    panels = [image.resize(size, Image.BILINEAR), overlay(image, anomaly_map, vmax)]
    if mask is not None:
        panels.append(Image.fromarray(mask.astype(np.uint8) * 255).convert("RGB"))
    canvas = Image.new("RGB", (size[0] * len(panels), size[1]))
    for i, panel in enumerate(panels):
        canvas.paste(panel, (i * size[0], 0))
    sink = io.BytesIO()
    canvas.save(sink, format="PNG")
    return sink.getvalue()


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
