"""The promotion gate: rank candidate models for an unlabeled domain without target labels.

Part of the landed batch is held out before any candidate is built (``split_landing``): no candidate
is fitted on it. Each held-out image is scored as it landed and with small synthetic defects pasted
in (``data.synthetic.subtle_defect``: faint stains, scratches, smears, misplaced texture); a
candidate's gate score is the AUROC of pasted against untouched. Real defects among the held-out
images count as "untouched", and against the candidates that see them most: a memory that learnt
the batch's defects as normal scores them low and wins (on all six elpv runs and on magnetic_tile
the memory of every image outranked the one without the flagged images, and on mono -> poly and
magnetic_tile it did worse on the test split). With ``suspect_z`` set, the held-out images that stand
out from the others by their mutual scores (``suspects``, label-free, by a referee that is none of
the candidates) are not negatives: left out, or ranked as positives (``suspects``). Off by default:
the development set (magnetic_tile) keeps the source under every treatment, and only elpv's test
labels favour one (see the README).

When a quality engineer put a few labelled images beside the batch (``_acceptance/good``,
``_acceptance/defect``), the gate ranks on those instead. Those labels reach this module only: they
never enter a fit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ray_ad import metrics, storage
from ray_ad.adaptation.threshold import RULES, SHAPES, unlabeled_threshold
from ray_ad.data import is_folder_uri
from ray_ad.data.dataset import IMAGE_EXTENSIONS
from ray_ad.data.images import load_image
from ray_ad.data.synthetic import subtle_defect
from ray_ad.errors import DataError
from ray_ad.methods.base import Detector

ACCEPTANCE = "_acceptance"
MIN_HELD_OUT = 8  # the threshold's mixture fit needs a few scores (threshold.normal_mode)
MIN_FIT = 4
SUSPECT_USES = ("exclude", "positive")


@dataclass
class GateConfig:
    holdout_fraction: float = 0.2  # of the landed batch: never fitted on, scored by the gate
    max_holdout: int = 160  # cap on held-out images (the gate's cost grows with them)
    defects_per_image: int = 2  # pasted copies of each held-out image
    # Gate AUROC by which a winner must beat the served version, and a candidate every candidate listed
    # before it (an adaptation the source as is; the memory of every image the one without flagged images).
    margin: float = 0.01
    # threshold.py: "share" (flag the landing's defect share, fitted to the mutual scores of every landed
    # image fitted on: promote.build_gate_set), "f1" (expected F1 of the fitted mixture) or "false_alarm".
    # "share" was chosen on magnetic_tile (benchmarks/explorations/unlabeled_thresholds.py): F1 0.54
    # where "f1" shipped 0.16, because 160 held-out scores are too few for two Gaussians, and every
    # landed image is enough to estimate one number, the share.
    threshold_rule: str = "share"
    false_alarm_rate: float = 0.01  # of the normal mode, for "false_alarm" (and f1's fallback)
    threshold_shape: str = "mixture"  # threshold.py: "mixture" (two Gaussians by EM), "gaussian" or "gumbel"
    # Held-out images whose mutual score stands this many robust spreads above the held-out images'
    # normal mode are suspects (None: no image is). "exclude": suspects are neither negatives nor pasted
    # into; "positive": they also rank as positives beside the pasted defects (likely real defects: a
    # memory that learnt the batch's defects as normal scores them low).
    suspect_z: float | None = None
    suspects: str = "exclude"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"gate holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.threshold_rule not in RULES:
            raise ValueError(f"gate threshold_rule must be one of {', '.join(RULES)}, got {self.threshold_rule!r}")
        if self.threshold_shape not in SHAPES:
            raise ValueError(f"gate threshold_shape must be one of {', '.join(SHAPES)}, got {self.threshold_shape!r}")
        if self.defects_per_image < 1:
            raise ValueError(f"gate defects_per_image must be >= 1, got {self.defects_per_image}")
        if self.suspects not in SUSPECT_USES:
            raise ValueError(f"gate suspects must be one of {', '.join(SUSPECT_USES)}, got {self.suspects!r}")
        if self.suspect_z is not None and self.suspect_z <= 0:
            raise ValueError(f"gate suspect_z must be positive (or null), got {self.suspect_z}")


def _unit(name: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_landing(images: list[str], config: GateConfig) -> tuple[list[str], list[str]]:
    """(images to fit on, held-out images) by a seeded hash of each file name: no content, no label."""
    ranked = sorted(images, key=lambda path: _unit(path.rsplit("/", 1)[-1], config.seed))
    held = min(config.max_holdout, max(MIN_HELD_OUT, round(len(images) * config.holdout_fraction)))
    if len(images) - held < MIN_FIT:
        raise DataError(f"a landing batch needs at least {MIN_HELD_OUT + MIN_FIT} images ({MIN_HELD_OUT} held out "
                        f"for the gate and its threshold, {MIN_FIT} to fit on), got {len(images)}")
    held_out = set(ranked[:held])
    return [p for p in images if p not in held_out], [p for p in images if p in held_out]


def acceptance_images(target: str) -> tuple[list[str], list[str]] | None:
    """(good, defect) image URIs under ``<target>/_acceptance/``, or None when there is none."""
    if not is_folder_uri(target):
        return None  # a dataset, not a landing folder
    folder = storage.join(target, ACCEPTANCE)
    if not storage.exists(folder):
        return None
    found: dict[str, list[str]] = {"good": [], "defect": []}
    for path in storage.list_files(folder):
        parts = path.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2] in found and parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            found[parts[-2]].append(path)
    if not found["good"] or not found["defect"]:
        raise DataError(f"{folder} needs images in both good/ and defect/ "
                        f"(found {len(found['good'])} and {len(found['defect'])})")
    return sorted(found["good"]), sorted(found["defect"])


def _square_array(uri: str, size: int) -> np.ndarray:
    return np.asarray(load_image(uri).resize((size, size), Image.BILINEAR))


@dataclass
class GateSet:
    """What the gate scores: untouched held-out images (unlabeled) and the ranking pairs."""

    untouched: list[np.ndarray]  # held-out landed images, for the threshold (and negatives when synthetic)
    negatives: list[np.ndarray]
    # Synthetic ranking: which untouched images are negatives (the others are suspects).
    clean: np.ndarray
    positives: list[np.ndarray]
    positive_kinds: list[str]
    source: str  # "synthetic" or "acceptance"
    size: int
    counts: dict[str, int] = field(default_factory=dict)
    # The landing's defect share (estimated without labels from every landed image), for threshold rule
    # "share"; None: the rule estimates it from each candidate's held-out scores.
    landing_share: float | None = None

    @classmethod
    def build(cls, held_out: list[str], size: int, config: GateConfig,
              acceptance: tuple[list[str], list[str]] | None = None, suspects: np.ndarray | None = None) -> GateSet:
        """``suspects`` (bool per held-out image) are no negatives of a synthetic ranking and are not pasted into
        (they still count for the threshold); with ``config.suspects == "positive"`` they rank as positives."""
        untouched = [_square_array(p, size) for p in held_out]
        if acceptance is not None:
            good, defect = ([_square_array(p, size) for p in group] for group in acceptance)
            return cls(untouched, good, np.ones(len(untouched), dtype=bool), defect, ["acceptance"] * len(defect),
                       "acceptance", size, {"held_out": len(untouched), "good": len(good), "defect": len(defect)})
        clean = np.ones(len(untouched), dtype=bool) if suspects is None else ~np.asarray(suspects, dtype=bool)
        if len(clean) != len(untouched):
            raise ValueError(f"{len(clean)} suspect flags for {len(untouched)} held-out images")
        if not clean.any():
            raise DataError("every held-out image is a suspect: nothing is left to paste into")
        rng = np.random.default_rng(config.seed)
        positives, kinds = [], []
        for i in np.flatnonzero(clean):
            for _ in range(config.defects_per_image):
                donor = untouched[(i + 1 + int(rng.integers(len(untouched) - 1))) % len(untouched)]
                defective, _, kind = subtle_defect(untouched[i], donor, rng)
                positives.append(defective)
                kinds.append(kind)
        negatives = [image for image, keep in zip(untouched, clean) if keep]
        pasted = len(positives)
        if config.suspects == "positive":
            suspected = [image for image, keep in zip(untouched, clean) if not keep]
            positives += suspected
            kinds += ["suspect"] * len(suspected)
        return cls(untouched, negatives, clean, positives, kinds, "synthetic", size,
                   {"held_out": len(untouched), "suspects": int((~clean).sum()), "pasted": pasted})


@torch.no_grad()
def score_arrays(detector: Detector, arrays: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """Image scores of uint8 arrays through ``detector``'s own input size and normalisation."""
    scores = []
    for start in range(0, len(arrays), batch_size):
        batch = detector.preprocessor.batch([Image.fromarray(a) for a in arrays[start : start + batch_size]])
        scores.append(detector.predict(batch).pred_score.float().numpy())
    return np.concatenate(scores) if scores else np.zeros(0)


