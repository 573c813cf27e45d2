"""Ray Data over images in object storage: backbone features and batch scoring with actor pools.

Each actor loads its model once (a backbone, or a line's bundle) and takes batches of image URIs; on a
GPU node it uses the GPU. Features land in the same cache files the trainers read, so training reuses
them when the backbone config and the image list match; scores are written as Parquet with one row
per image (``path``, ``score``, ``decision``, ``model_version``, ``error``).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.data import ActorPoolStrategy

from ray_ad import registry, storage
from ray_ad.backbones import BackboneConfig, FeatureExtractor
from ray_ad.config import from_dict, to_dict
from ray_ad.data import Sample, is_folder_uri, load_samples
from ray_ad.data.images import load_image
from ray_ad.devices import pick_device
from ray_ad.errors import DataError, RayADError
from ray_ad.features import dihedral
from ray_ad.metrics import image_metrics

SCORE_SCHEMA = pa.schema([
    ("path", pa.string()), ("score", pa.float64()), ("decision", pa.bool_()), ("model_version", pa.string()),
    ("error", pa.string()),
])


class FeatureActor:
    """One backbone per actor; a batch of image URIs in, features of every dihedral variant out."""

    def __init__(self, backbone: dict[str, Any], augment: int) -> None:
        self.device = pick_device()
        self.extractor = FeatureExtractor(from_dict(BackboneConfig, backbone)).to(self.device)
        self.augment = augment

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = self.extractor.preprocessor.batch(
            [load_image(str(path), keep_gray=True) for path in batch["path"]]).to(self.device)
        with torch.no_grad():
            variants = [self.extractor(dihedral(images, k)).float().cpu() for k in range(self.augment)]
        return {"index": batch["index"], "features": torch.stack(variants, dim=1).numpy()}


class RayFeatureBackend:
    """A ``FeatureBackend`` running the backbone in a Ray Data actor pool of ``actors`` actors."""

    def __init__(self, actors: int = 1, use_gpu: bool = False, batch_size: int = 16) -> None:
        if actors < 1:
            raise RayADError(f"actors must be >= 1, got {actors}")
        self.actors, self.use_gpu, self.batch_size = actors, use_gpu, batch_size

    def __call__(self, backbone: BackboneConfig, samples: list[Sample], augment: int, progress: bool) -> torch.Tensor:
        items = [{"index": i, "path": s.path} for i, s in enumerate(samples)]
        dataset = ray.data.from_items(items).map_batches(
            FeatureActor,
            fn_constructor_kwargs={"backbone": to_dict(backbone), "augment": augment},
            compute=ActorPoolStrategy(size=self.actors),
            batch_size=self.batch_size,
            num_gpus=1 if self.use_gpu else None,
        )
        rows = dataset.take_all()
        rows.sort(key=lambda row: row["index"])
        stacked = torch.from_numpy(np.stack([row["features"] for row in rows]))  # [N, A, C, G, G]
        # Variant-major like ray_ad.features.extract_features: all originals, then each dihedral copy.
        return stacked.transpose(0, 1).reshape(-1, *stacked.shape[2:]).contiguous()


class ScoreActor:
    """One bundle per actor (loaded once); scores image URIs; a bad image becomes a row with its error."""

    def __init__(self, bundle_uri: str, version: str) -> None:
        from ray_ad.bundle import load_bundle

        self.detector = load_bundle(bundle_uri, device=str(pick_device()))
        self.version = version

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        detector = self.detector
        tensors, good, errors = [], [], []
        for path in batch["path"]:
            try:
                image = load_image(str(path), keep_gray=True)
                tensors.append(detector.preprocess(image))
                good.append(True)
                errors.append(None)
            except RayADError as exc:
                good.append(False)
                errors.append(str(exc))
        scores = np.full(len(good), np.nan)
        if tensors:
            with torch.no_grad():
                scores[np.array(good)] = detector.predict(torch.stack(tensors)).pred_score.numpy()
        # An explicit schema: a batch without any error still has a string (all-null) error column.
        return pa.Table.from_pydict({
            "path": [str(p) for p in batch["path"]],
            "score": scores.tolist(),
            "decision": (np.array(good) & detector.decide(scores)).tolist(),  # NaN (unreadable) is never flagged
            "model_version": [self.version] * len(good),
            "error": errors,
        }, schema=SCORE_SCHEMA)


def default_scores_uri(root: str, images_uri: str, line: str, version: str) -> str:
    """Next to an input folder (``<images>_scores/<line>/<version>/``); under ``<root>/scores/`` for
    inputs that are not folders (``elpv:...``, a Parquet manifest)."""
    if not is_folder_uri(images_uri):
        return storage.join(root, "scores", line, version)
    return storage.join(images_uri.rstrip("/") + "_scores", line, version)


def _scored(root: str, line: str, version: str, images: list[str], actors: int, use_gpu: bool,
            batch_size: int) -> ray.data.Dataset:
    return ray.data.from_items([{"path": path} for path in images]).map_batches(
        ScoreActor,
        fn_constructor_kwargs={"bundle_uri": registry.version_uri(root, line, version), "version": version},
        compute=ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        num_gpus=1 if use_gpu else None,
    )


def _pinned_version(root: str, line: str, version: str | None = None) -> str:
    version = version or registry.current_version(root, line)
    if version is None:
        raise RayADError(f"line {line!r} has no published model under {root}")
    return registry.check_name("version", version)


def score_batch(
    root: str, line: str, images: list[str], out_uri: str | None, images_uri: str, actors: int = 1,
    use_gpu: bool = False, batch_size: int = 16,
) -> tuple[str, str]:
    """Score ``images`` with ``line``'s current model; returns (Parquet folder URI, model version).

    The version is pinned when the job starts, so a publish during the run never mixes two models.
    """
    if not images:
        raise DataError(f"no images to score under {images_uri}")
    version = _pinned_version(root, line)
    out_uri = out_uri or default_scores_uri(root, images_uri, line, version)
    filesystem, path = storage.arrow_filesystem(out_uri)
    _scored(root, line, version, images, actors, use_gpu, batch_size).write_parquet(path, filesystem=filesystem)
    return out_uri, version


def evaluate_line(
    root: str, line: str, data: str, split: str = "test", version: str | None = None, json_uri: str | None = None,
    name: str = "evaluation", actors: int = 1, use_gpu: bool = False,
) -> tuple[dict[str, Any], str]:
    """Image metrics of a registry model on a labelled split, scored on Ray Data; written as JSON."""
    samples = load_samples(data, split)
    labels = {s.path: s.label for s in samples if s.label in (0, 1)}
    if set(labels.values()) != {0, 1}:
        raise DataError(f"split {split!r} of {data} needs both normal and anomalous labelled images")
    version = _pinned_version(root, line, version)
    rows = _scored(root, line, version, list(labels), actors, use_gpu, 16).take_all()
    failed = [row["path"] for row in rows if row["error"]]
    if failed:
        raise DataError(f"{len(failed)} image(s) could not be scored, e.g. {failed[0]}")
    scores = np.array([row["score"] for row in rows])
    truth = np.array([labels[row["path"]] for row in rows])
    metrics = {**image_metrics(scores, truth), "images": len(rows), "line": line, "version": version,
               "data": data, "split": split}
    json_uri = json_uri or storage.join(root, "evaluations", line, version, f"{registry.check_name('name', name)}.json")
    storage.write_text(json_uri, json.dumps(metrics, indent=2))
    return metrics, json_uri
