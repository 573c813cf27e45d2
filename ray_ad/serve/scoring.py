"""Scoring images with a detector, as the scorer replicas do it, without Ray or Serve.

``score_images`` is the whole of what a ``LineScorer`` replica does to a batch once it holds the
model (``ray_ad.serve.scorer`` only adds the model version); ``probe_detector`` is the check a model
passes before any request is routed to it, and on every replica health check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ray_ad.heatmaps import heatmap_png_base64


def score_images(detector: Any, images: Sequence[np.ndarray | Image.Image],
                 heatmaps: Sequence[bool] | bool = False) -> list[dict[str, Any]]:
    """One row per image: ``score``, ``is_anomaly`` (``detector.decide``), ``threshold``, and with its
    ``heatmaps`` flag ``heatmap_png`` (base64 PNG, the image with the anomaly map over it, at the map's
    size).

    ``images`` are uint8 arrays (``[H, W]`` grey or ``[H, W, 3]`` RGB) or PIL images, of any size: the
    detector's preprocessor resizes them (the ingress already sends them at the model's input size, so
    there the resize is a no-op and what crosses between replicas stays small).
    """
    pil = [image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)) for image in images]
    want = [heatmaps] * len(pil) if isinstance(heatmaps, bool) else list(heatmaps)
    if len(want) != len(pil):
        raise ValueError(f"{len(pil)} images but {len(want)} heatmap flags")
    if not pil:
        return []
    with torch.no_grad():
        prediction = detector.predict(detector.preprocessor.batch(pil))
    scores = prediction.pred_score.detach().cpu()
    flagged = detector.decide(scores)
    rows = []
    for i, heatmap in enumerate(want):
        row: dict[str, Any] = {"score": float(scores[i]), "is_anomaly": bool(flagged[i]),
                               "threshold": float(detector.threshold)}
        if heatmap:
            row["heatmap_png"] = heatmap_png_base64(pil[i], prediction.anomaly_map[i].detach().cpu().numpy())
        rows.append(row)
    return rows


def probe_detector(detector: Any, model_id: str) -> None:
    """Score one grey image; raise when the model errors or returns a non-finite score."""
    try:
        image = torch.full((1, 3, detector.image_size, detector.image_size), 0.5)
        with torch.no_grad():
            score = detector.predict(image).pred_score
        detector.decide(score)  # the decision path too: a threshold that is no number fails here, not per request
    except Exception as exc:  # noqa: BLE001 - any failure makes the model unservable
        raise RuntimeError(f"model {model_id} cannot score: {type(exc).__name__}: {exc}") from exc
    if not torch.isfinite(score).all():
        raise RuntimeError(f"model {model_id} gives a non-finite score")
