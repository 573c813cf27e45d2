"""The library's workflows (train, adapt, evaluate), shared by the CLI, the Ray jobs and the service.

Ray-free: the jobs pass a ``Runtime`` whose score-net trainer is Ray Train's and whose feature backend
is a Ray Data pool; everything else is the same code path as ``ray-ad train`` / ``ray-ad adapt`` on a
laptop.
"""

from __future__ import annotations

import logging
from typing import Any

from ray_ad import storage
from ray_ad.adaptation.gate import ACCEPTANCE
from ray_ad.config import apply_overrides, override_section, to_dict
from ray_ad.data import Sample, is_folder_uri, load_samples, split_calibration, training_split
from ray_ad.data.dataset import IMAGE_EXTENSIONS
from ray_ad.errors import ConfigError, DataError, RayADError
from ray_ad.evaluation import compute_metrics, run_detector
from ray_ad.job_status import landing_manifest
from ray_ad.methods import Detector, build_detector, method_config
from ray_ad.methods.base import Adaptable, Runtime

log = logging.getLogger(__name__)

ADAPT_SECTIONS = ("cfa", "train", "target_init")  # what may differ between a source model and its adaptation


def _require_both_labels(samples: list[Sample], what: str) -> None:
    if not any(s.label == 1 for s in samples) or not any(s.label == 0 for s in samples):
        raise DataError(f"{what} needs both normal and anomalous labelled images")


def evaluate_samples(detector: Detector, samples: list[Sample], what: str, progress: bool = True) -> dict[str, Any]:
    _require_both_labels(samples, what)
    return compute_metrics(run_detector(detector, samples, progress=progress))


def evaluate_split(detector: Detector, data: str, split: str, progress: bool = True):
    """(per-image results, metrics) of ``detector`` on a labelled split."""
    samples = load_samples(data, split)
    _require_both_labels(samples, f"split {split!r} of {data}")
    results = run_detector(detector, samples, progress=progress)
    return results, compute_metrics(results)


def train_detector(
    method: str, data: str | list[str], overrides: dict[str, Any] | None = None, calibration_fraction: float = 0.1,
    runtime: Runtime | None = None, evaluate: bool = True,
) -> tuple[Detector, dict[str, Any]]:
    """Build ``method`` from ``overrides``, fit it on ``data``, evaluate it; returns (detector, metrics).

    ``data`` is one dataset URI, or several for a generalist trained across source domains (NAGL).
    """
    runtime = runtime or Runtime()
    progress = runtime.progress
    sources = [data] if isinstance(data, str) else list(data)
    detector = build_detector(method, method_config(method, overrides or {}))
    if not sources or (len(sources) > 1 and not detector.uses_references):
        raise ConfigError(f"{method} trains on exactly one dataset; got {len(sources)} (only nagl takes several)")
    held_out: list[Sample] | None = None
    if detector.uses_labels:
        # Supervised source training: every labelled image of every split; a hashed share is held out
        # for calibration (its normals) and for the evaluation below.
        labelled = [s for uri in sources for s in load_samples(uri) if s.label in (0, 1)]
        if detector.uses_references:  # a generalist: nothing to calibrate, its lines bring their references
            train, calibration = labelled, []
        else:
            train, held_out = split_calibration(labelled, calibration_fraction)
            calibration = [s for s in held_out if s.label == 0]
        log.info(f"training {method} on {len(train)} labelled images "
              f"({sum(s.label == 1 for s in train)} anomalous), {len(held_out or [])} held out")
    else:
        train, calibration = training_split(sources[0], calibration_fraction)
        log.info(f"training {method} on {len(train)} normal images, {len(calibration)} held out for calibration")
    metrics: dict[str, Any] = {"fit": detector.fit(train, calibration, runtime)}
    if evaluate and detector.uses_references:
        log.info(f"{method} scores against a line's references: evaluate it with `ray-ad evaluate --shots K+A`")
    elif evaluate:
        try:
            if held_out is not None:
                metrics.update(evaluate_samples(detector, held_out, f"the held-out share of {data}", progress))
            else:
                metrics.update(evaluate_split(detector, sources[0], "test", progress)[1])
        except DataError as exc:
            log.info(f"skipping evaluation: {exc}")
    return detector, metrics


