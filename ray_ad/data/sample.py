"""One image of a dataset (``Sample``) and what kind of dataset a URI names.

Kept apart from the readers (``dataset.py`` for folders and manifests, ``elpv.py``) so that they import
this module and not each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

UNLABELED = -1
ELPV_PREFIX = "elpv:"
MANIFEST_SUFFIX = ".parquet"

DatasetKind = Literal["elpv", "manifest", "folder"]


@dataclass(frozen=True)
class Sample:
    path: str
    label: int  # 0 normal, 1 anomalous, -1 unlabeled
    mask_path: str | None = None
    split: str = "test"
    domain: str = ""
    defect: str = ""


def dataset_kind(uri: str) -> DatasetKind:
    """What ``uri`` names: an ``elpv:<domain>`` dataset, a Parquet manifest, or a folder (an MVTec-layout
    dataset or any folder of images, e.g. a landing batch). Decided from the URI alone, nothing is read."""
    if uri.startswith(ELPV_PREFIX):
        return "elpv"
    if uri.endswith(MANIFEST_SUFFIX):
        return "manifest"
    return "folder"


def is_folder_uri(uri: str) -> bool:
    """True unless ``uri`` names an elpv dataset or a Parquet manifest (which are datasets, never folders
    with a landing manifest, acceptance images or a scores folder next to them)."""
    return dataset_kind(uri) == "folder"
