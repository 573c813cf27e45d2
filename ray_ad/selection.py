"""A line picks its own recipe without test labels (issue 22): ``ray-ad train --select FILE``.

Every candidate of the file (a method and its config) is fitted on the same training normals, less a
held-out share chosen by a seeded hash of the file names (no content, no label). Each candidate then
scores the held-out normals as they are and with small synthetic defects pasted in (the promotion
gate's ``subtle_defect``: faint stains, thin scratches, smears, misplaced and foreign texture); its
validation figure is the AUROC of pasted against untouched. The best one is returned, fitted as it
was, with every candidate's figure in its metrics. No test image and no test label is read before
the choice; the test split is scored afterwards, for the report only, as ``ray-ad train`` does.

A candidates file::

    holdout_fraction: 0.2          # optional; of the training normals, never fitted on
    candidates:
      - {name: gaussian, method: gaussian, set: ["backbone.local_pool=[3, 11]"]}
      - {name: patchcore, method: patchcore, config: configs/some_patchcore.yaml}
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray_ad.adaptation.gate import GateConfig, GateSet, gate_score, split_landing
from ray_ad.config import apply_overrides, load_file
from ray_ad.data import training_split
from ray_ad.errors import ConfigError
from ray_ad.methods import METHODS, build_detector, method_config
from ray_ad.methods.base import Detector, Runtime

log = logging.getLogger(__name__)
REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CANDIDATES = REPO_CONFIGS / "select.yaml"


@dataclass
class Candidate:
    name: str
    method: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    winner: str
    detectors: dict[str, Detector]  # every candidate, fitted (the benchmark scores them all afterwards)
    metrics: dict[str, Any]  # the winner's, with "selection": every candidate's validation figure


def load_candidates(uri: str | None) -> tuple[list[Candidate], float]:
    """(candidates, holdout fraction) from a YAML/JSON file (``configs/select.yaml`` when None)."""
    uri = str(uri or DEFAULT_CANDIDATES)
    spec = load_file(uri)
    entries = spec.get("candidates") if isinstance(spec, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{uri}: needs a non-empty 'candidates' list")
    candidates: list[Candidate] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"name", "method"} <= set(entry):
            raise ConfigError(f"{uri}: candidate {i} needs a name and a method, got {entry!r}")
        unknown = set(entry) - {"name", "method", "config", "set"}
        if unknown:
            raise ConfigError(f"{uri}: candidate {entry['name']!r} has unknown keys {sorted(unknown)}")
        method = entry["method"]
        if method not in METHODS:
            raise ConfigError(f"{uri}: candidate {entry['name']!r}: unknown method {method!r}")
        detector_class = METHODS[method][0]
        if detector_class.uses_labels or detector_class.uses_references:
            raise ConfigError(f"{uri}: candidate {entry['name']!r}: {method} does not train on normal images alone")
        config = load_file(_beside(uri, str(entry["config"]))) if entry.get("config") else {}
        config = apply_overrides(config, list(entry.get("set") or []))
        method_config(method, config)  # it must build: a bad value is named here, before any training
        candidates.append(Candidate(str(entry["name"]), method, config))
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ConfigError(f"{uri}: candidate names must be unique, got {names}")
    fraction = float(spec.get("holdout_fraction", 0.2))
    if not 0 < fraction < 1:
        raise ConfigError(f"{uri}: holdout_fraction must be in (0, 1), got {fraction}")
    return candidates, fraction


def _beside(candidates_uri: str, path: str) -> str:
    """A candidate's config path: absolute or a URI as given, else relative to the candidates file."""
    if "://" in path or Path(path).is_absolute() or "://" in candidates_uri:
        return path
    return str(Path(candidates_uri).parent / path)


def select_detector(
    candidates: list[Candidate], data: str, overrides: dict[str, Any] | None = None, holdout_fraction: float = 0.2,
    calibration_fraction: float = 0.1, runtime: Runtime | None = None, seed: int = 0,
) -> Selection:
    """Fit every candidate on ``data``'s training normals less a held-out share, rank them by
    pasted-vs-untouched AUROC on that share, and return the best (``overrides`` apply to every one)."""
    runtime = runtime or Runtime()
    train, calibration = training_split(data, calibration_fraction)
    gate_config = GateConfig(holdout_fraction=holdout_fraction, seed=seed)
    fit_paths, held_paths = split_landing([s.path for s in train], gate_config)
    fit_set = set(fit_paths)
    fit = [s for s in train if s.path in fit_set]
    detectors = {c.name: build_detector(c.method, method_config(c.method, apply_overrides(c.config, overrides or {})))
                 for c in candidates}
    size = max(d.image_size for d in detectors.values())
    gate = GateSet.build(held_paths, size, gate_config)  # each candidate resizes to its own input
    log.info(f"select: {len(candidates)} candidates fitted on {len(fit)} training normals, ranked on "
             f"{len(held_paths)} held-out normals and {len(gate.positives)} pasted defects")
    figures: dict[str, dict[str, Any]] = {}
    fits: dict[str, Any] = {}
    for candidate in candidates:
        tick = time.perf_counter()
        fits[candidate.name] = detectors[candidate.name].fit(fit, calibration, runtime)
        fit_seconds = time.perf_counter() - tick
        scored = gate_score(detectors[candidate.name], gate, gate_config)
        figures[candidate.name] = {"method": candidate.method, "validation_auroc": scored["gate_auroc"],
                                   "per_kind": scored.get("per_kind", {}), "fit_seconds": fit_seconds}
        log.info(f"select: {candidate.name} ({candidate.method}) validation AUROC {scored['gate_auroc']:.4f} "
                 f"(fitted in {fit_seconds:.0f} s)")
    finite = {name: f["validation_auroc"] for name, f in figures.items() if math.isfinite(f["validation_auroc"])}
    if not finite:
        raise ConfigError("no candidate produced a finite validation figure")
    winner = max(finite, key=lambda name: finite[name])
    log.info(f"select: {winner} wins")
    metrics = {"fit": fits[winner], "selection": {
        "winner": winner, "candidates": figures, "fit_images": len(fit), "held_out_images": len(held_paths),
        "pasted_defects": len(gate.positives), "holdout_fraction": holdout_fraction, "seed": seed}}
    return Selection(winner, detectors, metrics)


def selection_table(selection: dict[str, Any]) -> str:
    """Every candidate's validation AUROC, the winner marked (for the CLI and job logs)."""
    lines = [f"recipe selection: {selection['fit_images']} normals fitted, {selection['held_out_images']} held out, "
             f"{selection['pasted_defects']} pasted defects",
             f"{'candidate':<28}{'method':<12}{'validation AUROC':>18}"]
    for name, figures in selection["candidates"].items():
        mark = "  <- selected" if name == selection["winner"] else ""
        lines.append(f"{name:<28}{figures['method']:<12}{figures['validation_auroc']:>18.4f}{mark}")
    return "\n".join(lines)