def gate_score(detector: Detector, gate: GateSet, config: GateConfig) -> dict[str, Any]:
    """The candidate's gate AUROC (overall and per defect kind) and its unlabeled threshold."""
    tick = time.perf_counter()
    untouched = score_arrays(detector, gate.untouched)
    negatives = untouched[gate.clean] if gate.source == "synthetic" else score_arrays(detector, gate.negatives)
    positives = score_arrays(detector, gate.positives)
    if not (np.isfinite(untouched).all() and np.isfinite(positives).all() and np.isfinite(negatives).all()):
        return {"gate_auroc": float("nan"), "error": "non-finite scores", "seconds": time.perf_counter() - tick}

    def against(pos: np.ndarray) -> float:
        return metrics.auroc(np.r_[pos, negatives], np.r_[np.ones(len(pos)), np.zeros(len(negatives))])

    kinds = np.array(gate.positive_kinds)
    result: dict[str, Any] = {
        "gate_auroc": against(positives),
        "per_kind": {kind: against(positives[kinds == kind]) for kind in sorted(set(gate.positive_kinds))},
        "threshold": unlabeled_threshold(untouched, config.false_alarm_rate, config.threshold_rule,
                                         shape=config.threshold_shape, share=gate.landing_share),
        "flagged_held_out": None,
        "seconds": 0.0,
    }
    result["flagged_held_out"] = float((untouched > result["threshold"]).mean())
    result["seconds"] = time.perf_counter() - tick
    return result