def train_selected(
    candidates_uri: str | None, data: str, overrides: dict[str, Any] | None = None, calibration_fraction: float = 0.1,
    runtime: Runtime | None = None, evaluate: bool = True,
) -> tuple[Detector, dict[str, Any]]:
    """``train_detector`` for the candidate recipes of ``candidates_uri`` (``selection.py``): the one
    the label-free validation ranks first, with every candidate's figure under ``metrics["selection"]``;
    the test split is scored after the choice, for the report."""
    from ray_ad.selection import load_candidates, select_detector

    candidates, holdout_fraction = load_candidates(candidates_uri)
    runtime = runtime or Runtime()
    selection = select_detector(candidates, data, overrides, holdout_fraction, calibration_fraction, runtime)
    detector, metrics = selection.detectors[selection.winner], selection.metrics
    if evaluate:
        try:
            metrics.update(evaluate_split(detector, data, "test", runtime.progress)[1])
        except DataError as exc:
            log.info(f"skipping evaluation: {exc}")
    return detector, metrics


def train_fleet(
    lines: dict[str, str], overrides: dict[str, Any] | None = None, calibration_fraction: float = 0.1,
    runtime: Runtime | None = None, evaluate: bool = True,
) -> dict[str, tuple[Detector, dict[str, Any]]]:
    """One CostFilter-AD fleet filter for several lines (``{line: data URI}``), each line with its own base,
    templates and threshold built from ``overrides``; returns ``{line: (detector, metrics)}``."""
    from ray_ad.methods.costfilter.fleet import train_fleet_filter  # only this path needs it

    runtime = runtime or Runtime()
    members = []
    for line, data in lines.items():
        train, calibration = training_split(data, calibration_fraction)
        log.info(f"fleet line {line}: {len(train)} normal images, {len(calibration)} held out for calibration")
        members.append((build_detector("costfilter", method_config("costfilter", overrides or {})), train, calibration))
    fleet = train_fleet_filter(members, runtime, seed=members[0][0].config.seed)
    out = {}
    for (line, data), (detector, _, _), fit in zip(lines.items(), members, fleet["lines"]):
        metrics: dict[str, Any] = {"fit": fit, "fleet": sorted(lines)}
        if evaluate:
            try:
                metrics.update(evaluate_split(detector, data, "test", runtime.progress)[1])
            except DataError as exc:
                log.info(f"{line}: skipping evaluation: {exc}")
        out[line] = (detector, metrics)
    return out


def target_image_uris(uri: str, split: str | None = None) -> list[str]:
    """The image URIs of a target domain: a dataset (as for training) or any folder of images.

    A landing batch is just a folder of images, so a folder that is not a dataset is read as one; its
    ``_acceptance/`` folder (a few labelled images for the promotion gate only) is not part of it.
    """
    manifest = landing_manifest(uri) if split is None else None
    if manifest is not None:  # a checked landing batch: exactly the images the watcher read
        return [storage.join(uri, image["name"]) for image in manifest["images"]]
    try:
        return [s.path for s in load_samples(uri, split)]
    except DataError:
        if not is_folder_uri(uri) or split is not None:
            raise
    images = [p for p in storage.list_files(uri)
              if p.lower().endswith(IMAGE_EXTENSIONS) and f"/{ACCEPTANCE}/" not in p]
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {uri}")
    return images


def adapt_detector(
    detector: Detector, target_images: list[str], overrides: list[str] | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Adapt an adaptable detector (REF+CFA) in place to unlabeled target images; returns the adaptation info."""
    if not isinstance(detector, Adaptable):
        raise RayADError(f"this is a {detector.method} model; only ref_cfa source models can be adapted")
    if overrides:
        outside = sorted({override_section(item) for item in overrides} - set(ADAPT_SECTIONS))
        if outside:
            raise ConfigError(f"adapt can only change {', '.join(ADAPT_SECTIONS)}; not {', '.join(outside)}")
        new = method_config(detector.method, apply_overrides(to_dict(detector.config), overrides))
        for name in ADAPT_SECTIONS:
            setattr(detector.config, name, getattr(new, name))
    # Only image URIs reach the detector: adaptation never sees a label or a mask.
    return detector.adapt(target_images, runtime or Runtime())
