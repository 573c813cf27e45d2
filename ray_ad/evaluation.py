"""Run a detector over labelled samples and compute every metric."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from ray_ad import metrics
from ray_ad.data import ImageDataset, Sample
from ray_ad.methods.base import Detector
from ray_ad.progress import progress as show_progress


@dataclass
class Results:
    scores: np.ndarray  # [N]
    maps: np.ndarray  # [N, S, S] float32
    labels: np.ndarray  # [N]
    masks: np.ndarray  # [N, S, S] bool
    has_mask: np.ndarray  # [N]
    paths: list[str]
    seconds_per_image: float  # wall time of decode + backbone + scoring, per image
    model_seconds_per_image: float  # backbone + scoring only


def run_detector(
    detector: Detector, samples: list[Sample], batch_size: int = 16, progress: bool = True
) -> Results:
    dataset = ImageDataset(samples, detector.preprocessor)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    scores, maps, labels, masks, has_mask, paths = [], [], [], [], [], []
    model_seconds = 0.0
    start = time.perf_counter()
    for batch in show_progress(loader, desc=f"score ({detector.method})", enabled=progress, unit="batch",
                               leave=False):
        tick = time.perf_counter()
        prediction = detector.predict(batch["image"])
        if detector.device.type == "cuda":
            torch.cuda.synchronize()
        model_seconds += time.perf_counter() - tick
        scores.append(prediction.pred_score.numpy())
        maps.append(prediction.anomaly_map.numpy().astype(np.float32))
        labels.append(batch["label"].numpy())
        masks.append(batch["mask"][:, 0].numpy().astype(bool))
        has_mask.append(batch["has_mask"].numpy())
        paths.extend(batch["path"])
    total = time.perf_counter() - start
    return Results(
        np.concatenate(scores), np.concatenate(maps), np.concatenate(labels), np.concatenate(masks),
        np.concatenate(has_mask), paths, total / len(samples), model_seconds / len(samples),
    )


def compute_metrics(results: Results) -> dict[str, float | None]:
    """Image metrics over labelled images; pixel metrics when the anomalous images have masks.

    Images with label -1 (unlabelled) are left out. Pixel metrics use normal images (all-zero masks)
    and anomalous images that have masks; they are None when no anomalous image has a mask.
    """
    labelled = results.labels >= 0
    out: dict[str, float | None] = metrics.image_metrics(results.scores[labelled], results.labels[labelled])
    pixel_rows = labelled & ((results.labels == 0) | results.has_mask)
    if (results.has_mask & labelled).any():
        out.update(metrics.pixel_metrics(results.maps[pixel_rows], results.masks[pixel_rows]))
    else:
        out.update(dict.fromkeys(("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")))
    out["seconds_per_image"] = results.seconds_per_image
    out["model_seconds_per_image"] = results.model_seconds_per_image
    return out
