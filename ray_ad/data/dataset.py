"""One reader for MVTec-layout folders, Parquet manifests and the bundled elpv dataset.

``load_samples(uri, split)`` accepts:

- an MVTec AD folder (``train/good``, ``test/<defect>``, ``ground_truth/<defect>/<name>_mask.png``),
- a Parquet manifest (columns ``path``, ``label``, ``mask_path``, ``split``, ``domain``; relative paths
  are resolved against the manifest's folder),
- ``elpv:mono`` / ``elpv:poly`` (see ``ray_ad.data.elpv``),

local or behind any fsspec URI.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any

import torch
from torch.utils.data import Dataset

from ray_ad import storage
from ray_ad.data.elpv import elpv_samples
from ray_ad.data.images import Preprocessor, load_image, load_mask, mask_to_tensor
from ray_ad.data.sample import UNLABELED, Sample, dataset_kind
from ray_ad.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MANIFEST_COLUMNS = ("path", "label", "mask_path", "split", "domain")


def load_samples(uri: str, split: str | None = None) -> list[Sample]:
    """The samples of ``split`` (all splits when None) of the dataset at ``uri``."""
    kind = dataset_kind(uri)
    if kind == "elpv":
        samples = elpv_samples(uri)
    elif kind == "manifest":
        samples = _manifest_samples(uri)
    else:
        samples = _mvtec_samples(uri)
    if split is not None:
        samples = [s for s in samples if s.split == split]
        if not samples:
            raise DataError(f"dataset {uri} has no images in split {split!r}")
    return samples


def _mvtec_samples(root: str) -> list[Sample]:
    root = root.rstrip("/")
    if not storage.exists(root):
        raise DataError(f"dataset folder not found: {root}")
    files = storage.list_files(root)
    prefix = root + "/" if "://" in root else None
    samples: list[Sample] = []
    masks = {}
    for path in files:
        rel = path[len(prefix) :] if prefix and path.startswith(prefix) else _relative(path, root)
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == "ground_truth":
            masks[(parts[1], parts[2])] = path
    for path in files:
        rel = path[len(prefix) :] if prefix and path.startswith(prefix) else _relative(path, root)
        parts = rel.split("/")
        if len(parts) != 3 or parts[0] not in ("train", "test"):
            continue
        if not parts[2].lower().endswith(IMAGE_EXTENSIONS):
            continue
        split, defect, name = parts
        label = 0 if defect == "good" else 1
        mask_path = None
        if label == 1 and any(key[0] == defect for key in masks):
            stem = posixpath.splitext(name)[0]
            mask_path = masks.get((defect, f"{stem}_mask.png"))
            if mask_path is None:
                expected = storage.join(root, "ground_truth", defect, f"{stem}_mask.png")
                raise DataError(f"missing mask for {path}: expected {expected}")
        samples.append(Sample(path, label, mask_path, split, posixpath.basename(root), defect))
    if not samples:
        raise DataError(
            f"{root} is not an MVTec-layout dataset: no images under train/<class>/ or test/<class>/"
        )
    return samples


def _relative(path: str, root: str) -> str:
    import os

    return os.path.relpath(path, root).replace(os.sep, "/")


def _manifest_samples(uri: str) -> list[Sample]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri)))
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many error types for bad files
        raise DataError(f"cannot read Parquet manifest {uri}: {exc}") from exc
    missing = [c for c in ("path", "split") if c not in table.column_names]
    if missing:
        raise DataError(
            f"manifest {uri} lacks column(s) {', '.join(missing)}; expected {', '.join(MANIFEST_COLUMNS)}"
        )
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    rows: list[dict[str, Any]] = table.to_pylist()
    samples = []
    for i, row in enumerate(rows):
        path = row.get("path")
        if not path:
            raise DataError(f"manifest {uri} row {i}: empty path")
        label = row.get("label")
        if label is None:
            label = UNLABELED
        elif label not in (0, 1, UNLABELED):
            raise DataError(f"manifest {uri} row {i}: label must be 0, 1 or empty, got {label!r}")
        mask = row.get("mask_path") or None
        samples.append(
            Sample(
                path=_resolve(base, path),
                label=int(label),
                mask_path=_resolve(base, mask) if mask else None,
                split=str(row.get("split") or "test"),
                domain=str(row.get("domain") or ""),
                defect="good" if label == 0 else "",
            )
        )
    if not samples:
        raise DataError(f"manifest {uri} has no rows")
    return samples


def _resolve(base: str, path: str) -> str:
    if "://" in path or path.startswith("/"):
        return path
    return storage.join(base, path)


def write_manifest(samples: list[Sample], uri: str) -> None:
    """Write samples as a Parquet manifest (absolute paths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "path": [s.path for s in samples],
            "label": pa.array([None if s.label == UNLABELED else s.label for s in samples], pa.int64()),
            "mask_path": [s.mask_path for s in samples],
            "split": [s.split for s in samples],
            "domain": [s.domain for s in samples],
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.write_bytes(uri, sink.getvalue())


class ImageDataset(Dataset):
    """Samples -> dicts of normalised image, binary mask, label and path."""

    def __init__(self, samples: list[Sample], preprocessor: Preprocessor, with_masks: bool = True) -> None:
        self.samples = samples
        self.preprocessor = preprocessor  # the detector's (or backbone's) own resize and normalisation
        self.with_masks = with_masks

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        image = load_image(sample.path, keep_gray=True)
        mask = None
        if self.with_masks and sample.mask_path:
            mask = load_mask(sample.mask_path, image.size)
        return {
            "image": self.preprocessor(image),
            "mask": mask_to_tensor(mask, self.preprocessor.size),
            "label": torch.tensor(sample.label),
            "has_mask": torch.tensor(mask is not None),
            "path": sample.path,
        }


def split_calibration(samples: list[Sample], fraction: float) -> tuple[list[Sample], list[Sample]]:
    """Deterministically hold out ``fraction`` of ``samples``, stratified by label.

    Each label (normal, anomalous, unlabelled) gives up its own share, at least one image of every
    label that has two or more, so the held-out set of a labelled source always contains normals to
    calibrate on. Images are ranked by a hash of the last three path components (``split/class/name``
    in an MVTec folder), not of the full path: the same dataset copied to another machine, bucket or
    temporary folder gets the same split.

    Returns ``(train, calibration)``; both are non-empty whenever there are at least two samples.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"calibration fraction must be in (0, 1), got {fraction}")
    if len(samples) < 2:
        raise DataError(f"need at least 2 training images to hold some out for calibration, got {len(samples)}")
    held_out: set[str] = set()
    for label in sorted({s.label for s in samples}):
        group = sorted((s for s in samples if s.label == label), key=_split_rank)
        if len(group) >= 2:
            count = min(len(group) - 1, max(1, round(len(group) * fraction)))
            held_out.update(s.path for s in group[:count])
    if not held_out:  # every label has a single image: hold out the first normal (or first) one
        held_out.add(min(samples, key=lambda s: (s.label != 0, _split_rank(s))).path)
    return [s for s in samples if s.path not in held_out], [s for s in samples if s.path in held_out]


def _split_rank(sample: Sample) -> str:
    import hashlib

    key = "/".join(sample.path.replace("\\", "/").split("/")[-3:])
    return hashlib.sha256(key.encode()).hexdigest()


def training_split(data: str, calibration_fraction: float = 0.1) -> tuple[list[Sample], list[Sample]]:
    """(train normals, held-out calibration normals) of a dataset, as every command makes them."""
    normals = [s for s in load_samples(data, "train") if s.label == 0]
    if not normals:
        raise DataError(f"{data}: the train split has no normal images")
    return split_calibration(normals, calibration_fraction)
