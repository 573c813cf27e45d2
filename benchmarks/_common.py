"""Helpers shared by the benchmark commands: data splits, timing and result files."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_ad.data import ImageDataset, load_samples, training_split
from ray_ad.methods.base import Detector
from ray_ad.metrics import auroc

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"


def require_dataset(data: str) -> None:
    """Stop with a clear error when a local dataset folder (``--data``) is missing."""
    if not Path(data).exists():
        raise SystemExit(f"error: dataset not found at {data} (pass --data)")


def splits(data: str, calibration_fraction: float = 0.1):
    """(train normals, held-out calibration normals, test) exactly as ``ray-ad train`` makes them."""
    train, calibration = training_split(data, calibration_fraction)
    return train, calibration, load_samples(data, "test")


def auroc_against(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AUROC of one set of scores (anomalous) against another (normal)."""
    return auroc(np.r_[positives, negatives], np.r_[np.ones(len(positives)), np.zeros(len(negatives))])


@torch.no_grad()
def backbone_seconds_per_image(detector: Detector, samples, batch_size: int = 16, limit: int = 128) -> float:
    """Time of the frozen backbone alone on decoded images (the floor any method pays)."""
    dataset = ImageDataset(samples[:limit], detector.preprocessor)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    start = time.perf_counter()
    for chunk in images.split(batch_size):
        detector.extractor(chunk.to(detector.device))
    if detector.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / len(images)


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "torch": torch.__version__,
    }


def save(name: str, payload: dict[str, Any], table: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (RESULTS / f"{name}.md").write_text(table + "\n")
    print(f"saved {RESULTS / name}.json and .md")


def contaminated_landing(samples: list) -> tuple[list, list]:
    """magnetic_tile as a contaminated landing: (landed, scored). Landed are the train normals and a
    hashed half of the test images (defects included); scored is the other half of the test images."""
    def unit(path: str) -> float:
        return int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 2**32

    landed = [s for s in samples if s.split == "train" or unit(s.path) < 0.5]
    scored = [s for s in samples if s.split == "test" and unit(s.path) >= 0.5]
    return landed, scored
