"""The ELPV solar-cell dataset (PyPI ``elpv-dataset``) as two domains, mono and poly.

Labels: defect probability 0 -> normal (0), 1 -> defective (1). The ambiguous 1/3 and 2/3 are kept out
by default (``elpv:mono?ambiguous=defective`` keeps them as defective). Splits are deterministic: a
stable hash of the file name puts ``train_fraction`` of each domain's normal cells in ``train``; the
rest of the normals and all defective cells form ``test``.

``elpv:poly?layout=landing`` lays a domain out as a camera delivers it: a fixed ``eval_fraction``
(default 0.4, by the same hash) of every cell is the labelled ``test`` split and never lands; every
other cell, whatever its label (defective and ambiguous ones too), is in the ``landing`` split. No
label decides what lands; landing cells keep their labels (ambiguous ones -1) only so that a
benchmark can fit a labelled reference on them, and adaptation reads nothing but their paths.
"""

from __future__ import annotations

import hashlib
import os
from urllib.parse import parse_qs

from ray_ad.data.sample import ELPV_PREFIX, UNLABELED, Sample
from ray_ad.errors import DataError

DOMAINS = ("mono", "poly")
TRAIN_FRACTION = 0.6
EVAL_FRACTION = 0.4


def elpv_root() -> str:
    try:
        import elpv_dataset
    except ImportError as exc:
        raise DataError("elpv data needs the PyPI package elpv-dataset (pip install elpv-dataset)") from exc
    return os.path.join(os.path.dirname(elpv_dataset.__file__), "data")


def _stable_unit(name: str) -> float:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def elpv_samples(uri: str) -> list[Sample]:
    spec, _, query = uri[len(ELPV_PREFIX) :].partition("?")
    if spec not in DOMAINS:
        raise DataError(f"unknown elpv domain in {uri!r}; use elpv:mono or elpv:poly")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    ambiguous = options.pop("ambiguous", "exclude")
    train_fraction = float(options.pop("train_fraction", TRAIN_FRACTION))
    layout = options.pop("layout", "train")
    eval_fraction = float(options.pop("eval_fraction", EVAL_FRACTION))
    if options:
        raise DataError(f"unknown elpv option(s) {', '.join(options)} in {uri!r}")
    if ambiguous not in ("exclude", "defective"):
        raise DataError(f"elpv option ambiguous={ambiguous!r}: use exclude or defective")
    if layout not in ("train", "landing"):
        raise DataError(f"elpv option layout={layout!r}: use train or landing")
    if not 0 < eval_fraction < 1:
        raise DataError(f"elpv option eval_fraction={eval_fraction!r}: must be in (0, 1)")
    root = elpv_root()
    labels_path = os.path.join(root, "labels.csv")
    samples = []
    with open(labels_path) as handle:
        for line in handle:
            fields = line.split()
            if len(fields) != 3:
                continue
            rel, probability, domain = fields[0], float(fields[1]), fields[2]
            if domain != spec:
                continue
            if probability == 0.0:
                label = 0
            elif probability == 1.0 or ambiguous == "defective":
                label = 1
            else:
                label = UNLABELED
            unit = _stable_unit(rel)
            if layout == "landing":
                split = "test" if unit >= 1 - eval_fraction else "landing"
            else:
                split = "train" if label == 0 and unit < train_fraction else "test"
            if label == UNLABELED and split != "landing":
                continue  # ambiguous cells have no label to evaluate against
            path = os.path.join(root, rel)
            defect = {0: "good", 1: "defective"}.get(label, "ambiguous")
            samples.append(Sample(path, label, None, split, f"elpv-{domain}", defect))
    return samples