def choose(
    scores: dict[str, dict[str, Any]], served: str | None, margin: float, order: Sequence[str] | None = None
) -> tuple[str, str]:
    """(winner among the new candidates, "published" | "kept") by gate AUROC.

    The new candidates are taken in ``order`` (default: the order of ``scores``; the adaptation job passes
    ``promote.CANDIDATES``: the source as is first, then the memory without the flagged images, then the
    Gaussian of the same images, then the Gaussian and the memory of every image, then REF+CFA). A candidate wins over
    the ones before it only when it beats the best of them by ``margin``: the gate is a noisy proxy, and
    a difference inside its noise is no evidence for the candidate that assumes more (an adaptation over
    the source as is; a memory that also keeps the images its mutual scores flag, defects likely among
    them, over one without them).
    ``served`` names the entry of ``scores`` that is the line's current version, if it has one: the
    winner replaces it only when it scores at least ``margin`` higher.
    """
    names = [name for name in (order if order is not None else scores)
             if name != served and name in scores and np.isfinite(scores[name]["gate_auroc"])]
    if not names:
        raise DataError("no candidate produced finite gate scores")
    winner, best = names[0], scores[names[0]]["gate_auroc"]
    for name in names[1:]:
        value = scores[name]["gate_auroc"]
        if value >= best + margin:
            winner = name
        best = max(best, value)
    if served is not None and np.isfinite(scores[served]["gate_auroc"]):
        if scores[winner]["gate_auroc"] < scores[served]["gate_auroc"] + margin:
            return winner, "kept"
    return winner, "published"
