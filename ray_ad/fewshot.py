"""Few-shot evaluation of a reference-based model (NAGL): draw references, score the rest, repeat.

``--shots K+A`` draws K normal references from the dataset's ``train`` split and A abnormal references
from its ``test`` split (with their pixel masks; a dataset without masks, such as elpv, gets the whole
image as the defect region), removes those from the scored images, scores, and repeats for every draw.
The figures are the mean and spread over the draws.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ray_ad import storage
from ray_ad.data import Sample, load_samples
from ray_ad.data.images import decode_image, load_image
from ray_ad.errors import ConfigError, DataError
from ray_ad.evaluation import compute_metrics, run_detector
from ray_ad.methods.base import Detector
from ray_ad.methods.nagl.references import ReferenceSet, build_references

_SHOTS = re.compile(r"(\d+)\+(\d+)")


@dataclass(frozen=True)
class Shots:
    normal: int  # K
    abnormal: int  # A

    def __str__(self) -> str:
        return f"{self.normal}+{self.abnormal}"


def parse_shots(text: str) -> Shots:
    """``"4+1"`` -> Shots(4, 1); K >= 1 normal references are needed."""
    match = _SHOTS.fullmatch(text.strip())
    if not match or int(match.group(1)) < 1:
        raise ConfigError(f"--shots {text!r}: write K+A with K >= 1 normal and A >= 0 abnormal references, e.g. 4+1")
    return Shots(int(match.group(1)), int(match.group(2)))


def draw_references(data: str, shots: Shots, rng: np.random.Generator, size: int) -> tuple[ReferenceSet, set[str]]:
    """A reference set drawn from ``data`` and the paths of the images it used."""
    normals = [s for s in load_samples(data, "train") if s.label == 0]
    anomalies = [s for s in load_samples(data, "test") if s.label == 1]
    if len(normals) < shots.normal or len(anomalies) < shots.abnormal:
        raise DataError(f"{data}: cannot draw {shots} references from {len(normals)} training normals and "
                        f"{len(anomalies)} test anomalies")
    chosen = [normals[i] for i in rng.choice(len(normals), shots.normal, replace=False)]
    chosen += [anomalies[i] for i in rng.choice(len(anomalies), shots.abnormal, replace=False)]
    return references_from_samples(chosen, size), {s.path for s in chosen}


def references_from_samples(samples: list[Sample], size: int) -> ReferenceSet:
    """The reference set of labelled ``samples``: the normal ones as normal references, the anomalous
    ones (with their masks) as abnormal references."""
    normal = [s for s in samples if s.label == 0]
    abnormal = [s for s in samples if s.label == 1]
    return build_references([(s.path, load_image(s.path)) for s in normal], [_with_mask(s) for s in abnormal], size)


def _with_mask(sample: Sample) -> tuple[str, Image.Image, Image.Image]:
    image = load_image(sample.path)
    if sample.mask_path is None:  # no pixel mask in this dataset: the whole image is the defect region
        return sample.path, image, Image.new("L", image.size, 255)
    return sample.path, image, decode_image(storage.read_bytes(sample.mask_path), sample.mask_path, keep_gray=True)


def evaluate_draws(detector: Detector, data: str, shots: Shots, draws: int = 5, seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Metrics of ``detector`` on ``data``'s test split for ``draws`` reference draws: per draw, mean, std."""
    if not getattr(detector, "uses_references", False):
        raise ConfigError(f"--shots applies to reference-based models (nagl), not {detector.method}")
    if draws < 1:
        raise ConfigError(f"--draws must be >= 1, got {draws}")
    test = load_samples(data, "test")
    per_draw = []
    for draw in range(draws):
        references, used = draw_references(data, shots, np.random.default_rng(seed + draw), detector.image_size)
        detector.set_references(references)
        scored = [s for s in test if s.path not in used and s.label in (0, 1)]
        per_draw.append(compute_metrics(run_detector(detector, scored, progress=progress)))
    return {"shots": str(shots), "draws": per_draw, **summarise(per_draw)}


def summarise(per_draw: list[dict[str, Any]]) -> dict[str, Any]:
    """``<metric>`` (mean) and ``<metric>_std`` over draws, for every metric that every draw has."""
    out: dict[str, Any] = {}
    for key in per_draw[0]:
        values = [row[key] for row in per_draw]
        if all(isinstance(v, (int, float)) for v in values):
            out[key] = float(np.mean(values))
            out[f"{key}_std"] = float(np.std(values))
    return out


__all__ = [
    "Shots", "draw_references", "evaluate_draws", "parse_shots", "references_from_samples", "summarise",
]
